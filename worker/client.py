"""How managers and frontends talk to a worker."""

from __future__ import annotations

from wire import messages as m
from wire.client import ClientPool

CREATE_TIMEOUT_S = 30.0  # code fetch + unpack + init (Lambda allows 10 s of init)
RUN_MARGIN_S = 2.0  # beyond the function's own timeout, which the worker enforces
DESTROY_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 2.0


class WorkerClient:
    def __init__(self, pool: ClientPool):
        self.pool = pool

    async def create_sandbox(self, endpoint: str, sandbox_id: str, config: m.FunctionConfig,
                             manager: str) -> m.SandboxCreated:
        msg = m.CreateSandbox(sandbox_id=sandbox_id, config=config, manager=manager)
        return await self.pool.call(endpoint, msg, timeout_s=CREATE_TIMEOUT_S)

    async def run(self, endpoint: str, run: m.Run, timeout_s: float) -> m.RunResult:
        """Run an invoke in a sandbox; `timeout_s` is the function's own timeout."""
        return await self.pool.call(endpoint, run, timeout_s=timeout_s + RUN_MARGIN_S)

    async def destroy(self, endpoint: str, sandbox_id: str) -> None:
        await self.pool.call(endpoint, m.DestroySandbox(sandbox_id=sandbox_id), timeout_s=DESTROY_TIMEOUT_S)

    async def list_sandboxes(self, endpoint: str) -> tuple[m.SandboxView, ...]:
        return (await self.pool.call(endpoint, m.ListSandboxes(), timeout_s=LIST_TIMEOUT_S)).sandboxes
