"""How managers and frontends talk to a worker."""

from __future__ import annotations

from wire import messages as m
from wire.sockets import ClientPool, Response

CREATE_TIMEOUT_S = 30.0  # code fetch + unpack + init (Lambda allows 10 s of init)
RUN_MARGIN_S = 2.0  # beyond the function's own timeout, which the worker enforces


class WorkerClient:
    def __init__(self, pool: ClientPool):
        self.pool = pool

    async def create_sandbox(self, endpoint: str, sandbox_id: str, config: m.FunctionConfig, manager: str) -> Response:
        return await self.pool.call(
            endpoint, m.CreateSandbox(sandbox_id=sandbox_id, config=config, manager=manager),
            timeout_s=CREATE_TIMEOUT_S,
        )

    async def run(
        self, endpoint: str, *, sandbox_id: str, request_id: str, function_key: str, payload: bytes,
        timeout_s: float, log_tail: bool = False, not_after_ms: int | None = None,
    ) -> Response:
        return await self.pool.call(
            endpoint,
            m.Run(sandbox_id=sandbox_id, request_id=request_id, function_key=function_key, log_tail=log_tail,
                  not_after_ms=not_after_ms),
            payload,
            timeout_s=timeout_s + RUN_MARGIN_S,
        )

    async def destroy(self, endpoint: str, sandbox_id: str) -> None:
        await self.pool.call(endpoint, m.DestroySandbox(sandbox_id=sandbox_id), timeout_s=5.0)

    async def list_sandboxes(self, endpoint: str) -> list[dict]:
        resp = await self.pool.call(endpoint, m.ListSandboxes(), timeout_s=2.0)
        return resp.fields["sandboxes"]
