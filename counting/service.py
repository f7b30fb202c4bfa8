"""Counting service: the concurrency ledger, one command per acquire or release through the `counting` group."""

from __future__ import annotations

import structlog

from counting.state import CountingState
from nodes.runtime import Runtime
from wire import messages as m
from wire.raft import RaftGroup
from wire.sockets import Request

log = structlog.get_logger("counting")


class CountingService:
    def __init__(self, rt: Runtime, group: RaftGroup):
        self.rt = rt
        self.group = group

    async def run(self) -> None:
        server = self.rt.server(
            "counting",
            {m.Acquire: self.acquire, m.Release: self.release, m.SetLimit: self.set_limit, m.CountingStatus: self.status},
        )
        await server.serve()

    async def acquire(self, req: Request) -> dict:
        msg = req.msg
        in_use = await self.group.submit(
            "acquire",
            {"tenant": msg.tenant, "slot_id": msg.slot_id, "hold_s": msg.hold_s},
            request_id=req.id,
            timeout_s=req.remaining_s(3),
        )
        return {"in_use": in_use}

    async def release(self, req: Request) -> dict:
        in_use = await self.group.submit(
            "release", {"tenant": req.msg.tenant, "slot_id": req.msg.slot_id}, request_id=req.id,
            timeout_s=req.remaining_s(3),
        )
        return {"in_use": in_use}

    async def set_limit(self, req: Request) -> dict:
        limit = await self.group.submit(
            "set_limit", {"tenant": req.msg.tenant, "limit": req.msg.limit}, request_id=req.id,
            timeout_s=req.remaining_s(3),
        )
        log.info("counting.limit_set", tenant=req.msg.tenant, limit=limit)
        return {"limit": limit}

    async def status(self, req: Request) -> dict:
        now = self.rt.now()
        with self.group.machine.read() as state:
            state: CountingState
            tenants = [req.msg.tenant] if req.msg.tenant else sorted(set(state.limits) | set(state.slots))
            return {
                "tenants": {t: {"limit": state.limit(t), "in_use": state.in_use(t, now)} for t in tenants},
                "raft": self.group.status(),
            }
