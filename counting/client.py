"""How frontends and operators talk to the counting service (any control node; followers forward to the leader)."""

from __future__ import annotations

from typing import Any

from wire import messages as m
from wire.sockets import Failover


class CountingClient:
    def __init__(self, failover: Failover):
        self.fo = failover

    async def lease(self, **fields: Any) -> dict[str, Any]:
        """Take or renew a lease (see counting.state.Ledger.cmd_lease). Safe to retry: the request id is reused."""
        resp = await self.fo.call(m.LeaseCredits(**fields), timeout_s=3.0)
        return resp.fields

    async def release_lease(self, lease_id: str, in_use: int = 0) -> None:
        await self.fo.call(m.ReleaseLease(lease_id=lease_id, in_use=in_use), timeout_s=3.0)

    async def set_limit(self, tenant: str, limit: int) -> int:
        resp = await self.fo.call(m.SetLimit(tenant=tenant, limit=limit))
        return resp.fields["limit"]

    async def set_reserved(self, tenant: str, function: str, reserved: int | None) -> int | None:
        resp = await self.fo.call(m.SetReserved(tenant=tenant, function=function, reserved=reserved))
        return resp.fields["reserved"]

    async def status(self, tenant: str | None = None) -> dict[str, Any]:
        resp = await self.fo.call(m.CountingStatus(tenant=tenant), timeout_s=2.0)
        return resp.fields
