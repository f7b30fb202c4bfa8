"""Placement service: the worker registry, host health and worker leases, through the `placement` Raft group."""

from __future__ import annotations

import asyncio

import structlog

from wire import messages as m
from wire.errors import FlintError, error_fields
from wire.host import Host
from wire.ids import new_request_id
from wire.raft import RaftGroup
from wire.server import Request
from wire.tasks import Background

log = structlog.get_logger("placement")


class PlacementService:
    def __init__(self, host: Host, group: RaftGroup):
        self.host = host
        self.group = group

    async def run(self) -> None:
        at_leader = lambda handler: self.host.at_leader("placement", "placement", handler)  # noqa: E731
        server = self.host.server(
            "placement",
            {
                m.Register: at_leader(self.register),
                m.Heartbeat: at_leader(self.heartbeat),
                m.ListNodes: self.list_nodes,
                m.LeaseWorker: at_leader(self.lease_worker),
                m.ReturnWorkerLease: at_leader(self.return_lease),
                m.ListWorkerLeases: self.list_leases,
                m.ReportOutcome: at_leader(self.report),
                m.Drain: at_leader(self.drain),
            },
        )
        background = Background("placement")
        background.spawn(self._tick(), name="placement-tick")
        try:
            await server.serve()
        finally:
            background.cancel()

    async def _commit(self, req: Request, op: str, args: dict) -> object:
        return await self.group.submit(op, args, request_id=req.id, timeout_s=req.remaining_s(3))

    async def _tick(self) -> None:
        """The leader commits a tick each heartbeat interval, so health can tell 'the node went quiet' from
        'placement itself could not commit', and damped recoveries end on time."""
        interval = self.host.config.settings.heartbeat_interval_s
        short: list[str] = []
        while True:
            await asyncio.sleep(interval)
            if self.group.is_leader:
                try:
                    await self.group.submit("tick", {}, request_id=new_request_id(), timeout_s=interval)
                except FlintError as err:  # health bridges a gap in the group's own commits
                    log.info("placement.tick_failed", **error_fields(err))
                    continue
                with self.group.machine.read() as state:
                    headroom = state.headroom(self.host.now(), self._reserve_mb)
                if headroom["short_azs"] != short:
                    short = headroom["short_azs"]
                    if short:
                        log.warning("placement.short_of_capacity", azs=short, free_mb=headroom["free_mb"],
                                    hint="managers now return empty leases there at once; add worker hosts "
                                         "or lower keep-alive if this lasts")
                    else:
                        log.info("placement.capacity_restored", free_mb=headroom["free_mb"])

    async def register(self, req: Request) -> m.Incarnation:
        node = req.msg.node
        incarnation = await self._commit(req, "register", {"node": node.to_fields()})
        log.info("node.registered", registered_node=node.node_id, registered_az=node.az, incarnation=incarnation)
        return m.Incarnation(incarnation=incarnation)

    async def heartbeat(self, req: Request) -> m.Incarnation:
        msg = req.msg
        incarnation = await self._commit(
            req, "heartbeat", {"node_id": msg.node_id, "sandboxes": msg.sandboxes, "memory_used_mb": msg.memory_used_mb}
        )
        return m.Incarnation(incarnation=incarnation)

    async def list_nodes(self, req: Request) -> m.Nodes:
        now = self.host.now()
        with self.group.machine.read() as state:
            return m.Nodes(nodes=tuple(m.NodeView.from_fields(n) for n in state.view(now)),
                           free_capacity_mb=state.free_capacity_mb(now),
                           headroom=m.Headroom.from_fields(state.headroom(now, self._reserve_mb)),
                           raft=self.group.status())

    async def lease_worker(self, req: Request) -> m.WorkerLeaseGrant:
        msg = req.msg
        out = await self._commit(req, "lease_worker", {
            "lease_id": msg.lease_id, "manager": msg.manager, "memory_mb": msg.memory_mb,
            "prefer_azs": list(msg.prefer_azs), "avoid_nodes": list(msg.avoid_nodes), "lease_s": msg.lease_s,
        })
        grant = m.WorkerLeaseGrant.from_fields(out)
        log.info("worker_lease.granted", lease_id=msg.lease_id, manager=msg.manager, target_node=grant.node.node_id,
                 memory_mb=msg.memory_mb)
        return grant

    async def return_lease(self, req: Request) -> m.Returned:
        return m.Returned(returned=await self._commit(req, "return_lease", {"lease_id": req.msg.lease_id}))

    async def list_leases(self, req: Request) -> m.WorkerLeases:
        now = self.host.now()
        with self.group.machine.read() as state:
            return m.WorkerLeases(leases=tuple(m.WorkerLeaseView.from_fields(x)
                                               for x in state.leases_of(req.msg.manager, now)),
                                  headroom=m.Headroom.from_fields(state.headroom(now, self._reserve_mb)))

    async def report(self, req: Request) -> m.Suspect:
        suspect = await self._commit(req, "report", {"node_id": req.msg.node_id, "ok": req.msg.ok,
                                                     "incarnation": req.msg.incarnation})
        if suspect and not req.msg.ok:
            log.warning("node.suspect", target_node=req.msg.node_id)
        return m.Suspect(suspect=suspect)

    async def drain(self, req: Request) -> m.Draining:
        out = await self._commit(req, "drain", {"node_id": req.msg.node_id, "draining": req.msg.draining})
        log.info("node.drain", target_node=req.msg.node_id, draining=req.msg.draining)
        return m.Draining.from_fields(out)

    @property
    def _reserve_mb(self) -> int:
        """Headroom: each AZ should keep one host able to take one more lease block at once."""
        return self.host.config.settings.lease_block_mb
