"""How nodes, managers and frontends talk to placement; plus a cached view of the live nodes."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from wire import messages as m
from wire.errors import FlintError
from wire.sockets import Failover


class PlacementClient:
    def __init__(self, failover: Failover):
        self.fo = failover

    async def register(self, node: m.NodeInfo) -> int:
        resp = await self.fo.call(m.Register(node=node), timeout_s=3.0)
        return resp.fields["incarnation"]

    async def heartbeat(self, node_id: str, sandboxes: int = 0, memory_used_mb: int = 0) -> int:
        resp = await self.fo.call(
            m.Heartbeat(node_id=node_id, sandboxes=sandboxes, memory_used_mb=memory_used_mb), timeout_s=1.5
        )
        return resp.fields["incarnation"]

    async def list_nodes(self) -> list[dict[str, Any]]:
        resp = await self.fo.call(m.ListNodes(), timeout_s=2.0)
        return resp.fields["nodes"]

    async def lease_worker(self, lease_id: str, manager: str, memory_mb: int, lease_s: float,
                           prefer_azs: Iterable[str] = (), avoid_nodes: Iterable[str] = (),
                           timeout_s: float = 3.0) -> dict[str, Any]:
        resp = await self.fo.call(
            m.LeaseWorker(lease_id=lease_id, manager=manager, memory_mb=memory_mb, lease_s=lease_s,
                          prefer_azs=tuple(prefer_azs), avoid_nodes=tuple(avoid_nodes)),
            timeout_s=timeout_s,
        )
        return resp.fields

    async def return_lease(self, lease_id: str) -> None:
        await self.fo.call(m.ReturnLease(lease_id=lease_id), timeout_s=3.0)

    async def list_leases(self, manager: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The live leases (of one manager, or all) and the region's headroom (PlacementState.headroom)."""
        resp = await self.fo.call(m.ListLeases(manager=manager), timeout_s=2.0)
        return resp.fields["leases"], resp.fields.get("headroom", {})

    async def report(self, node_id: str, ok: bool, incarnation: int | None = None) -> None:
        await self.fo.call(m.ReportOutcome(node_id=node_id, ok=ok, incarnation=incarnation), timeout_s=2.0)

    async def drain(self, node_id: str, draining: bool = True) -> dict[str, Any]:
        return (await self.fo.call(m.Drain(node_id=node_id, draining=draining))).fields


class NodeView:
    """The region's nodes as placement last reported them, refreshed at most every `max_age_s`.

    When placement cannot be reached the last view stays in use (static stability): routing keeps working on
    what was known, and the failures it meets are handled where they happen.
    """

    def __init__(self, client: PlacementClient, max_age_s: float = 0.5):
        self.client = client
        self.max_age_s = max_age_s
        self.nodes: list[dict[str, Any]] = []
        self.fetched_at = 0.0
        self.last_error: str | None = None

    async def refresh(self, force: bool = False) -> list[dict[str, Any]]:
        if force or time.monotonic() - self.fetched_at > self.max_age_s:
            try:
                self.nodes = await self.client.list_nodes()
                self.last_error = None
            except FlintError as err:
                self.last_error = str(err)
            self.fetched_at = time.monotonic()
        return self.nodes

    def healthy(self, role: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n["healthy"] and role in n["roles"]]

    def by_id(self, node_id: str) -> dict[str, Any] | None:
        return next((n for n in self.nodes if n["node_id"] == node_id), None)

    def azs(self) -> list[str]:
        return sorted({n["az"] for n in self.nodes if "worker" in n["roles"]})
