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
from wire.errors import FlintError, PeerUnavailable, Reason, TooManyRequestsException
from wire.ids import new_request_id
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
    operator_key_file: Path | None = None

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

        def local(p: str | None) -> Path | None:
            if p is None:
                return None
            return Path(p) if Path(p).is_absolute() else region_dir / p

        return cls(list(raw["endpoints"]), raw["server_key"].encode(), local(raw["key_file"]),
                   local(raw.get("operator_key_file")))


def _key_file(cfg: ClientConfig, key_file: Path | str | None, operator: bool) -> Path:
    if key_file is not None:
        return Path(key_file)
    if operator:
        if cfg.operator_key_file is None:
            raise FileNotFoundError("this region's client.toml names no operator key (operator_key_file)")
        return cfg.operator_key_file
    return cfg.key_file


# Why a sync invoke failed when a retry cannot run the function twice: it certainly did not start, or its
# frontend was lost (the retry keeps the request id, and the function's manager starts a request id once only:
# if the lost frontend had started it, the retry gets ServiceException AlreadyStarted instead).
SAFE_RETRY_REASONS = frozenset({
    Reason.NOT_SENT, Reason.CONNECTION_LOST, Reason.NO_ROUTE, Reason.NO_MANAGER, Reason.NO_HEALTHY_WORKER,
    Reason.NO_CAPACITY, Reason.WORKER_UNREACHABLE, Reason.WORKER_FULL, Reason.ADMISSION_EXPIRED,
})


