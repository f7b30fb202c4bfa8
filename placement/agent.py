"""The placement agent on every node: registers the node and heartbeats, re-registering when placement forgets."""

from __future__ import annotations

import asyncio

import structlog

from nodes.runtime import Runtime
from placement.client import PlacementClient
from wire import messages as m
from wire.errors import FlintError, ResourceNotFoundException

log = structlog.get_logger("placement.agent")


class PlacementAgent:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.client = PlacementClient(rt.control("placement"))
        self.registered = False

    def node_info(self) -> m.NodeInfo:
        c = self.rt.config
        return m.NodeInfo(
            node_id=c.node_id,
            az=c.az,
            address=c.address,
            roles=c.roles,
            ports=c.ports.as_dict(),
            memory_mb=c.memory_mb,
            cores=c.cores,
            isolation=self.rt.facts.get("isolation", "none (no worker role)"),
        )

    async def run(self) -> None:
        interval = self.rt.config.settings.heartbeat_interval_s
        while True:
            try:
                if not self.registered:
                    await self.client.register(self.node_info())
                    self.registered = True
                    log.info("agent.registered")
                else:
                    await self.client.heartbeat(
                        self.rt.node_id,
                        sandboxes=self.rt.facts.get("sandboxes", 0),
                        memory_used_mb=self.rt.facts.get("sandbox_memory_mb", 0),
                    )
            except ResourceNotFoundException:
                self.registered = False
                continue
            except FlintError as err:
                log.warning("agent.heartbeat_failed", error=str(err))
            await asyncio.sleep(interval)
