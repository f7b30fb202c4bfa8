import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from wire.errors import ResourceConflictException, ResourceNotFoundException
from wire.messages import NodeView
from worker.state import BUSY, IDLE, STARTING, CodeCache, OrphanWatch, SandboxEntry, WorkerState, live_managers


def test_one_invoke_at_a_time_per_sandbox():
    s = WorkerState()
    s.add(SandboxEntry("a", "f", "sha", "m"), 0)
    with pytest.raises(ResourceConflictException, match="starting"):
        s.begin("a", "r0", 0)
    s.ready("a")
    s.begin("a", "r1", 1)
    with pytest.raises(ResourceConflictException, match="busy"):
        s.begin("a", "r2", 1)
    s.end("a", 2)
    assert s.get("a").state == IDLE and s.get("a").invocations == 1
    assert s.begin("a", "r3", 3).state == BUSY


def test_unknown_sandbox_is_not_found():
    with pytest.raises(ResourceNotFoundException):
        WorkerState().begin("ghost", "r", 0)


def test_code_cache_evicts_least_recently_used_unused_packages():
    c = CodeCache(max_bytes=100)
    assert c.add("a", 40, 0, set()) == []
    assert c.add("b", 40, 1, set()) == []
    c.touch("a", 2)
    assert c.add("c", 40, 3, set()) == ["b"]  # b is older than a
    assert c.add("d", 40, 4, in_use={"a", "c"}) == []  # nothing evictable: in use beats the bound
    assert c.used_bytes == 120


# --- orphans: sandboxes whose manager is gone ----------------------------------------------------------------------

MANAGERS = ("tcp://10.0.0.1:7003", "tcp://10.0.0.2:7003")
GRACE_S = 10.0


def node(address: str, alive: bool, roles: tuple[str, ...] = ("manager", "worker")) -> NodeView:
    return NodeView(node_id=address, az="az1", address=address, ports={"manager": 7003}, alive=alive, roles=roles)


def test_live_managers_from_the_placement_view():
    nodes = [node("10.0.0.1", True), node("10.0.0.2", False), node("10.0.0.3", True, roles=("worker",))]
    assert live_managers(nodes) == {"tcp://10.0.0.1:7003"}
    assert live_managers(None) is None  # placement unreachable
    assert live_managers([]) is None  # a view with no nodes says nothing, not "every manager is dead"


def test_an_idle_orphan_is_reaped_once_its_grace_has_run_out():
    s, watch = WorkerState(), OrphanWatch(GRACE_S)
    s.add(SandboxEntry("a", "f", "sha", MANAGERS[0]), 0)
    s.ready("a")
    assert watch.to_reap(s, set(), 1.0) == []  # the timer starts here
    assert watch.to_reap(s, None, 20.0) == []  # placement unreachable: nothing, whatever the time
    assert watch.to_reap(s, set(), 10.5) == []
    assert [e.sandbox_id for e in watch.to_reap(s, set(), 11.0)] == ["a"]


def test_a_manager_seen_alive_again_restarts_the_grace():
    s, watch = WorkerState(), OrphanWatch(GRACE_S)
    s.add(SandboxEntry("a", "f", "sha", MANAGERS[0]), 0)
    s.ready("a")
    watch.to_reap(s, set(), 0.0)
    watch.to_reap(s, {MANAGERS[0]}, 5.0)
    assert watch.to_reap(s, set(), 6.0) == [] and watch.to_reap(s, set(), 15.0) == []
    assert watch.to_reap(s, set(), 16.0) != []


def test_a_sandbox_the_reaper_skipped_keeps_its_timer():
    s, watch = WorkerState(), OrphanWatch(GRACE_S)
    s.add(SandboxEntry("a", "f", "sha", MANAGERS[0]), 0)
    s.ready("a")
    watch.to_reap(s, set(), 0.0)
    assert [e.sandbox_id for e in watch.to_reap(s, set(), 10.0)] == ["a"]
    s.begin("a", "r", 10.0)  # given an invoke before the reaper got to it: not destroyed
    s.end("a", 10.5)
    assert [e.sandbox_id for e in watch.to_reap(s, set(), 11.0)] == ["a"]  # no second grace


def test_an_invoke_does_not_restart_the_grace():
    s, watch = WorkerState(), OrphanWatch(GRACE_S)
    s.add(SandboxEntry("a", "f", "sha", MANAGERS[0]), 0)
    s.ready("a")
    watch.to_reap(s, set(), 0.0)
    s.begin("a", "r", 1.0)
    assert watch.to_reap(s, set(), 12.0) == []  # busy: never reaped
    s.end("a", 12.5)
    assert [e.sandbox_id for e in watch.to_reap(s, set(), 13.0)] == ["a"]


