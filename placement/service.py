"""Placement service: the worker registry, host health and worker leases, through the `placement` Raft group."""

from __future__ import annotations

import asyncio

import structlog

from nodes.runtime import Runtime
from wire import messages as m
from wire.errors import FlintError
from wire.raft import RaftGroup
from wire.sockets import Request, new_request_id

log = structlog.get_logger("placement")


class PlacementService:
    def __init__(self, rt: Runtime, group: RaftGroup):
        self.rt = rt
        self.group = group

    async def run(self) -> None:
        at_leader = lambda handler: self.rt.at_leader("placement", "placement", handler)  # noqa: E731
        server = self.rt.server(
            "placement",
            {
                m.Register: at_leader(self.register),
                m.Heartbeat: at_leader(self.heartbeat),
                m.ListNodes: self.list_nodes,
                m.LeaseWorker: at_leader(self.lease_worker),
                m.ReturnLease: at_leader(self.return_lease),
                m.ListLeases: self.list_leases,
                m.ReportOutcome: at_leader(self.report),
                m.Drain: at_leader(self.drain),
            },
        )
        ticker = asyncio.get_running_loop().create_task(self._tick(), name="placement-tick")
        try:
            await server.serve()
        finally:
            ticker.cancel()

    async def _commit(self, req: Request, op: str, args: dict) -> object:
        return await self.group.submit(op, args, request_id=req.id, timeout_s=req.remaining_s(3))

    async def _tick(self) -> None:
        """The leader commits a tick each heartbeat interval, so health can tell 'the node went quiet' from
        'placement itself could not commit', and damped recoveries end on time."""
        interval = self.rt.config.settings.heartbeat_interval_s
        short: list[str] = []
        while True:
            await asyncio.sleep(interval)
            if self.group.is_leader:
                try:
                    await self.group.submit("tick", {}, request_id=new_request_id(), timeout_s=interval)
                except FlintError:
                    continue
                with self.group.machine.read() as state:
                    headroom = state.headroom(self.rt.now(), self.rt.config.settings.lease_block_mb)
                if headroom["short_azs"] != short:
                    short = headroom["short_azs"]
                    if short:
                        log.warning("placement.short_of_capacity", azs=short, free_mb=headroom["free_mb"],
                                    hint="managers now return empty leases there at once; add worker hosts "
                                         "or lower keep-alive if this lasts")
                    else:
                        log.info("placement.capacity_restored", free_mb=headroom["free_mb"])

    async def register(self, req: Request) -> dict:
        node = req.msg.node
        incarnation = await self._commit(req, "register", {"node": node.to_fields()})
        log.info("node.registered", registered_node=node.node_id, registered_az=node.az, incarnation=incarnation)
        return {"incarnation": incarnation}

    async def heartbeat(self, req: Request) -> dict:
        msg = req.msg
        incarnation = await self._commit(
            req, "heartbeat", {"node_id": msg.node_id, "sandboxes": msg.sandboxes, "memory_used_mb": msg.memory_used_mb}
        )
        return {"incarnation": incarnation}

    async def list_nodes(self, req: Request) -> dict:
        now = self.rt.now()
        with self.group.machine.read() as state:
            return {"nodes": state.view(now), "free_capacity_mb": state.free_capacity_mb(now),
                    "headroom": state.headroom(now, self.rt.config.settings.lease_block_mb),
                    "raft": self.group.status()}

    async def lease_worker(self, req: Request) -> dict:
        msg = req.msg
        out = await self._commit(req, "lease_worker", {
            "lease_id": msg.lease_id, "manager": msg.manager, "memory_mb": msg.memory_mb,
            "prefer_azs": list(msg.prefer_azs), "avoid_nodes": list(msg.avoid_nodes), "lease_s": msg.lease_s,
        })
        log.info("lease.granted", lease_id=msg.lease_id, manager=msg.manager, target_node=out["node"]["node_id"],
                 memory_mb=msg.memory_mb)
        return out

    async def return_lease(self, req: Request) -> dict:
        return {"returned": await self._commit(req, "return_lease", {"lease_id": req.msg.lease_id})}

    async def list_leases(self, req: Request) -> dict:
        now = self.rt.now()
        with self.group.machine.read() as state:
            return {"leases": state.leases_of(req.msg.manager, now),
                    "headroom": state.headroom(now, self.rt.config.settings.lease_block_mb)}

    async def report(self, req: Request) -> dict:
        suspect = await self._commit(req, "report", {"node_id": req.msg.node_id, "ok": req.msg.ok,
                                                     "incarnation": req.msg.incarnation})
        if suspect and not req.msg.ok:
            log.warning("node.suspect", target_node=req.msg.node_id)
        return {"suspect": suspect}

    async def drain(self, req: Request) -> dict:
        out = await self._commit(req, "drain", {"node_id": req.msg.node_id, "draining": req.msg.draining})
        log.info("node.drain", target_node=req.msg.node_id, draining=req.msg.draining)
        return out
