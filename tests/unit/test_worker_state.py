import pytest

from worker.state import BUSY, IDLE, CodeCache, SandboxEntry, WorkerState
from wire.errors import ResourceConflictException, ResourceNotFoundException


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
