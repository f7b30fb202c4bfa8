"""What a tenant imports: `from flint import Client`.

    client = Client.from_region()                       # the local region made by `flint cluster up`
    client.create_function("hello", code="examples/hello", handler="handler.handle")
    result = client.invoke("hello", {"name": "Ada"})
    print(result.json())

Invokes fail over across the frontends you list and retry retryable errors (throttles, a frontend or host lost
before the invoke started) with jittered exponential backoff. Errors are raised as the Lambda-named classes in
`wire.errors` (`TooManyRequestsException`, `ResourceNotFoundException`, ...); a function's own error is not
raised: it comes back in `InvokeResult.function_error`, as in Lambda.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import tomllib
from pathlib import Path
from typing import Any

import uvloop

from frontend.client import FrontendClient
from registry.package import zip_directory
from wire import messages as m
from wire.errors import FlintError
from wire.keys import KeyPair

DEFAULT_REGION_DIR = Path(os.environ.get("FLINT_REGION", Path.home() / ".flint" / "region"))


@dataclasses.dataclass
class InvokeResult:
    status_code: int
    payload: bytes
    request_id: str
    function_error: str | None = None
    log_tail: str | None = None
    executed_version: str | None = None
    cold_start: bool = False

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


@dataclasses.dataclass
class ClientConfig:
    endpoints: list[str]
    server_key: bytes
    key_file: Path

    @classmethod
    def load(cls, region_dir: Path | str | None = None) -> ClientConfig:
        region_dir = Path(region_dir or DEFAULT_REGION_DIR)
        path = region_dir / "client.toml"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: start a local region with `flint cluster up --dir {region_dir}`, "
                "or point --region / FLINT_REGION at one"
            )
        raw = tomllib.loads(path.read_text())
        key_file = Path(raw["key_file"])
        if not key_file.is_absolute():
            key_file = region_dir / key_file
        return cls(list(raw["endpoints"]), raw["server_key"].encode(), key_file)


class AsyncClient:
    def __init__(
        self,
        endpoints: list[str],
        *,
        server_key: bytes,
        key: KeyPair,
        timeout_s: float = 60.0,
        retries: int = 2,
    ):
        self.frontend = FrontendClient(endpoints, server_public=server_key, key=key, timeout_s=timeout_s)
        self.retries = retries

    @classmethod
    def from_region(cls, region_dir: Path | str | None = None, **kw: Any) -> AsyncClient:
        cfg = ClientConfig.load(region_dir)
        return cls(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(cfg.key_file), **kw)

    async def _call(self, msg: m.Message, payload: bytes | None = None, *, timeout_s: float | None = None):
        attempt = 0
        while True:
            try:
                return await self.frontend.call(msg, payload, timeout_s=timeout_s)
            except FlintError as err:
                if not err.retryable or attempt >= self.retries:
                    raise
                attempt += 1
                await asyncio.sleep(random.uniform(0, 0.1 * 2**attempt))

    async def invoke(
        self,
        function: str,
        payload: Any = None,
        *,
        qualifier: str | None = None,
        invocation_type: str = "RequestResponse",
        log_tail: bool = False,
        timeout_s: float | None = None,
    ) -> InvokeResult:
        body = payload if isinstance(payload, (bytes, bytearray)) or payload is None else json.dumps(payload).encode()
        resp = await self._call(
            m.Invoke(function=function, qualifier=qualifier, invocation_type=invocation_type, log_tail=log_tail),
            bytes(body) if body is not None else None,
            timeout_s=timeout_s,
        )
        f = resp.fields
        return InvokeResult(
            status_code=f.get("status_code", 200),
            payload=resp.payload or b"",
            request_id=f.get("request_id", ""),
            function_error=f.get("function_error"),
            log_tail=f.get("log_tail"),
            executed_version=f.get("executed_version"),
            cold_start=bool(f.get("cold_start")),
        )

    async def create_function(
        self,
        name: str,
        *,
        code: Path | str | bytes,
        handler: str,
        memory_mb: int = 128,
        timeout_s: float = 3.0,
        environment: dict[str, str] | None = None,
        runtime: str = "python3",
        network: bool = False,
    ) -> dict[str, Any]:
        if isinstance(code, (str, Path)):
            path = Path(code)
            data = zip_directory(path) if path.is_dir() else path.read_bytes()
        else:
            data = code
        resp = await self._call(
            m.CreateFunction(
                name=name, handler=handler, memory_mb=memory_mb, timeout_s=timeout_s, environment=environment or {},
                runtime=runtime, network=network,
            ),
            data,
        )
        return resp.fields["config"]

    async def get_function(self, name: str) -> dict[str, Any]:
        return (await self._call(m.GetFunction(name=name))).fields["config"]

    async def list_functions(self) -> list[dict[str, Any]]:
        return (await self._call(m.ListFunctions())).fields["functions"]

    async def delete_function(self, name: str) -> None:
        await self._call(m.DeleteFunction(name=name))

    async def put_function_concurrency(self, name: str, reserved: int) -> int:
        """Reserve `reserved` concurrent executions for the function (0 throttles it), out of the tenant's limit."""
        return (await self._call(m.PutFunctionConcurrency(name=name, reserved=reserved))).fields["reserved_concurrency"]

    async def delete_function_concurrency(self, name: str) -> None:
        await self._call(m.DeleteFunctionConcurrency(name=name))

    async def get_function_concurrency(self, name: str) -> dict[str, Any]:
        return (await self._call(m.GetFunctionConcurrency(name=name))).fields

    def close(self) -> None:
        self.frontend.close()


class Client:
    """The blocking twin of AsyncClient, for scripts and the command line. Not for use from an event loop."""

    def __init__(self, endpoints: list[str], *, server_key: bytes, key: KeyPair, **kw: Any):
        self._loop = uvloop.new_event_loop()
        self._async = self._run(self._make(endpoints, server_key, key, kw))

    @staticmethod
    async def _make(endpoints: list[str], server_key: bytes, key: KeyPair, kw: dict[str, Any]) -> AsyncClient:
        return AsyncClient(endpoints, server_key=server_key, key=key, **kw)

    @classmethod
    def from_region(cls, region_dir: Path | str | None = None, **kw: Any) -> Client:
        cfg = ClientConfig.load(region_dir)
        return cls(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(cfg.key_file), **kw)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def invoke(self, function: str, payload: Any = None, **kw: Any) -> InvokeResult:
        return self._run(self._async.invoke(function, payload, **kw))

    def create_function(self, name: str, **kw: Any) -> dict[str, Any]:
        return self._run(self._async.create_function(name, **kw))

    def get_function(self, name: str) -> dict[str, Any]:
        return self._run(self._async.get_function(name))

    def list_functions(self) -> list[dict[str, Any]]:
        return self._run(self._async.list_functions())

    def delete_function(self, name: str) -> None:
        self._run(self._async.delete_function(name))

    def put_function_concurrency(self, name: str, reserved: int) -> int:
        return self._run(self._async.put_function_concurrency(name, reserved))

    def delete_function_concurrency(self, name: str) -> None:
        self._run(self._async.delete_function_concurrency(name))

    def get_function_concurrency(self, name: str) -> dict[str, Any]:
        return self._run(self._async.get_function_concurrency(name))

    def close(self) -> None:
        self._async.close()
        pending = asyncio.all_tasks(self._loop)
        if pending:  # let the cancelled socket readers finish before the loop goes
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
