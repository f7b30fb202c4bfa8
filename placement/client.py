"""How nodes, managers and frontends talk to placement; plus a cached view of the live nodes."""

from __future__ import annotations

import time
from collections.abc import Iterable

from wire import messages as m
from wire.client import Failover
from wire.errors import FlintError, error_fields


class PlacementClient:
    def __init__(self, failover: Failover):
        self.fo = failover

    async def register(self, node: m.NodeInfo) -> int:
        return (await self.fo.call(m.Register(node=node), timeout_s=3.0)).incarnation

    async def heartbeat(self, node_id: str, sandboxes: int = 0, memory_used_mb: int = 0) -> int:
        msg = m.Heartbeat(node_id=node_id, sandboxes=sandboxes, memory_used_mb=memory_used_mb)
        return (await self.fo.call(msg, timeout_s=1.5)).incarnation

    async def list_nodes(self) -> m.Nodes:
        return await self.fo.call(m.ListNodes(), timeout_s=2.0)

    async def lease_worker(self, lease_id: str, manager: str, memory_mb: int, lease_s: float,
                           prefer_azs: Iterable[str] = (), avoid_nodes: Iterable[str] = (),
                           timeout_s: float = 3.0) -> m.WorkerLeaseGrant:
        return await self.fo.call(
            m.LeaseWorker(lease_id=lease_id, manager=manager, memory_mb=memory_mb, lease_s=lease_s,
                          prefer_azs=tuple(prefer_azs), avoid_nodes=tuple(avoid_nodes)),
            timeout_s=timeout_s,
        )

    async def return_lease(self, lease_id: str) -> None:
        await self.fo.call(m.ReturnWorkerLease(lease_id=lease_id), timeout_s=3.0)

    async def list_leases(self, manager: str | None = None) -> m.WorkerLeases:
        """The live worker leases (of one manager, or all) and the region's headroom (PlacementState.headroom)."""
        return await self.fo.call(m.ListWorkerLeases(manager=manager), timeout_s=2.0)

    async def report(self, node_id: str, ok: bool, incarnation: int | None = None) -> None:
        await self.fo.call(m.ReportOutcome(node_id=node_id, ok=ok, incarnation=incarnation), timeout_s=2.0)

    async def drain(self, node_id: str, draining: bool = True) -> m.Draining:
        return await self.fo.call(m.Drain(node_id=node_id, draining=draining))


class NodeView:
    """The region's nodes as placement last reported them, refreshed at most every `max_age_s`.

    When placement cannot be reached the last view stays in use (static stability): routing keeps working on
    what was known, and the failures it meets are handled where they happen.
    """

    def __init__(self, client: PlacementClient, max_age_s: float = 0.5):
        self.client = client
        self.max_age_s = max_age_s
        self.nodes: tuple[m.NodeView, ...] = ()
        self.fetched_at = 0.0
        self.last_error: dict | None = None

    async def refresh(self, force: bool = False) -> tuple[m.NodeView, ...]:
        if force or time.monotonic() - self.fetched_at > self.max_age_s:
            try:
                self.nodes = (await self.client.list_nodes()).nodes
                self.last_error = None
            except FlintError as err:
                self.last_error = error_fields(err)
            self.fetched_at = time.monotonic()
        return self.nodes

    def healthy(self, role: str) -> list[m.NodeView]:
        return [n for n in self.nodes if n.healthy and role in n.roles]

    def azs(self) -> list[str]:
        return sorted({n.az for n in self.nodes if m.Role.WORKER in n.roles})
