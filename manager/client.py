"""How frontends talk to worker managers."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from wire import messages as m
from wire.client import ClientPool
from wire.errors import FlintError, error_fields

log = structlog.get_logger("manager.client")

RESERVE_TIMEOUT_S = 35.0  # a cold start may fetch code and init a runtime before the reservation comes back
RELEASE_TIMEOUT_S = 2.0


class ManagerClient:
    def __init__(self, pool: ClientPool):
        self.pool = pool

    async def reserve(
        self, endpoint: str, config: m.FunctionConfig, request_id: str, avoid_nodes: Iterable[str] = (),
        attempt: str | None = None,
    ) -> m.Reservation:
        msg = m.Reserve(config=config, request_id=request_id, avoid_nodes=tuple(avoid_nodes), attempt=attempt)
        return await self.pool.call(endpoint, msg, timeout_s=RESERVE_TIMEOUT_S)

    async def release(self, endpoint: str, release: m.ManagerRelease) -> None:
        try:
            await self.pool.call(endpoint, release, timeout_s=RELEASE_TIMEOUT_S)
        except FlintError as err:  # the worker tells the manager too; a lost release costs at most one cold start
            log.info("manager.release_unheard", manager=endpoint, sandbox_id=release.sandbox_id, **error_fields(err))

    async def retire_function(self, endpoint: str, tenant: str, name: str) -> int:
        """A deleted function's sandboxes at one manager: how many idle ones it destroyed."""
        return (await self.pool.call(endpoint, m.RetireFunction(tenant=tenant, name=name),
                                     timeout_s=RELEASE_TIMEOUT_S)).retired

    async def status(self, endpoint: str) -> m.ManagerSummary:
        return await self.pool.call(endpoint, m.ManagerStatus(), timeout_s=RELEASE_TIMEOUT_S)
