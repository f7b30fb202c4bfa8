"""Counting service: the concurrency ledger behind the `counting` Raft group.

Every decision is a replicated command (leases, limits, reservations). After a command that needs holders to
give credits back, the replica that proposed it pushes a revision to those frontends.
"""

from __future__ import annotations

import asyncio

import structlog

from counting.state import Ledger
from nodes.runtime import Runtime
from wire import messages as m
from wire.errors import FlintError, PeerUnavailable, ServiceException
from wire.raft import RaftGroup
from wire.sockets import Request

log = structlog.get_logger("counting")


class CountingService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._background: set[asyncio.Task] = set()

    @property
    def group(self) -> RaftGroup:
        """This node's counting replica; it can be removed at run time, so it is looked up per request."""
        group = self.rt.groups.get("counting")
        if group is None:
            raise PeerUnavailable(f"node {self.rt.node_id} holds no counting replica", reason="NotAReplica")
        return group

    async def run(self) -> None:
        server = self.rt.server(
            "counting",
            {
                m.LeaseCredits: self.rt.at_leader("counting", "counting", self.lease),
                m.ReleaseLease: self.rt.at_leader("counting", "counting", self.release_lease),
                m.SetLimit: self.rt.at_leader("counting", "counting", self.set_limit),
                m.SetReserved: self.rt.at_leader("counting", "counting", self.set_reserved),
                m.CountingStatus: self.status,
                m.CountingMembers: self.members,
                m.ChangeMembers: self.rt.at_leader("counting", "counting", self.change_members),
            },
        )
        await server.serve()

    async def _commit(self, req: Request, op: str, args: dict) -> dict:
        return await self.group.submit(op, args, request_id=req.id, timeout_s=req.remaining_s(3))

    async def lease(self, req: Request) -> dict:
        grant = await self._commit(req, "lease", req.msg.to_fields())
        self._push(grant.get("revise", ()), req.msg.tenant)
        return grant

    async def release_lease(self, req: Request) -> dict:
        return await self._commit(req, "release", {"lease_id": req.msg.lease_id, "in_use": req.msg.in_use})

    async def set_limit(self, req: Request) -> dict:
        out = await self._commit(req, "set_limit", {"tenant": req.msg.tenant, "limit": req.msg.limit})
        self._push(out["revise"], req.msg.tenant)
        log.info("counting.limit_set", tenant=req.msg.tenant, limit=req.msg.limit)
        return {"limit": out["limit"]}

    async def set_reserved(self, req: Request) -> dict:
        msg = req.msg
        out = await self._commit(req, "set_reserved",
                                 {"tenant": msg.tenant, "function": msg.function, "reserved": msg.reserved})
        self._push(out["revise"], msg.tenant)
        log.info("counting.reserved_set", tenant=msg.tenant, function=msg.function, reserved=msg.reserved)
        return {"reserved": out["reserved"]}

    async def status(self, req: Request) -> dict:
        now = self.rt.now()
        with self.group.machine.read() as ledger:
            ledger: Ledger
            tenants = [req.msg.tenant] if req.msg.tenant else sorted(
                set(ledger.limits) | set(ledger.reserved) | {lease.tenant for lease in ledger.leases.values()}
            )
            leases = [
                {
                    "lease_id": lease.lease_id, "holder": lease.holder, "tenant": lease.tenant,
                    "pool": lease.pool or "(unreserved)", "credits": lease.credits, "in_use": lease.in_use,
                    "demand": lease.demand, "target": lease.target,
                    "expires_in_s": round(lease.expires_at - now, 2), "free_in_s": round(lease.free_at - now, 2),
                }
                for lease in ledger.leases.values()
                if lease.tenant in tenants and lease.free_at > now
            ]
            return {
                "tenants": {t: ledger.tenant_view(t, now) for t in tenants},
                "lease_details": leases,
                "leases": len(ledger.leases),
                "digest": ledger.digest(),
                "raft": self.group.status(),
            }

    async def members(self, req: Request) -> dict:
        return {"members": self.group.members(), "self": self.group.config.self_address}

    async def change_members(self, req: Request) -> dict:
        """Runs at the leader. Removing the leader itself first hands leadership to a caught-up follower."""
        group = self.group
        action, address = req.msg.action, req.msg.address
        if action == "remove" and address == group.config.self_address:
            # the leader leaving: hand over, then let the new leader remove us (it can see that commit; we cannot)
            if group.is_leader:
                await group.hand_over(timeout_s=min(5.0, req.remaining_s(10)))
            leader = group.leader_host()
            if leader is None:
                raise ServiceException("no other counting leader to hand over to; retry in a moment")
            resp = await self.rt.pool.call(self.rt.config.endpoint("counting", leader), req.msg,
                                           request_id=f"{req.id}~", timeout_s=req.remaining_s(10))
            return resp.fields
        await group.change(action, address, timeout_s=req.remaining_s(10))
        log.info("counting.members_changed", action=action, member=address)
        return {"members": group.members()}

    def _push(self, endpoints, tenant: str) -> None:
        for endpoint in endpoints:
            task = asyncio.get_running_loop().create_task(self._revise(endpoint, tenant))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _revise(self, endpoint: str, tenant: str) -> None:
        try:
            await self.rt.pool.call(endpoint, m.Revise(tenant=tenant), timeout_s=1.0)
        except FlintError:
            pass  # a holder that cannot hear us renews on its own within half a lease
