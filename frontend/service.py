"""Front End Invoke: the door tenants and operators come through.

Authenticates (CURVE + ZAP: a key is a tenant's or an operator's, checked again on every request so that a
revoked key stops working on open connections too: frontend/keys.py), then either runs an invoke
(frontend/invoke.py: resolve, admit against the concurrency ledger, route to the function's worker manager, run
on a worker) or proxies a control-plane request (frontend/control.py). This module assembles those parts and
serves them.
"""

from __future__ import annotations

import os
import time

import structlog

from counting.client import CountingClient
from frontend.admission import Admission
from frontend.control import ControlPlane
from frontend.credits import CreditWallet
from frontend.invoke import Invoker
from frontend.keys import KeyMap
from frontend.poller import Poller
from frontend.state import FunctionCache
from manager.client import ManagerClient
from placement.client import NodeView, PlacementClient
from registry.client import RegistryClient
from wire import messages as m
from wire.host import Host
from wire.principal import Role
from wire.tasks import Background
from wire.zap import TENANT_DOMAIN
from worker.client import WorkerClient

log = structlog.get_logger("frontend")

VIEW_MAX_AGE_S = 0.25


class FrontendService:
    def __init__(self, host: Host):
        self.host = host
        settings = host.config.settings
        self.registry = RegistryClient(host.control("registry"), self._control_leader)
        counting = CountingClient(host.control("counting"))
        holder = f"{host.node_id}-{os.getpid():x}-{int(time.time() * 1000) & 0xFFFFFFF:x}"  # unique per incarnation
        self.admission = Admission(counting, holder, host.config.endpoint("frontend"),
                                   CreditWallet(holder, lease_s=settings.credit_lease_s))
        self.view = NodeView(PlacementClient(host.control("placement")), max_age_s=VIEW_MAX_AGE_S)
        cache = FunctionCache(settings.function_cache_ttl_s)
        self.keys = KeyMap(self.registry)
        managers = ManagerClient(host.pool)
        self.invoker = Invoker(self.registry, self.admission, self.view, managers, WorkerClient(host.pool), cache,
                               settings.cold_start_allowance_s)
        self.control = ControlPlane(self.registry, counting, managers, self.view, cache, self.keys,
                                    self.admission.revise, settings.unzipped_max_mb)
        self.poller = Poller(holder, self.registry, self.invoker.run_event, self.invoker.event_accepted,
                             concurrency=settings.event_pollers, visibility_s=settings.event_visibility_s)

    async def run(self) -> None:
        self.host.auth.key_lookup = self.keys.lookup
        self.host.on_stop("frontend", self.admission.hand_back)
        handlers = self.control.handlers()
        handlers[m.Invoke] = self.keys.only(Role.TENANT)(self.invoker.invoke)
        server = self.host.server(
            "frontend", handlers, zap_domain=TENANT_DOMAIN,
            allowed=lambda caller: True,  # every handler checks its own kind of caller
        )
        await self.view.refresh(force=True)
        background = Background("frontend")
        background.spawn(self.admission.run(), name="admission")
        background.spawn(self.poller.run(), name="event-poller")
        try:
            await server.serve()
        finally:
            background.cancel()

    def _control_leader(self) -> str | None:
        """Where the control group's leader serves the registry, if this node holds a replica and knows."""
        group = self.host.groups.get("control")
        if group is None:
            return None
        leader = self.host.config.address if group.is_leader else group.leader_host()
        return self.host.config.endpoint("registry", leader) if leader else None
