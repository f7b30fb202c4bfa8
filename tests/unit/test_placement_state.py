"""Placement: health with damped recovery, and leases that never double-book or overfill a host."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.state import PlacementState
from wire.config import SYSTEM_RESERVED_MB
from wire.errors import (
    ResourceConflictException,
    ResourceNotFoundException,
    ServiceException,
)


def node(i, az="az1", roles=("worker",), memory_mb=8192 + SYSTEM_RESERVED_MB):
    return {"node_id": f"n{i}", "az": az, "address": f"127.0.0.{i}", "roles": list(roles), "ports": {},
            "memory_mb": memory_mb}


def region(n=4, azs=2):
    s = PlacementState(heartbeat_timeout_s=1.5, hold_down_s=5.0)
    for i in range(1, n + 1):
        s.cmd_register(0, node(i, az=f"az{(i - 1) % azs + 1}"))
    return s


def beat(s, now, skip=()):
    """Time passes with the placement group up: its leader ticks every interval, then the nodes beat."""
    while s.last_tick + s.tick_interval_s < now:
        s.cmd_tick(s.last_tick + s.tick_interval_s)
    s.cmd_tick(now)
    for node_id in s.nodes:
        if node_id not in skip:
            s.cmd_heartbeat(now, node_id)


def test_a_node_is_unhealthy_after_three_missed_heartbeats_while_others_beat():
    s = region(2)
    beat(s, 1.0)
    beat(s, 2.5, skip={"n1"})
    assert s.is_healthy("n1", 2.5)
    beat(s, 2.6, skip={"n1"})
    assert not s.is_healthy("n1", 2.6)
    assert [n["healthy"] for n in s.view(2.6)] == [False, True]


def test_a_stalled_placement_group_does_not_make_every_node_unhealthy():
    s = region(3)
    beat(s, 10.0, skip={"n3"})
    s.cmd_heartbeat(8.0, "n3")
    # no commits for 5 s (a leader election, a lost quorum): health is what it was
    assert [s.is_healthy(f"n{i}", 15.0) for i in (1, 2, 3)] == [True, True, False]


def test_heartbeat_from_an_unknown_node_asks_it_to_register():
    with pytest.raises(ResourceNotFoundException, match="register"):
        PlacementState().cmd_heartbeat(0, "ghost")


def test_three_system_errors_in_the_last_ten_make_a_host_suspect_and_it_recovers_damped():
    s = region(2)
    for ok in (True, False, True, False):
        s.cmd_report(1.0, "n1", ok)
    assert not s.nodes["n1"].suspect
    assert s.cmd_report(1.0, "n1", False) is True
    assert not s.is_healthy("n1", 1.0) and not s.can_lease("n1", 1.0)
    for _ in range(10):
        s.cmd_report(2.0, "n1", True)  # errors age out of the window
    assert s.is_healthy("n1", 2.0)
    assert not s.can_lease("n1", 2.0) and s.can_lease("n1", 7.0)  # held down 5 s after recovering
    for _ in range(3):
        s.cmd_report(8.0, "n1", False)
    for _ in range(10):
        s.cmd_report(9.0, "n1", True)
    assert not s.can_lease("n1", 18.9) and s.can_lease("n1", 19.0)  # a relapse doubles the hold-down


def test_reported_errors_age_out_and_reports_about_an_earlier_run_are_ignored():
    s = region(2)
    for _ in range(3):
        s.cmd_report(1.0, "n1", False)
    assert s.nodes["n1"].suspect
    beat(s, 31.5)  # 30 s later, with nothing run on it, the errors no longer count
    assert not s.nodes["n1"].suspect
    incarnation = s.cmd_register(40.0, node(1))  # restarted
    for _ in range(3):
        s.cmd_report(40.5, "n1", False, incarnation=incarnation - 1)  # late news about the old run
    assert not s.nodes["n1"].suspect and s.is_healthy("n1", 40.5)


def test_an_az_is_short_when_no_healthy_host_there_could_take_one_more_lease():
    s = region(4, azs=2)  # n1, n3 in az1; n2, n4 in az2; 8192 MB each
    beat(s, 1.0)
    assert s.headroom(1.0)["short_azs"] == []
    for i in range(4):  # fill az1's two hosts
        s.cmd_lease_worker(1.0, f"L{i}", "m1", 4096, prefer_azs=["az1"])
    assert s.headroom(1.0)["short_azs"] == ["az1"] and s.headroom(1.0)["free_mb"] == 16384
    beat(s, 2.0, skip={"n2"})
    beat(s, 3.0, skip={"n2"})  # n2 goes quiet: n4 alone still has room in az2
    assert not s.is_alive("n2", 3.0)
    assert s.headroom(3.0)["short_azs"] == ["az1"]
    s.cmd_return_lease(3.0, "L0")
    assert s.headroom(3.0)["short_azs"] == []


def test_a_placement_outage_does_not_make_every_node_look_dead_when_it_ends():
    s = region(3, azs=3)
    beat(s, 1.0)
    beat(s, 1.5, skip={"n3"})
    beat(s, 2.0, skip={"n3"})
    beat(s, 2.6, skip={"n3"})  # n3 has been quiet for 1.6 s: dead before the outage
    assert not s.is_alive("n3", 2.6)
    s.cmd_tick(7.0)  # the group could not commit for 4.4 s (a leader election); this is its first commit
    s.cmd_heartbeat(7.05, "n1")
    assert s.is_alive("n2", 7.05) and s.can_lease("n2", 7.05)  # n2 gets its chance to be heard again
    assert s.is_alive("n1", 7.05) and not s.is_alive("n3", 7.05)  # n3 was dead already
    s.cmd_tick(7.5)
    s.cmd_heartbeat(7.55, "n1")
    s.cmd_tick(8.0)
    s.cmd_heartbeat(8.05, "n1")
    s.cmd_tick(8.5)
    assert not s.is_alive("n2", 8.5)  # n2 stayed silent after the outage too: now it is dead


def test_drained_hosts_get_no_leases():
    s = region(2, azs=1)
    s.cmd_drain(0, "n1")
    assert s.cmd_lease_worker(0, "L1", "m1", 1024)["lease"]["node_id"] == "n2"
    s.cmd_drain(0, "n1", draining=False)
    assert s.can_lease("n1", 0)


def test_flint_packs_hosts_before_opening_new_ones_and_spreads_on_request():
    s = region(4, azs=2)
    nodes = [s.cmd_lease_worker(0, f"L{i}", "m1", 2048)["lease"]["node_id"] for i in range(4)]
    assert len(set(nodes)) == 1  # 4 x 2 GB fill one 8 GB host first
    other = s.cmd_lease_worker(0, "L5", "m1", 2048, prefer_azs=["az2"])["node"]
    assert other["az"] == "az2"


def test_balance_the_load_spreads_everything():
    s = region(4, azs=2)
    s.policy = "balance"
    nodes = {s.cmd_lease_worker(0, f"L{i}", "m1", 2048)["lease"]["node_id"] for i in range(4)}
    assert len(nodes) == 4


def test_leases_are_idempotent_expire_and_are_revoked_when_a_host_dies():
    s = region(2, azs=1)
    first = s.cmd_lease_worker(0, "L1", "m1", 2048, lease_s=10)
    again = s.cmd_lease_worker(1, "L1", "m1", 2048, lease_s=10)
    assert again["lease"] == first["lease"]  # a retried command: the same lease, not a second one
    assert s.leased_mb[first["lease"]["node_id"]] == 2048
    assert s.leases_of("m1", 9.9) and not s.leases_of("m1", 10.0)
    s.cmd_lease_worker(10.0, "L2", "m1", 2048, lease_s=100)
    assert "L1" not in s.leases  # expired leases give their capacity back
    victim = s.leases["L2"].node_id
    beat(s, 11.0)
    beat(s, 13.0, skip={victim})
    assert "L2" not in s.leases  # the host went quiet: its leases are revoked


def test_no_capacity_is_a_clear_error():
    s = region(1)
    s.cmd_lease_worker(0, "L1", "m1", 8192)
    with pytest.raises(ServiceException, match="no healthy worker has 128 MB free"):
        s.cmd_lease_worker(0, "L2", "m1", 128)


events = st.lists(
    st.one_of(
        st.tuples(st.just("lease"), st.integers(0, 40), st.sampled_from([512, 1024, 2048, 4096]), st.integers(1, 3)),
        st.tuples(st.just("return"), st.integers(0, 40), st.just(0), st.just(0)),
        st.tuples(st.just("beat"), st.integers(1, 4), st.just(0), st.just(0)),
        st.tuples(st.just("fail"), st.integers(1, 4), st.just(0), st.just(0)),
        st.tuples(st.just("drain"), st.integers(1, 4), st.just(0), st.just(0)),
        st.tuples(st.just("time"), st.integers(1, 20), st.just(0), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_leases_never_double_book_overfill_or_land_on_an_unfit_host(steps):
    s = region(4, azs=2)
    now = 0.0
    quiet: set[str] = set()
    granted: dict[str, str] = {}
    for kind, a, b, c in steps:
        if kind == "lease":
            try:
                out = s.cmd_lease_worker(now, f"L{a}", f"m{c}", b, lease_s=30)
            except (ServiceException, ResourceConflictException):  # no room; or an id that already ended
                continue
            node_id = out["lease"]["node_id"]
            if f"L{a}" in granted:
                assert granted[f"L{a}"] == node_id  # never granted twice
            elif out["lease"]["granted_at"] == now:
                assert s.can_lease(node_id, now)  # only fit hosts get new leases
            granted[f"L{a}"] = node_id
        elif kind == "return":
            s.cmd_return_lease(now, f"L{a}")
            granted.pop(f"L{a}", None)
        elif kind == "beat":
            quiet.discard(f"n{a}")
        elif kind == "fail":
            quiet.add(f"n{a}")
            s.cmd_report(now, f"n{a}", False)
        elif kind == "drain":
            s.cmd_drain(now, f"n{a}", not s.nodes[f"n{a}"].draining)
        else:
            now += a / 4
            beat(s, now, skip=quiet)
        for node_id, record in s.nodes.items():
            live = [lease for lease in s.leases.values() if lease.node_id == node_id]
            assert sum(lease.memory_mb for lease in live) == s.leased_mb.get(node_id, 0)
            assert s.leased_mb.get(node_id, 0) <= record.capacity_mb  # capacity is never exceeded