class OrphanReaping(RuleBasedStateMachine):
    """The worker's reaper against managers that come and go, sandboxes made, used and destroyed, time passing
    and placement unreachable at times. The model keeps, from what each of the reaper's checks saw, since when
    a sandbox's manager has been gone, and when it was first seen idle since then; the rule is held to both."""

    def __init__(self) -> None:
        super().__init__()
        self.state = WorkerState()
        self.watch = OrphanWatch(GRACE_S)
        self.now = 0.0
        self.live = set(MANAGERS)
        self.reachable = True
        self.ids = itertools.count()
        self.gone_since: dict[str, float] = {}  # its manager not alive at any check since
        self.idle_orphan_since: dict[str, float] = {}  # first check since then that saw it idle

    def pick(self, i: int) -> str:
        return sorted(self.state.sandboxes)[i % len(self.state.sandboxes)]

    @rule(manager=st.sampled_from(MANAGERS))
    def manager_dies(self, manager):
        self.live.discard(manager)

    @rule(manager=st.sampled_from(MANAGERS))
    def manager_comes_back(self, manager):
        self.live.add(manager)

    @rule(reachable=st.booleans())
    def placement_reachable(self, reachable):
        self.reachable = reachable

    @rule(dt=st.one_of(st.sampled_from([GRACE_S / 2, GRACE_S]), st.floats(min_value=0.0, max_value=GRACE_S * 1.5)))
    def time_passes(self, dt):
        self.now += dt

    @rule(manager=st.sampled_from(MANAGERS))
    def sandbox_created(self, manager):
        self.state.add(SandboxEntry(f"s{next(self.ids)}", "f", "sha", manager), self.now)

    @precondition(lambda self: self.state.sandboxes)
    @rule(i=st.integers(min_value=0))
    def sandbox_moves_on(self, i):
        """starting -> idle, idle -> busy (an invoke begins), busy -> idle (it ends)"""
        sandbox_id = self.pick(i)
        entry = self.state.get(sandbox_id)
        if entry.state == STARTING:
            self.state.ready(sandbox_id)
        elif entry.state == IDLE:
            self.state.begin(sandbox_id, "r", self.now)
        else:
            self.state.end(sandbox_id, self.now)

    @precondition(lambda self: self.state.sandboxes)
    @rule(i=st.integers(min_value=0))
    def sandbox_destroyed(self, i):
        self.state.remove(self.pick(i))

    @rule(race=st.booleans())
    def reaper_checks(self, race):
        """One pass of the worker's reaper; with `race`, the first sandbox due runs an invoke before the reaper
        gets to it (an earlier discard yielded): the reaper's re-check skips it, and it is idle again after."""
        live = set(self.live) if self.reachable else None
        timers = dict(self.watch.gone_since)
        due = self.watch.to_reap(self.state, live, self.now)
        if live is None:
            assert due == [], "reaped while placement could not say who is alive"
            assert self.watch.gone_since == timers, "a timer moved while placement could not say who is alive"
            return
        self._saw(live)
        due_ids = {e.sandbox_id for e in due}
        for entry in due:
            assert self.state.sandboxes.get(entry.sandbox_id) is entry, "reaped a sandbox that is not here"
            assert entry.state == IDLE, f"reaped a {entry.state} sandbox"
            assert entry.manager not in live, "reaped a sandbox whose manager is alive"
            assert self.now - self.gone_since[entry.sandbox_id] >= GRACE_S, "reaped before its manager was gone long"
            assert self.now - self.idle_orphan_since[entry.sandbox_id] >= GRACE_S, "reaped before the grace ran out"
        for sandbox_id, since in self.idle_orphan_since.items():
            if self.state.sandboxes[sandbox_id].state == IDLE and self.now - since >= GRACE_S:
                assert sandbox_id in due_ids, "an idle orphan outlived its grace"
        assert set(self.watch.gone_since) <= set(self.idle_orphan_since), "a timer outlived its sandbox or orphanhood"
        for entry in due:
            if race and entry is due[0]:
                self.state.begin(entry.sandbox_id, "r", self.now)
            if self.state.sandboxes.get(entry.sandbox_id) is entry and entry.state == IDLE:  # as the service does
                self.state.remove(entry.sandbox_id)
        if race and due:
            self.state.end(due[0].sandbox_id, self.now)

    def _saw(self, live: set[str]) -> None:
        for sandbox_id in [s for s in self.gone_since if s not in self.state.sandboxes]:
            del self.gone_since[sandbox_id]
            self.idle_orphan_since.pop(sandbox_id, None)
        for sandbox_id, entry in self.state.sandboxes.items():
            if entry.manager in live:
                self.gone_since.pop(sandbox_id, None)
                self.idle_orphan_since.pop(sandbox_id, None)
                continue
            self.gone_since.setdefault(sandbox_id, self.now)
            if entry.state == IDLE:
                self.idle_orphan_since.setdefault(sandbox_id, self.now)


OrphanReaping.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestOrphanReaping = OrphanReaping.TestCase


def test_a_host_never_takes_more_sandboxes_or_memory_than_it_has():
    from wire.errors import ServiceException

    s = WorkerState()
    s.admit(SandboxEntry("a", "k", "c", "m", memory_mb=1024), 0, max_sandboxes=3, capacity_mb=2048)
    s.admit(SandboxEntry("b", "k", "c", "m", memory_mb=1024), 0, max_sandboxes=3, capacity_mb=2048)
    with pytest.raises(ServiceException, match="2048 MB") as full:
        s.admit(SandboxEntry("c", "k", "c", "m", memory_mb=128), 0, max_sandboxes=3, capacity_mb=2048)
    assert full.value.reason == "WorkerFull" and set(s.sandboxes) == {"a", "b"}
    s.remove("b")
    s.admit(SandboxEntry("c", "k", "c", "m", memory_mb=128), 0, max_sandboxes=2, capacity_mb=2048)
    with pytest.raises(ServiceException, match="limit of 2 sandboxes"):
        s.admit(SandboxEntry("d", "k", "c", "m", memory_mb=128), 0, max_sandboxes=2, capacity_mb=2048)
