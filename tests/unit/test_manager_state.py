"""Worker manager state: warm reuse, leased capacity, AZ spread, draining leases, reaping."""

from hypothesis import given, settings
from hypothesis import strategies as st

from manager.state import BUSY, IDLE, HeldWorkerLease, ManagerState, SandboxRecord


def lease(lid, node, az, mb=2048, expires=10_000.0):
    return HeldWorkerLease(lid, node, az, f"tcp://{node}", mb, expires)


def sandbox(sid, key="f", node="n1", az="az1", lease_id="L1", mb=512, state=IDLE):
    return SandboxRecord(sid, key, node, az, f"tcp://{node}", state=state, lease_id=lease_id, memory_mb=mb)


def test_reuses_the_most_recently_used_idle_sandbox():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add(sandbox("a", state=BUSY), 0)
    s.add(sandbox("b", state=BUSY), 0)
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


def test_placement_fills_leased_capacity_and_never_past_it():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1", mb=1024), 0)
    assert s.place("f", 512, 0).lease_id == "L1"
    s.add(sandbox("a", key="g", mb=512), 0)
    s.add(sandbox("b", key="h", mb=512), 0)
    assert s.leases["L1"].free_mb == 0
    assert s.place("f", 512, 0) is None  # lease more first


def test_a_second_sandbox_of_a_function_goes_to_another_az():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add(sandbox("a", mb=512), 0)
    assert s.place("f", 512, 0) is None  # only az1 is leased: ask for capacity elsewhere
    assert s.wanted_azs("f", ["az1", "az2", "az3"]) == ["az2", "az3"]
    assert s.place("f", 512, 0, spread=False).lease_id == "L1"  # nowhere else to go: stacking is allowed
    s.add_lease(lease("L2", "n2", "az2"), 0)
    assert s.place("f", 512, 0).lease_id == "L2"


def test_a_lease_near_expiry_drains_and_goes_back_empty():
    s = ManagerState(drain_margin_s=60)
    s.add_lease(lease("L1", "n1", "az1", expires=100.0), 0)
    s.add(sandbox("a", mb=512), 0)
    assert s.place("g", 512, 41.0) is None  # within the drain margin: nothing new lands there
    assert [r.sandbox_id for r in s.reap_idle(41.0)] == ["a"]  # idle sandboxes on it go
    assert [lease.lease_id for lease in s.leases_to_return(41.0)] == ["L1"]


def test_empty_leases_go_back_after_five_minutes_or_at_once_where_placement_is_short():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add_lease(lease("L2", "n2", "az2"), 0)
    s.add_lease(lease("L3", "n3", "az3"), 0)
    s.add(sandbox("a", node="n3", az="az3", lease_id="L3"), 0)
    assert s.leases_to_return(10.0) == []  # empty, but only for 10 s and nobody else needs the room
    assert [x.lease_id for x in s.leases_to_return(10.0, short_azs=["az2", "az3"])] == ["L2"]  # L3 is in use
    assert [x.lease_id for x in s.leases_to_return(300.0)] == ["L1"]


def test_a_drained_host_takes_nothing_new_and_its_idle_sandboxes_and_lease_go():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add(sandbox("a", mb=512), 0)
    s.add(sandbox("b", key="g", mb=512, state=BUSY), 0)
    s.drain_nodes(["n1"])
    assert s.place("h", 512, 1) is None
    assert [r.sandbox_id for r in s.reap_idle(1)] == ["a"]  # the busy one finishes first
    assert s.leases_to_return(1) == []
    s.release("b", None, 2)
    s.reap_idle(2)
    assert [lease.lease_id for lease in s.leases_to_return(2)] == ["L1"]


def test_dropping_a_node_or_a_lease_forgets_its_sandboxes():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add_lease(lease("L2", "n2", "az2"), 0)
    s.add(sandbox("a", node="n1", lease_id="L1"), 0)
    s.add(sandbox("b", node="n2", az="az2", lease_id="L2"), 0)
    assert s.reserve("f", "r", 3, avoid={"n2"}).sandbox_id == "a"
    assert [r.sandbox_id for r in s.drop_lease("L2")] == ["b"]
    assert s.reserve("f", "r2", 4) is None


def test_idle_sandboxes_are_reaped_after_keep_alive_busy_ones_never():
    s = ManagerState(keep_alive_s=10)
    s.add(sandbox("idle"), 0)
    s.add(sandbox("busy", state=BUSY), 0)
    assert [r.sandbox_id for r in s.reap_idle(10.0)] == []
    assert [r.sandbox_id for r in s.reap_idle(10.1)] == ["idle"]
    assert list(s.sandboxes) == ["busy"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "release", "create", "drop", "reap", "lease"]),
                          st.integers(0, 5)), max_size=100))
