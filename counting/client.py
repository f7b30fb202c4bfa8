"""How frontends talk to the counting service."""

from __future__ import annotations

from typing import Any

from wire import messages as m
from wire.sockets import Failover


class CountingClient:
    def __init__(self, failover: Failover):
        self.fo = failover

    async def acquire(self, tenant: str, slot_id: str, hold_s: float) -> int:
        """One concurrency slot for `slot_id`, or TooManyRequestsException. Safe to retry with the same id."""
        resp = await self.fo.call(
            m.Acquire(tenant=tenant, slot_id=slot_id, hold_s=hold_s), timeout_s=3.0, request_id=f"a-{slot_id}"
        )
        return resp.fields["in_use"]

    async def release(self, tenant: str, slot_id: str) -> int:
        resp = await self.fo.call(m.Release(tenant=tenant, slot_id=slot_id), timeout_s=3.0, request_id=f"r-{slot_id}")
        return resp.fields["in_use"]

    async def set_limit(self, tenant: str, limit: int) -> int:
        resp = await self.fo.call(m.SetLimit(tenant=tenant, limit=limit))
        return resp.fields["limit"]

    async def status(self, tenant: str | None = None) -> dict[str, Any]:
        resp = await self.fo.call(m.CountingStatus(tenant=tenant), timeout_s=2.0)
        return resp.fields
