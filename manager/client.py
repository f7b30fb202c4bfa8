"""How frontends talk to worker managers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from wire import messages as m
from wire.errors import FlintError
from wire.sockets import ClientPool

RESERVE_TIMEOUT_S = 35.0  # a cold start may fetch code and init a runtime before the reservation comes back


class ManagerClient:
    def __init__(self, pool: ClientPool):
        self.pool = pool

    async def reserve(
        self, endpoint: str, config: m.FunctionConfig, request_id: str, avoid_nodes: Iterable[str] = (),
        attempt: str | None = None,
    ) -> dict[str, Any]:
        resp = await self.pool.call(
            endpoint,
            m.Reserve(config=config, request_id=request_id, avoid_nodes=tuple(avoid_nodes), attempt=attempt),
            timeout_s=RESERVE_TIMEOUT_S,
        )
        return resp.fields

    async def release(self, endpoint: str, *, function_key: str, sandbox_id: str, request_id: str, outcome: str) -> None:
        try:
            await self.pool.call(
                endpoint,
                m.ManagerRelease(function_key=function_key, sandbox_id=sandbox_id, request_id=request_id, outcome=outcome),
                timeout_s=2.0,
            )
        except FlintError:
            pass  # the worker tells the manager too; a lost release costs at most one cold start

    async def status(self, endpoint: str) -> dict[str, Any]:
        resp = await self.pool.call(endpoint, m.ManagerStatus(), timeout_s=2.0)
        return resp.fields
