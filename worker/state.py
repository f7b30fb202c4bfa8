"""Worker bookkeeping with no I/O: the sandboxes on this host, when an orphaned one is reaped, and the code
cache's size bound. Time is passed in; worker/service.py does the I/O these rules call for."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from wire.config import DEFAULTS
from wire.errors import (
    Reason,
    ResourceConflictException,
    ResourceNotFoundException,
    ServiceException,
)
from wire.messages import NodeView, Role, SandboxState
from wire.transport import node_endpoint

STARTING, IDLE, BUSY = SandboxState.STARTING, SandboxState.IDLE, SandboxState.BUSY


@dataclasses.dataclass
class SandboxEntry:
    sandbox_id: str
    function_key: str
    code_sha256: str
    manager: str
    state: str = STARTING
    request_id: str | None = None
    invocations: int = 0
    created: float = 0.0
    last_used: float = 0.0
    memory_mb: int = 128
    reclaimed: bool = False  # the platform destroyed it while it ran an invoke (not the function's doing)


class WorkerState:
    def __init__(self) -> None:
        self.sandboxes: dict[str, SandboxEntry] = {}

    def admit(self, entry: SandboxEntry, now: float, *, max_sandboxes: int, capacity_mb: int) -> None:
        """Take a place and the memory for a new sandbox, or refuse (WorkerFull) when the host's count or the
        sum of its sandboxes' memory limits would pass what it has."""
        if len(self.sandboxes) >= max_sandboxes:
            raise ServiceException(f"this worker is at its limit of {max_sandboxes} sandboxes",
                                   reason=Reason.WORKER_FULL)
        used = self.memory_mb()
        if used + entry.memory_mb > capacity_mb:
            raise ServiceException(
                f"this worker's sandboxes hold {used} MB of its {capacity_mb} MB; {entry.memory_mb} MB more "
                "would pass it", reason=Reason.WORKER_FULL)
        self.add(entry, now)

    def memory_mb(self) -> int:
        """The memory limits of every sandbox here (starting ones included), added up."""
        return sum(e.memory_mb for e in self.sandboxes.values())

    def add(self, entry: SandboxEntry, now: float) -> None:
        if entry.sandbox_id in self.sandboxes:
            raise ResourceConflictException(f"sandbox {entry.sandbox_id} already exists on this worker")
        entry.created = entry.last_used = now
        self.sandboxes[entry.sandbox_id] = entry

    def ready(self, sandbox_id: str) -> None:
        self.get(sandbox_id).state = IDLE

    def get(self, sandbox_id: str) -> SandboxEntry:
        entry = self.sandboxes.get(sandbox_id)
        if entry is None:
            raise ResourceNotFoundException(f"sandbox {sandbox_id} is not on this worker (reaped or never made)")
        return entry

    def begin(self, sandbox_id: str, request_id: str, now: float) -> SandboxEntry:
        """A sandbox serves one invoke at a time; a second concurrent one is refused, never interleaved."""
        entry = self.get(sandbox_id)
        if entry.state != IDLE:
            raise ResourceConflictException(f"sandbox {sandbox_id} is {entry.state}, not idle")
        entry.state = BUSY
        entry.request_id = request_id
        entry.last_used = now
        return entry

    def end(self, sandbox_id: str, now: float) -> None:
        entry = self.sandboxes.get(sandbox_id)
        if entry is not None and entry.state == BUSY:
            entry.state = IDLE
            entry.request_id = None
            entry.invocations += 1
            entry.last_used = now

    def remove(self, sandbox_id: str) -> SandboxEntry | None:
        return self.sandboxes.pop(sandbox_id, None)

    def orphans(self, live_managers: set[str]) -> list[SandboxEntry]:
        """Idle sandboxes whose manager is not among the live ones."""
        return [e for e in self.sandboxes.values() if e.state == IDLE and e.manager not in live_managers]

    def code_in_use(self) -> set[str]:
        return {e.code_sha256 for e in self.sandboxes.values()}

    def view(self) -> list[dict[str, Any]]:
        return [
            {
                "sandbox_id": e.sandbox_id,
                "function_key": e.function_key,
                "state": e.state,
                "manager": e.manager,
                "invocations": e.invocations,
                "memory_mb": e.memory_mb,
            }
            for e in self.sandboxes.values()
        ]


def live_managers(nodes: Sequence[NodeView] | None) -> set[str] | None:
    """The manager endpoints placement reports alive; None when it could not say: unreachable (None), or a view
    with no nodes at all, which no running region gives (this worker is in it)."""
    if not nodes:
        return None
    return {node_endpoint(n, "manager") for n in nodes if n.alive and Role.MANAGER in n.roles}


class OrphanWatch:
    """Sandboxes whose manager has been gone (not alive in placement) for `grace_s` are reaped: its functions
    moved to another manager, which makes its own. A sandbox's timer starts when it is first seen idle with its
    manager gone, and is forgotten only once its manager is seen alive again or the sandbox is gone (an invoke
    meanwhile does not restart it). When placement could not say who is alive nothing is reaped and no timer
    changes: a worker does not act on what it does not know."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.gone_since: dict[str, float] = {}  # sandbox id -> when it was first seen orphaned

    def to_reap(self, state: WorkerState, live: set[str] | None, now: float) -> list[SandboxEntry]:
        """The idle orphans whose grace has run out. The caller destroys them, checking each is still the same
        idle entry first (destroying one yields, and the next may have been given an invoke meanwhile); one it
        skips keeps its timer, and is returned again once idle."""
        if live is None:
            return []
        due = []
        for entry in state.orphans(live):
            since = self.gone_since.setdefault(entry.sandbox_id, now)
            if now - since >= self.grace_s:
                due.append(entry)
        for sandbox_id in list(self.gone_since):
            entry = state.sandboxes.get(sandbox_id)
            if entry is None or entry.manager in live:
                del self.gone_since[sandbox_id]
        return due


class CodeCache:
    """Unpacked code packages on this host, bounded in bytes; the least recently used unused one goes first."""

    def __init__(self, max_bytes: int = DEFAULTS.code_cache_mb * 1024 * 1024):
        self.max_bytes = max_bytes
        self.entries: dict[str, tuple[int, float]] = {}  # sha256 -> (unpacked bytes, last used)

    @property
    def used_bytes(self) -> int:
        return sum(size for size, _ in self.entries.values())

    def touch(self, sha256: str, now: float) -> bool:
        hit = self.entries.get(sha256)
        if hit is None:
            return False
        self.entries[sha256] = (hit[0], now)
        return True

    def add(self, sha256: str, size: int, now: float, in_use: set[str]) -> list[str]:
        """Record a newly unpacked package; returns the packages to delete to get back under the bound."""
        self.entries[sha256] = (size, now)
        evict: list[str] = []
        total = self.used_bytes
        for sha, (sz, _) in sorted(self.entries.items(), key=lambda kv: kv[1][1]):
            if total <= self.max_bytes:
                break
            if sha == sha256 or sha in in_use:
                continue
            evict.append(sha)
            total -= sz
        for sha in evict:
            del self.entries[sha]
        return evict
