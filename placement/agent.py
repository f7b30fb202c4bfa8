"""The placement agent on every node: registers the node and heartbeats, re-registering when placement forgets."""

from __future__ import annotations

import asyncio

import structlog

from placement.client import PlacementClient
from wire import messages as m
from wire.errors import FlintError, ResourceNotFoundException, error_fields
from wire.host import Host

log = structlog.get_logger("placement.agent")


class PlacementAgent:
    def __init__(self, host: Host):
        self.host = host
        self.client = PlacementClient(host.control("placement"))
        self.registered = False

    def node_info(self) -> m.NodeInfo:
        c = self.host.config
        return m.NodeInfo(
            node_id=c.node_id,
            az=c.az,
            address=c.address,
            roles=c.roles,
            ports=c.ports.as_dict(),
            memory_mb=c.memory_mb,
            cores=c.cores,
            isolation=self.host.facts.isolation,
        )

    async def run(self) -> None:
        interval = self.host.config.settings.heartbeat_interval_s
        while True:
            try:
                if not self.registered:
                    await self.client.register(self.node_info())
                    self.registered = True
                    log.info("agent.registered")
                else:
                    await self.client.heartbeat(
                        self.host.node_id,
                        sandboxes=self.host.facts.sandboxes,
                        memory_used_mb=self.host.facts.sandbox_memory_mb,
                    )
            except ResourceNotFoundException:
                self.registered = False
                continue
            except FlintError as err:
                log.warning("agent.heartbeat_failed", **error_fields(err))
            await asyncio.sleep(interval)
