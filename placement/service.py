"""Placement service: the worker registry and its health, through the `placement` Raft group."""

from __future__ import annotations

import asyncio

import structlog

from nodes.runtime import Runtime
from wire import messages as m
from wire.raft import RaftGroup
from wire.errors import FlintError
from wire.sockets import Request, new_request_id

log = structlog.get_logger("placement")


class PlacementService:
    def __init__(self, rt: Runtime, group: RaftGroup):
        self.rt = rt
        self.group = group

    async def run(self) -> None:
        server = self.rt.server(
            "placement",
            {
                m.Register: self.rt.at_leader("placement", "placement", self.register),
                m.Heartbeat: self.rt.at_leader("placement", "placement", self.heartbeat),
                m.ListNodes: self.list_nodes,
            },
        )
        ticker = asyncio.get_running_loop().create_task(self._tick(), name="placement-tick")
        try:
            await server.serve()
        finally:
            ticker.cancel()

    async def _tick(self) -> None:
        """The leader commits a tick each heartbeat interval, so health can tell 'the node went quiet' from
        'placement itself could not commit'."""
        interval = self.rt.config.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.group.status()["state"] == "leader":
                try:
                    await self.group.submit("tick", {}, request_id=new_request_id(), timeout_s=interval)
                except FlintError:
                    pass

    async def register(self, req: Request) -> dict:
        node = req.msg.node
        incarnation = await self.group.submit(
            "register", {"node": node.to_fields()}, request_id=req.id, timeout_s=req.remaining_s(3)
        )
        log.info("node.registered", registered_node=node.node_id, registered_az=node.az, incarnation=incarnation)
        return {"incarnation": incarnation}

    async def heartbeat(self, req: Request) -> dict:
        msg = req.msg
        incarnation = await self.group.submit(
            "heartbeat",
            {"node_id": msg.node_id, "sandboxes": msg.sandboxes, "memory_used_mb": msg.memory_used_mb},
            request_id=req.id,
            timeout_s=req.remaining_s(3),
        )
        return {"incarnation": incarnation}

    async def list_nodes(self, req: Request) -> dict:
        with self.group.machine.read() as state:
            return {"nodes": state.view(self.rt.now()), "raft": self.group.status()}
