"""How frontends and operators talk to the counting service (any control node; followers forward to the leader)."""

from __future__ import annotations

from wire import messages as m
from wire.client import Failover


class CountingClient:
    def __init__(self, failover: Failover):
        self.fo = failover

    async def lease(self, request: m.LeaseCredits) -> m.CreditGrant:
        """Take or renew a credit lease (counting.state.Ledger.cmd_lease). Safe to retry: the request id is reused."""
        return await self.fo.call(request, timeout_s=3.0)

    async def release_lease(self, lease_id: str, in_use: int = 0) -> None:
        await self.fo.call(m.ReleaseCreditLease(lease_id=lease_id, in_use=in_use), timeout_s=3.0)

    async def set_limit(self, tenant: str, limit: int) -> int:
        return (await self.fo.call(m.SetLimit(tenant=tenant, limit=limit))).limit

    async def set_reserved(self, tenant: str, function: str, reserved: int | None) -> int | None:
        return (await self.fo.call(m.SetReserved(tenant=tenant, function=function, reserved=reserved))).reserved

    async def status(self, tenant: str | None = None) -> m.CountingStatusReply:
        return await self.fo.call(m.CountingStatus(tenant=tenant), timeout_s=2.0)

    async def tenant(self, tenant: str) -> m.TenantConcurrency | None:
        """One tenant's limits and pools as the ledger sees them (None if it never had any)."""
        return (await self.status(tenant)).tenants.get(tenant)

