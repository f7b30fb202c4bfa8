"""Worker manager state: warm reuse, one invoke per sandbox, AZ spread, reaping."""

from hypothesis import given, settings
from hypothesis import strategies as st

from manager.state import BUSY, IDLE, ManagerState, SandboxRecord, WorkerCandidate

WORKERS = [WorkerCandidate("n1", "az1", "e1"), WorkerCandidate("n2", "az2", "e2"), WorkerCandidate("n3", "az3", "e3")]


def rec(sid, node="n1", az="az1", key="f"):
    return SandboxRecord(sid, key, node, az, f"tcp://{node}")


def test_reuses_the_most_recently_used_idle_sandbox():
    s = ManagerState()
    s.add(rec("a"), 0)
    s.add(rec("b"), 0)
    s.release("a", None, 5)
    s.release("b", None, 7)
    got = s.reserve("f", "r1", 8)
    assert got.sandbox_id == "b" and got.state == BUSY and got.request_id == "r1"
    assert s.reserve("f", "r2", 8).sandbox_id == "a"
    assert s.reserve("f", "r3", 8) is None  # both busy: a cold start is needed


def test_release_is_idempotent_and_ignores_stale_requests():
    s = ManagerState()
    s.add(SandboxRecord("a", "f", "n1", "az1", "e", request_id="r1"), 0)
    assert s.release("a", "r1", 1)
    assert not s.release("a", "r1", 1)
    s.reserve("f", "r2", 2)
    assert not s.release("a", "r1", 3)  # a late release from r1 must not free r2's sandbox
    assert s.sandboxes["a"].state == BUSY


def test_new_sandboxes_spread_over_azs_then_hosts():
    s = ManagerState()
    first = s.choose_worker("f", WORKERS)
    s.add(rec("a", first.node_id, first.az), 0)
    second = s.choose_worker("f", WORKERS)
    assert second.az != first.az
    assert s.choose_worker("f", WORKERS, avoid={"n1", "n2", "n3"}) is None


def test_dropping_a_node_forgets_its_sandboxes_and_avoid_skips_it():
    s = ManagerState()
    s.add(rec("a", "n1"), 0)
    s.add(rec("b", "n2", "az2"), 0)
    s.release("a", None, 1)
    s.release("b", None, 2)
    assert s.reserve("f", "r", 3, avoid={"n2"}).sandbox_id == "a"
    assert [r.sandbox_id for r in s.drop_nodes(["n2"])] == ["b"]
    assert s.reserve("f", "r2", 4) is None


def test_idle_sandboxes_are_reaped_after_keep_alive_busy_ones_never():
    s = ManagerState(keep_alive_s=10)
    s.add(rec("idle"), 0)
    s.release("idle", None, 0)
    s.add(rec("busy"), 0)
    assert [r.sandbox_id for r in s.reap_idle(10.0)] == []
    assert [r.sandbox_id for r in s.reap_idle(10.1)] == ["idle"]
    assert list(s.sandboxes) == ["busy"]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "release", "add", "drop", "reap"]), st.integers(0, 5)),
                max_size=80))
def test_a_sandbox_is_never_held_by_two_invokes(ops):
    s = ManagerState(keep_alive_s=3)
    holders: dict[str, str] = {}
    now = 0.0
    for i, (op, n) in enumerate(ops):
        now += 1
        if op == "reserve":
            got = s.reserve("f", f"r{i}", now, avoid={f"n{n}"} if n > 3 else ())
            if got is not None:
                assert got.sandbox_id not in holders
                holders[got.sandbox_id] = f"r{i}"
        elif op == "release" and holders:
            sid = sorted(holders)[n % len(holders)]
            assert s.release(sid, holders.pop(sid), now)
        elif op == "add":
            sid = f"s{i}"
            s.add(SandboxRecord(sid, "f", f"n{n % 3}", f"az{n % 3}", "e", request_id=f"r{i}"), now)
            holders[sid] = f"r{i}"
        elif op == "drop":
            for r in s.drop_nodes([f"n{n % 3}"]):
                holders.pop(r.sandbox_id, None)
        else:
            for r in s.reap_idle(now):
                assert r.sandbox_id not in holders and r.state == IDLE
        busy = {sid for sid, r in s.sandboxes.items() if r.state == BUSY}
        assert busy == set(holders)
