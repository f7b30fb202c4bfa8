"""The low-level asyncio client of the frontend service: CURVE with a tenant key, failover across frontends."""

from __future__ import annotations

from typing import Any

import zmq.asyncio

from wire import messages as m
from wire.client import ClientPool, Failover
from wire.keys import KeyPair


class FrontendClient:
    def __init__(
        self,
        endpoints: list[str],
        *,
        server_public: bytes,
        key: KeyPair,
        ctx: zmq.asyncio.Context | None = None,
        timeout_s: float = 30.0,
    ):
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.asyncio.Context()
        self.pool = ClientPool(self.ctx, key, server_public, timeout_s=timeout_s)
        self.failover = Failover(self.pool, endpoints)
        self.timeout_s = timeout_s

    async def call(self, msg: m.Message, *, timeout_s: float | None = None, request_id: str | None = None) -> Any:
        """Send a request to a frontend and return its typed reply."""
        # an invoke that reached a frontend may have run: it is not silently sent to another one
        return await self.failover.call(
            msg, timeout_s=timeout_s or self.timeout_s, request_id=request_id,
            idempotent=not isinstance(msg, m.Invoke),
        )

    async def invoke(self, function: str, payload: bytes | None, **options: Any) -> m.InvokeResult:
        timeout_s = options.pop("timeout_s", None)
        return await self.call(m.Invoke(function=function, payload=payload, **options), timeout_s=timeout_s)

    def close(self) -> None:
        self.pool.close()
        if self._own_ctx:
            self.ctx.destroy(linger=0)
