"""Counting service: the concurrency ledger behind the `counting` Raft group.

Every decision is a replicated command (leases, limits, reservations). After a command that needs holders to
give credits back, the replica that proposed it pushes a revision to those frontends.
"""

from __future__ import annotations

import structlog

from counting.state import Ledger
from wire import messages as m
from wire.errors import FlintError, PeerUnavailable, Reason, ServiceException, error_fields
from wire.host import Host
from wire.raft import RaftGroup
from wire.server import Request
from wire.tasks import Background

log = structlog.get_logger("counting")


class CountingService:
    def __init__(self, host: Host):
        self.host = host
        self._background = Background("counting")

    @property
    def group(self) -> RaftGroup:
        """This node's counting replica; it can be removed at run time, so it is looked up per request."""
        group = self.host.groups.get("counting")
        if group is None:
            raise PeerUnavailable(f"node {self.host.node_id} holds no counting replica", reason=Reason.NOT_A_REPLICA)
        return group

    async def run(self) -> None:
        server = self.host.server(
            "counting",
            {
                m.LeaseCredits: self.host.at_leader("counting", "counting", self.lease),
                m.ReleaseCreditLease: self.host.at_leader("counting", "counting", self.release_lease),
                m.SetLimit: self.host.at_leader("counting", "counting", self.set_limit),
                m.SetReserved: self.host.at_leader("counting", "counting", self.set_reserved),
                m.CountingStatus: self.status,
                m.CountingMembers: self.members,
                m.ChangeMembers: self.host.at_leader("counting", "counting", self.change_members),
            },
        )
        await server.serve()

    async def _commit(self, req: Request, op: str, args: dict) -> dict:
        return await self.group.submit(op, args, request_id=req.id, timeout_s=req.remaining_s(3))

    async def lease(self, req: Request) -> m.CreditGrant:
        grant = await self._commit(req, "lease", req.msg.to_fields())
        self._push(grant.pop("revise", ()), req.msg.tenant)
        return m.CreditGrant.from_fields(grant)

    async def release_lease(self, req: Request) -> m.Released:
        out = await self._commit(req, "release", {"lease_id": req.msg.lease_id, "in_use": req.msg.in_use})
        return m.Released(released=out["released"])

    async def set_limit(self, req: Request) -> m.LimitSet:
        out = await self._commit(req, "set_limit", {"tenant": req.msg.tenant, "limit": req.msg.limit})
        self._push(out["revise"], req.msg.tenant)
        log.info("counting.limit_set", tenant=req.msg.tenant, limit=req.msg.limit)
        return m.LimitSet(limit=out["limit"])

    async def set_reserved(self, req: Request) -> m.ReservedSet:
        msg = req.msg
        out = await self._commit(req, "set_reserved",
                                 {"tenant": msg.tenant, "function": msg.function, "reserved": msg.reserved})
        self._push(out["revise"], msg.tenant)
        log.info("counting.reserved_set", tenant=msg.tenant, function=msg.function, reserved=msg.reserved)
        return m.ReservedSet(reserved=out["reserved"])

    async def status(self, req: Request) -> m.CountingStatusReply:
        now = self.host.now()
        with self.group.machine.read() as ledger:
            ledger: Ledger
            tenants = [req.msg.tenant] if req.msg.tenant else sorted(
                set(ledger.limits) | set(ledger.reserved) | {lease.tenant for lease in ledger.leases.values()}
            )
            leases = [
                m.CreditLeaseView(
                    lease_id=lease.lease_id, holder=lease.holder, tenant=lease.tenant,
                    pool=lease.pool or "(unreserved)", credits=lease.credits, in_use=lease.in_use,
                    demand=lease.demand, target=lease.target,
                    expires_in_s=round(lease.expires_at - now, 2), free_in_s=round(lease.free_at - now, 2),
                )
                for lease in ledger.leases.values()
                if lease.tenant in tenants and lease.free_at > now
            ]
            return m.CountingStatusReply(
                tenants={t: m.TenantConcurrency.from_fields(ledger.tenant_view(t, now)) for t in tenants},
                lease_details=tuple(leases),
                leases=len(ledger.leases),
                digest=ledger.digest(),
                raft=self.group.status(),
            )

    async def members(self, req: Request) -> m.Members:
        return _members(self.group.members(), self.group.config.self_address)

    async def change_members(self, req: Request) -> m.Members:
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
            return await self.host.pool.call(self.host.config.endpoint("counting", leader), req.msg,
                                             request_id=f"{req.id}~", timeout_s=req.remaining_s(10))
        await group.change(action, address, timeout_s=req.remaining_s(10))
        log.info("counting.members_changed", action=action, member=address)
        return _members(group.members())

    def _push(self, endpoints, tenant: str) -> None:
        for endpoint in endpoints:
            self._background.spawn(self._revise(endpoint, tenant), name="counting-revise")

    async def _revise(self, endpoint: str, tenant: str) -> None:
        try:
            await self.host.pool.call(endpoint, m.Revise(tenant=tenant), timeout_s=1.0)
        except FlintError as err:  # a holder that cannot hear us renews on its own within half a lease
            log.info("counting.revise_unheard", holder=endpoint, tenant=tenant, **error_fields(err))


def _members(members: list[dict], address: str | None = None) -> m.Members:
    return m.Members(members=tuple(m.Member.from_fields(x) for x in members), address=address)
