import pytest
from hypothesis import given
from hypothesis import strategies as st

from placement.state import PlacementState
from wire.errors import ResourceNotFoundException


def node(i, az="az1", roles=("worker",)):
    return {"node_id": f"n{i}", "az": az, "address": f"127.0.0.{i}", "roles": list(roles), "ports": {}}


def test_a_node_is_healthy_while_it_heartbeats_and_unhealthy_after_three_missed():
    s = PlacementState(heartbeat_timeout_s=1.5)
    s.cmd_register(0, node(1))
    s.cmd_heartbeat(1.0, "n1")
    s.cmd_tick(2.6)  # the group keeps committing; only the node went quiet
    assert s.is_healthy("n1", 2.5)
    assert not s.is_healthy("n1", 2.51)
    assert [n["healthy"] for n in s.view(2.6)] == [False]


def test_heartbeat_from_an_unknown_node_asks_it_to_register():
    s = PlacementState()
    with pytest.raises(ResourceNotFoundException, match="register"):
        s.cmd_heartbeat(0, "ghost")


def test_re_registration_is_a_new_incarnation():
    s = PlacementState()
    assert s.cmd_register(0, node(1)) == 1
    assert s.cmd_register(5, node(1)) == 2


def test_healthy_filters_by_role():
    s = PlacementState()
    s.cmd_register(0, node(1, roles=("worker",)))
    s.cmd_register(0, node(2, roles=("manager",)))
    assert [r.node_id for r in s.healthy(0.1, "manager")] == ["n2"]


@given(st.lists(st.tuples(st.integers(1, 4), st.floats(0, 3)), max_size=50))
def test_health_is_exactly_the_heartbeat_age_rule(beats):
    s = PlacementState(heartbeat_timeout_s=1.5)
    now = 0.0
    last = {}
    for i in range(1, 5):
        s.cmd_register(0, node(i))
        last[f"n{i}"] = 0.0
    for i, dt in beats:
        now += dt
        s.cmd_tick(now)
        s.cmd_heartbeat(now, f"n{i}")
        last[f"n{i}"] = now
        for nid, t in last.items():
            assert s.is_healthy(nid, now) == (now - t <= 1.5)  # the group commits: plain age rule


def test_a_stalled_placement_group_does_not_make_every_node_unhealthy():
    s = PlacementState(heartbeat_timeout_s=1.5)
    for i in (1, 2, 3):
        s.cmd_register(0, node(i))
    s.cmd_heartbeat(10.0, "n1")
    s.cmd_heartbeat(10.0, "n2")
    s.cmd_heartbeat(8.0, "n3")
    # no heartbeat commits for 5 s (leader election, lost quorum): health is what it was
    assert [s.is_healthy(f"n{i}", 15.0) for i in (1, 2, 3)] == [True, True, False]