def _safe_to_retry(msg: m.Message, err: FlintError) -> bool:
    """Every retryable error is retried, except where a RequestResponse invoke may be running or have run (its
    host lost mid-invoke, no answer in time): the caller decides. An Event is safe (its request id makes a second
    accept the same event), and so is a throttle (nothing ran)."""
    if not isinstance(msg, m.Invoke) or msg.invocation_type != m.InvocationType.REQUEST_RESPONSE:
        return True
    return isinstance(err, TooManyRequestsException) or err.reason in SAFE_RETRY_REASONS


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
    def from_region(cls, region_dir: Path | str | None = None, *, key_file: Path | str | None = None,
                    operator: bool = False, **kw: Any) -> AsyncClient:
        cfg = ClientConfig.load(region_dir)
        return cls(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(_key_file(cfg, key_file, operator)),
                   **kw)

    async def _call(self, msg: m.Message, *, timeout_s: float | None = None, request_id: str | None = None) -> Any:
        attempt = 0
        request_id = request_id or new_request_id()  # one id for every retry: an Event accepted twice is one event
        while True:
            try:
                return await self.frontend.call(msg, timeout_s=timeout_s, request_id=request_id)
            except FlintError as err:
                if not err.retryable or attempt >= self.retries or not _safe_to_retry(msg, err):
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
        request_id: str | None = None,
    ) -> InvokeResult:
        """Invoke `function` with `payload` (JSON-encoded unless bytes). `request_id` (at most 64 characters) names
        this call instead of a fresh id: pass an earlier call's id to send that call again as its own retry would,
        e.g. after your process lost its answer. An Event already accepted under that id is the same event (its
        id comes back again, it is not queued twice); a RequestResponse invoke already started under that id (in
        the last 16 minutes) fails with ServiceException AlreadyStarted instead of running the function again."""
        body = payload if isinstance(payload, (bytes, bytearray)) or payload is None else json.dumps(payload).encode()
        try:
            resp = await self._call(
                m.Invoke(function=function, qualifier=qualifier, invocation_type=invocation_type, log_tail=log_tail,
                         payload=bytes(body) if body is not None else None),
                timeout_s=timeout_s,
                request_id=request_id,
            )
        except PeerUnavailable as err:
            if err.reason != Reason.TIMEOUT or invocation_type != m.InvocationType.REQUEST_RESPONSE:
                raise
            raise PeerUnavailable(
                f"{err.message}. The function may still be running (it is not retried, so it runs at most once "
                "from this call); if its timeout is longer than this client's, wait longer: timeout_s= here, "
                "--read-timeout-s with flint invoke.", reason=Reason.TIMEOUT) from None
        return InvokeResult(
            status_code=resp.status_code,
            payload=resp.payload or b"",
            request_id=resp.request_id,
            function_error=resp.function_error,
            log_tail=resp.log_tail,
            executed_version=resp.executed_version,
            cold_start=resp.cold_start,
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
        reply = await self._call(
            m.CreateFunction(
                name=name, handler=handler, memory_mb=memory_mb, timeout_s=timeout_s, environment=environment or {},
                runtime=runtime, network=network, code=_code_bytes(code),
            ),
        )
        return _function(reply)

    async def get_function(self, name: str) -> dict[str, Any]:
        return _function(await self._call(m.GetFunction(name=name)))

    async def list_functions(self) -> list[dict[str, Any]]:
        return [_public(f) for f in (await self._call(m.ListFunctions())).functions]

    async def delete_function(self, name: str) -> None:
        await self._call(m.DeleteFunction(name=name))

    async def update_function_code(self, name: str, *, code: Path | str | bytes) -> dict[str, Any]:
        return _function(await self._call(m.UpdateFunctionCode(name=name, code=_code_bytes(code))))

    async def update_function_configuration(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change handler, runtime, memory_mb, timeout_s, environment, network, maximum_retry_attempts or
        maximum_event_age_s."""
        return _function(await self._call(m.UpdateFunctionConfiguration(name=name, **changes)))

    async def publish_version(self, name: str, description: str = "") -> dict[str, Any]:
        return _function(await self._call(m.PublishVersion(name=name, description=description)))

    async def list_versions(self, name: str) -> list[dict[str, Any]]:
        return [_public(f) for f in (await self._call(m.ListVersions(name=name))).functions]

    async def create_alias(self, name: str, alias: str, version: str, *, additional_version: str | None = None,
                           weight: float = 0.0) -> dict[str, Any]:
        msg = m.PutAlias(name=name, alias=alias, version=version, additional_version=additional_version,
                         weight=weight, create=True)
        return (await self._call(msg)).alias.to_fields()

    async def update_alias(self, name: str, alias: str, version: str, *, additional_version: str | None = None,
                           weight: float = 0.0) -> dict[str, Any]:
        msg = m.PutAlias(name=name, alias=alias, version=version, additional_version=additional_version,
                         weight=weight, create=False)
        return (await self._call(msg)).alias.to_fields()

    async def delete_alias(self, name: str, alias: str) -> None:
        await self._call(m.DeleteAlias(name=name, alias=alias))

    async def list_aliases(self, name: str) -> list[dict[str, Any]]:
        return [a.to_fields() for a in (await self._call(m.ListAliases(name=name))).aliases]

    async def list_events(self, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        """{"events": [...], "counts": {state: n}}: the newest events first."""
        return (await self._call(m.ListEvents(state=state, limit=limit))).to_fields()

    async def get_event(self, event_id: str) -> dict[str, Any]:
        return (await self._call(m.GetEvent(event_id=event_id))).event.to_fields()

    async def redrive_events(self, event_ids: list[str] | None = None) -> int:
        msg = m.RedriveEvents(event_ids=tuple(event_ids) if event_ids is not None else None)
        return (await self._call(msg)).redriven

    # operator
    async def create_tenant(self, tenant: str, public_key: bytes | str) -> dict[str, Any]:
        key = public_key.decode() if isinstance(public_key, bytes) else public_key
        return (await self._call(m.TenantCreate(tenant=tenant, public_key=key))).tenant.to_fields()

    async def add_tenant_key(self, tenant: str, public_key: bytes | str) -> dict[str, Any]:
        key = public_key.decode() if isinstance(public_key, bytes) else public_key
        return (await self._call(m.TenantAddKey(tenant=tenant, public_key=key))).tenant.to_fields()

    async def revoke_tenant_key(self, tenant: str, public_key: bytes | str) -> dict[str, Any]:
        key = public_key.decode() if isinstance(public_key, bytes) else public_key
        return (await self._call(m.TenantRevokeKey(tenant=tenant, public_key=key))).tenant.to_fields()

    async def set_tenant_network(self, tenant: str, allowed: bool) -> dict[str, Any]:
        """Operator: let a tenant's functions have network access, or not (taken away from all of them)."""
        return (await self._call(m.TenantNetwork(tenant=tenant, allowed=allowed))).tenant.to_fields()

    async def list_tenants(self) -> dict[str, Any]:
        """{tenant name: {tenant, keys, revoked, created_ms}}."""
        return {t.tenant: t.to_fields() for t in (await self._call(m.TenantList())).tenants}

    async def tenant_limit(self, tenant: str, limit: int | None = None) -> dict[str, Any]:
        return (await self._call(m.TenantLimit(tenant=tenant, limit=limit))).view.to_fields()

    async def put_function_concurrency(self, name: str, reserved: int) -> int:
        """Reserve `reserved` concurrent executions for the function (0 throttles it), out of the tenant's limit."""
        return (await self._call(m.PutFunctionConcurrency(name=name, reserved=reserved))).reserved_concurrency

    async def delete_function_concurrency(self, name: str) -> None:
        await self._call(m.DeleteFunctionConcurrency(name=name))

    async def get_function_concurrency(self, name: str) -> dict[str, Any]:
        return (await self._call(m.GetFunctionConcurrency(name=name))).to_fields()

    def close(self) -> None:
        self.frontend.close()


def _public(config: m.FunctionConfig) -> dict[str, Any]:
    """A function record as its tenant sees it (their own tenant name left out)."""
    out = config.to_fields()
    out.pop("tenant", None)
    return out


def _function(reply: m.FunctionReply) -> dict[str, Any]:
    out = _public(reply.config)
    if reply.reserved_concurrency is not None:
        out["reserved_concurrency"] = reply.reserved_concurrency
    return out


def _code_bytes(code: Path | str | bytes) -> bytes:
    if isinstance(code, (str, Path)):
        path = Path(code)
        return zip_directory(path) if path.is_dir() else path.read_bytes()
    return code


class Client:
    """The blocking twin of AsyncClient, for scripts and the command line. Not for use from an event loop."""

    def __init__(self, endpoints: list[str], *, server_key: bytes, key: KeyPair, **kw: Any):
        self._loop = uvloop.new_event_loop()
        self._async = self._run(self._make(endpoints, server_key, key, kw))

    @staticmethod
    async def _make(endpoints: list[str], server_key: bytes, key: KeyPair, kw: dict[str, Any]) -> AsyncClient:
        return AsyncClient(endpoints, server_key=server_key, key=key, **kw)

    @classmethod
    def from_region(cls, region_dir: Path | str | None = None, *, key_file: Path | str | None = None,
                    operator: bool = False, **kw: Any) -> Client:
        """The region made by `flint cluster up`; with the default tenant's key unless `key_file` names another
        (a tenant's .key_secret), or the region's operator key with `operator`."""
        cfg = ClientConfig.load(region_dir)
        return cls(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(_key_file(cfg, key_file, operator)),
                   **kw)

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

    def __getattr__(self, name: str) -> Any:
        """Every other AsyncClient method, blocking: update_function_code, publish_version, create_alias,
        list_events, redrive_events, create_tenant, revoke_tenant_key, ..."""
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._async, name, None)
        if method is None or not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)
        return lambda *args, **kw: self._run(method(*args, **kw))

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