def test_capacity_is_never_exceeded_and_no_sandbox_serves_two_invokes(ops):
    s = ManagerState(keep_alive_s=3)
    holders: dict[str, str] = {}
    now = 0.0
    for i, (op, n) in enumerate(ops):
        now += 1
        key = f"f{n % 3}"
        if op == "reserve":
            got = s.reserve(key, f"r{i}", now)
            if got is not None:
                assert got.sandbox_id not in holders
                holders[got.sandbox_id] = f"r{i}"
        elif op == "release" and holders:
            sid = sorted(holders)[n % len(holders)]
            assert s.release(sid, holders.pop(sid), now)
        elif op == "create":
            target = s.place(key, 256 * (n + 1), now, spread=n % 2 == 0)
            if target is not None:
                assert target.free_mb >= 256 * (n + 1) and target.expires_at - now > s.drain_margin_s
                s.add(SandboxRecord(f"s{i}", key, target.node_id, target.az, target.endpoint, state=BUSY,
                                    request_id=f"r{i}", lease_id=target.lease_id, memory_mb=256 * (n + 1)), now)
                holders[f"s{i}"] = f"r{i}"
        elif op == "drop":
            for r in s.drop_lease(f"L{n}"):
                holders.pop(r.sandbox_id, None)
        elif op == "lease":
            s.add_lease(lease(f"L{n}", f"n{n}", f"az{n % 3}", mb=2048, expires=now + 200), now)
        else:
            for r in s.reap_idle(now):
                assert r.sandbox_id not in holders and r.state == IDLE
        for lease_id, lr in s.leases.items():
            used = sum(r.memory_mb for r in s.sandboxes.values() if r.lease_id == lease_id)
            assert lr.used_mb == used <= lr.memory_mb  # capacity is never exceeded
        assert {sid for sid, r in s.sandboxes.items() if r.state == BUSY} == set(holders)


def test_a_request_id_is_started_by_one_attempt_only_until_it_is_known_not_to_have_run():
    s = ManagerState()
    assert s.claim("r1", "a1", 0.0)
    assert s.claim("r1", "a1", 0.1)  # the same handling going round again (a stale sandbox): fine
    assert not s.claim("r1", "a2", 0.2)  # a client's retry through another frontend: a1 may have run it
    s.unclaim("r1", "a2")  # only its own claim can be dropped
    assert not s.claim("r1", "a2", 0.3)
    s.unclaim("r1")  # a1's request never reached the host: nothing ran
    assert s.claim("r1", "a2", 0.4)
    assert s.claim("r2", "b1", 0.5) and s.claim("r3", "c1", 2000.0)  # long after, r1 and r2 are forgotten
    assert set(s.started) == {"r3"}


def test_a_revoked_lease_lets_its_busy_sandboxes_finish_then_retires_them():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add(sandbox("idle", node="n1", lease_id="L1"), 0)
    s.add(sandbox("busy", node="n1", lease_id="L1"), 0)
    assert s.reserve("f", "r1", 1).sandbox_id == "busy"
    assert [r.sandbox_id for r in s.drop_lease("L1")] == ["idle"]  # destroyed now
    assert s.sandboxes["busy"].retired and s.reserve("f", "r2", 2) is None  # it serves nothing new ...
    assert s.release("busy", "r1", 3) and "busy" not in s.sandboxes  # ... and goes when its invoke ends


def test_a_stopping_manager_gives_back_its_idle_sandboxes_and_the_leases_nothing_runs_on():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1"), 0)
    s.add_lease(lease("L2", "n2", "az2"), 0)
    s.add(sandbox("idle", node="n1", lease_id="L1"), 0)
    s.add(sandbox("busy", node="n2", az="az2", lease_id="L2"), 0)
    assert s.reserve("f", "r1", 1, avoid={"n1"}).sandbox_id == "busy"
    idle, leases = s.hand_back()
    assert [r.sandbox_id for r in idle] == ["idle"] and [lease.lease_id for lease in leases] == ["L1"]
    assert list(s.leases) == ["L2"] and list(s.sandboxes) == ["busy"]  # what runs keeps its lease to the end


def test_a_tenants_memory_cap_takes_its_idle_sandboxes_first_and_never_anothers():
    s = ManagerState()
    s.add_lease(lease("L1", "n1", "az1", mb=10_000), 0)
    for i, (key, busy) in enumerate([("t/f/$LATEST/a", False), ("t/g/$LATEST/b", False), ("t/f/$LATEST/a", True),
                                     ("u/f/$LATEST/c", False)]):
        s.add(SandboxRecord(f"s{i}", key, "n1", "az1", "tcp://n1", state=BUSY if busy else IDLE, lease_id="L1",
                            memory_mb=512, last_used=i), i)
    assert [r.sandbox_id for r in s.make_room("t", 512, cap_mb=1536)] == ["s0"]  # its least recently used idle one
    assert [r.sandbox_id for r in s.make_room("t", 1024, cap_mb=1536)] == ["s1"]
    assert s.make_room("t", 2048, cap_mb=1536) is None  # its running sandbox alone leaves no room: refused ...
    assert set(s.sandboxes) == {"s2", "s3"}  # ... and nothing more taken; the other tenant's sandbox untouched
    assert s.make_room("u", 512, cap_mb=1024) == []  # room already
