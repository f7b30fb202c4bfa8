"""Worker manager: which sandboxes exist for each function and whether they are idle or busy. No I/O.

Soft state: after a restart the service rebuilds it from the workers' own lists (`adopt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

DEFAULT_KEEP_ALIVE_S = 600.0

IDLE, BUSY = "idle", "busy"


@dataclasses.dataclass
class SandboxRecord:
    sandbox_id: str
    function_key: str
    node_id: str
    az: str
    endpoint: str  # the worker service to run invokes on
    state: str = BUSY
    request_id: str | None = None  # the invoke holding it while busy
    last_used: float = 0.0
    invocations: int = 0


@dataclasses.dataclass(frozen=True)
class WorkerCandidate:
    node_id: str
    az: str
    endpoint: str
    sandboxes: int = 0  # all sandboxes on the host, any manager's


class ManagerState:
    def __init__(self, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S):
        self.keep_alive_s = keep_alive_s
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.pools: dict[str, dict[str, SandboxRecord]] = {}  # function key -> sandbox id -> record

    def reserve(self, function_key: str, request_id: str, now: float, avoid: Iterable[str] = ()) -> SandboxRecord | None:
        """Hand the most recently used idle sandbox of this function to `request_id`, or None (cold start)."""
        avoid = set(avoid)
        best: SandboxRecord | None = None
        for record in self.pools.get(function_key, {}).values():
            if record.state == IDLE and record.node_id not in avoid:
                if best is None or record.last_used > best.last_used:
                    best = record
        if best is not None:
            best.state = BUSY
            best.request_id = request_id
            best.last_used = now
        return best

    def choose_worker(
        self, function_key: str, candidates: Iterable[WorkerCandidate], avoid: Iterable[str] = ()
    ) -> WorkerCandidate | None:
        """Where a new sandbox of this function goes: the AZ where the function has fewest sandboxes, then the
        host where it has fewest (mixing functions on a host), then the least loaded host."""
        avoid = set(avoid)
        pool = self.pools.get(function_key, {}).values()
        per_az: dict[str, int] = {}
        per_node: dict[str, int] = {}
        for record in pool:
            per_az[record.az] = per_az.get(record.az, 0) + 1
            per_node[record.node_id] = per_node.get(record.node_id, 0) + 1
        options = [c for c in candidates if c.node_id not in avoid]
        if not options:
            return None
        return min(
            options, key=lambda c: (per_az.get(c.az, 0), per_node.get(c.node_id, 0), c.sandboxes, c.node_id)
        )

    def add(self, record: SandboxRecord, now: float) -> None:
        record.last_used = now
        self.sandboxes[record.sandbox_id] = record
        self.pools.setdefault(record.function_key, {})[record.sandbox_id] = record

    def release(self, sandbox_id: str, request_id: str, now: float) -> bool:
        """The invoke `request_id` is done with the sandbox. Idempotent: a second release is a no-op.
        A busy sandbox adopted after a restart has no known request id; any release frees it."""
        record = self.sandboxes.get(sandbox_id)
        if record is None or record.state != BUSY:
            return False
        if record.request_id is not None and record.request_id != request_id:
            return False  # a stale release from an earlier invoke; the sandbox is busy with another
        record.state = IDLE
        record.request_id = None
        record.last_used = now
        record.invocations += 1
        return True

    def remove(self, sandbox_id: str) -> SandboxRecord | None:
        record = self.sandboxes.pop(sandbox_id, None)
        if record is not None:
            pool = self.pools.get(record.function_key, {})
            pool.pop(sandbox_id, None)
            if not pool:
                self.pools.pop(record.function_key, None)
        return record

    def drop_nodes(self, node_ids: Iterable[str]) -> list[SandboxRecord]:
        """Forget every sandbox on these hosts (dead or unhealthy)."""
        node_ids = set(node_ids)
        gone = [r for r in self.sandboxes.values() if r.node_id in node_ids]
        for record in gone:
            self.remove(record.sandbox_id)
        return gone

    def reap_idle(self, now: float) -> list[SandboxRecord]:
        """Idle sandboxes past the keep-alive: removed here, to be destroyed on their workers by the caller."""
        expired = [r for r in self.sandboxes.values() if r.state == IDLE and now - r.last_used > self.keep_alive_s]
        for record in expired:
            self.remove(record.sandbox_id)
        return expired

    def adopt(self, record: SandboxRecord, now: float) -> None:
        """Take over a sandbox a worker reports after a manager restart; it is idle unless a worker says busy."""
        if record.sandbox_id not in self.sandboxes:
            self.add(record, now)

    def summary(self) -> dict[str, Any]:
        busy = sum(1 for r in self.sandboxes.values() if r.state == BUSY)
        return {"sandboxes": len(self.sandboxes), "busy": busy, "idle": len(self.sandboxes) - busy,
                "functions": len(self.pools)}
