"""Front End Invoke: the door tenants come through. Authenticates (CURVE + ZAP), resolves the function, admits
against the concurrency ledger, routes to the function's worker manager and runs the invoke on a worker."""

from __future__ import annotations

import asyncio
import json
import os
import time

import structlog

from counting.client import CountingClient
from frontend.admission import Admission
from frontend.state import CreditWallet, FunctionCache, rendezvous_order
from manager.client import ManagerClient
from nodes.runtime import Runtime
from placement.client import NodeView, PlacementClient
from registry.client import RegistryClient
from registry.package import sha256, validate_zip
from wire import messages as m
from wire.errors import (
    AccessDeniedException,
    FlintError,
    InvalidParameterValueException,
    InvalidRequestContentException,
    PeerUnavailable,
    ResourceConflictException,
    ResourceNotFoundException,
    ServiceException,
)
from wire.sockets import CLUSTER, TENANT_PREFIX, Reply, Request, new_request_id, now_ms
from worker.client import WorkerClient

log = structlog.get_logger("frontend")

TENANT_KEYS_TTL_S = 1.0
MANAGER_DOWN_S = 3.0  # longer than placement takes to mark a dead node unhealthy


class FrontendService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.registry = RegistryClient(rt.control("registry"))
        self.counting = CountingClient(rt.control("counting"))
        holder = f"{rt.node_id}-{os.getpid():x}-{int(time.time() * 1000) & 0xFFFFFFF:x}"  # unique per incarnation
        self.admission = Admission(
            self.counting, holder, rt.config.endpoint("frontend"),
            CreditWallet(holder, lease_s=rt.config.settings.credit_lease_s),
        )
        self.view = NodeView(PlacementClient(rt.control("placement")), max_age_s=0.25)
        self.managers = ManagerClient(rt.pool)
        self.workers = WorkerClient(rt.pool)
        self.cache = FunctionCache(rt.config.settings.function_cache_ttl_s)
        self._tenant_keys: dict[str, str] = {}
        self._tenant_keys_at = 0.0
        self._tenant_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._manager_down: dict[str, float] = {}  # manager endpoint -> skip it until (monotonic)

    async def run(self) -> None:
        self.rt.auth.tenant_lookup = self.tenant_for_key
        server = self.rt.server(
            "frontend",
            {
                m.Invoke: self.invoke,
                m.CreateFunction: self.create_function,
                m.GetFunction: self.get_function,
                m.ListFunctions: self.list_functions,
                m.DeleteFunction: self.delete_function,
                m.PutFunctionConcurrency: self.put_concurrency,
                m.DeleteFunctionConcurrency: self.delete_concurrency,
                m.GetFunctionConcurrency: self.get_concurrency,
                m.Revise: self.revise,
            },
            zap_domain="tenant",
            allowed=lambda principal: principal.startswith(TENANT_PREFIX) or principal == CLUSTER,
        )
        await self.view.refresh(force=True)
        renewals = asyncio.get_running_loop().create_task(self.admission.run(), name="admission")
        try:
            await server.serve()
        finally:
            renewals.cancel()

    # --- authentication ------------------------------------------------------------------------------------------

    async def tenant_for_key(self, public_key: bytes) -> str | None:
        key = public_key.decode()
        if key not in self._tenant_keys or time.monotonic() - self._tenant_keys_at > TENANT_KEYS_TTL_S:
            async with self._tenant_lock:
                if time.monotonic() - self._tenant_keys_at > min(TENANT_KEYS_TTL_S, 0.2):
                    tenants = await self.registry.list_tenants()
                    self._tenant_keys = {k: name for name, t in tenants.items() for k in t["keys"]}
                    self._tenant_keys_at = time.monotonic()
        return self._tenant_keys.get(key)

    # --- function lifecycle ----------------------------------------------------------------------------------------

    async def create_function(self, req: Request) -> dict:
        _tenant(req)
        msg = req.msg
        if not req.payload:
            raise InvalidParameterValueException("no code: send the zip as the request's payload frame")
        size = len(req.payload)
        await asyncio.to_thread(validate_zip, req.payload)
        _check_environment(msg.environment)
        digest = sha256(req.payload)
        await self.registry.put_blob(req.payload)
        config = m.FunctionConfig(
            tenant=req.tenant,
            name=msg.name,
            handler=msg.handler,
            runtime=msg.runtime,
            memory_mb=msg.memory_mb,
            timeout_s=msg.timeout_s,
            environment=msg.environment,
            code_sha256=digest,
            code_size=size,
            network=msg.network,
        )
        record = await self.registry.create_function(config, request_id=req.id)
        self.cache.forget(req.tenant, msg.name)
        return {"config": _public(record)}

    async def get_function(self, req: Request) -> dict:
        config = _public(await self.registry.get_function(_tenant(req), req.msg.name))
        status = await self.counting.status(req.tenant)
        reserved = status["tenants"].get(req.tenant, {}).get("reserved", {}).get(req.msg.name)
        if reserved is not None:
            config["reserved_concurrency"] = reserved
        return {"config": config}

    async def list_functions(self, req: Request) -> dict:
        return {"functions": [_public(f) for f in await self.registry.list_functions(_tenant(req))]}

    async def delete_function(self, req: Request) -> dict:
        await self.registry.delete_function(_tenant(req), req.msg.name, request_id=req.id)
        self.cache.forget(req.tenant, req.msg.name)
        try:
            await self.counting.set_reserved(req.tenant, req.msg.name, None)
        except ResourceNotFoundException:
            pass  # it had no reservation
        return {}

    # --- concurrency -----------------------------------------------------------------------------------------------

    async def put_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(_tenant(req), req.msg.name)  # ResourceNotFoundException if not theirs
        reserved = await self.counting.set_reserved(req.tenant, req.msg.name, req.msg.reserved)
        return {"reserved_concurrency": reserved}

    async def delete_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(_tenant(req), req.msg.name)
        try:
            await self.counting.set_reserved(req.tenant, req.msg.name, None)
        except ResourceNotFoundException:
            pass
        return {}

    async def get_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(_tenant(req), req.msg.name)
        status = await self.counting.status(req.tenant)
        view = status["tenants"].get(req.tenant, {})
        return {
            "reserved_concurrency": view.get("reserved", {}).get(req.msg.name),
            "tenant_limit": view.get("limit"),
            "unreserved_min": view.get("unreserved_min"),
        }

    async def revise(self, req: Request) -> dict:
        if req.principal != CLUSTER:
            raise AccessDeniedException("only the counting service sends revisions")
        self.admission.revise(req.msg.tenant)
        return {}

    # --- invoke --------------------------------------------------------------------------------------------------

    async def invoke(self, req: Request) -> Reply:
        msg = req.msg
        tenant = _tenant(req)
        request_id = new_request_id()
        structlog.contextvars.bind_contextvars(function=msg.function, tenant=tenant, invoke_id=request_id)
        config = await self._resolve(tenant, msg.function, msg.qualifier)
        if msg.invocation_type == "DryRun":
            return Reply({"status_code": 204, "request_id": request_id})
        if msg.invocation_type == "Event":
            raise InvalidParameterValueException(
                "InvocationType Event is not available yet in this region; use RequestResponse"
            )
        payload = req.payload or b""
        if payload:
            try:
                json.loads(payload)
            except ValueError:
                raise InvalidRequestContentException("Could not parse request body into json") from None
        ticket = await self.admission.admit(tenant, config.name, config.timeout_s)
        # Whatever happens, the execution ends by this instant: the ledger frees this credit's lease only after
        # its expiry + the function's timeout + the cold-start allowance, and the worker kills at not_after.
        allowance_s = self.rt.config.settings.cold_start_allowance_s
        not_after_ms = now_ms() + int((config.timeout_s + allowance_s) * 1000)
        try:
            resp = await self._execute(config, request_id, payload, msg.log_tail, not_after_ms)
        except ServiceException as err:
            if getattr(err, "may_still_run", False):
                # We lost the host, not necessarily the execution: its credit stays taken until the worker
                # would have killed it, so a partitioned host can never run more than the limit allows.
                delay = max(0.0, (not_after_ms - now_ms()) / 1000)
                asyncio.get_running_loop().call_later(delay, self.admission.release, ticket)
            else:
                self.admission.release(ticket)
            raise
        except BaseException:
            self.admission.release(ticket)
            raise
        self.admission.release(ticket)
        fields = {"status_code": 200, "request_id": request_id, **resp.fields}
        fields.pop("sandbox_alive", None)
        return Reply(fields, resp.payload)

    async def _resolve(self, tenant: str, name: str, qualifier: str | None) -> m.FunctionConfig:
        if qualifier not in (None, "$LATEST"):
            raise ResourceNotFoundException(f"Function not found: {name}:{qualifier}")
        now = time.monotonic()
        raw = self.cache.get(tenant, name, now)
        if raw is None:
            raw = await self.registry.get_function(tenant, name)
            self.cache.put(tenant, name, raw, now)
        return m.FunctionConfig.from_fields(raw)

    async def _execute(
        self, config: m.FunctionConfig, request_id: str, payload: bytes, log_tail: bool, not_after_ms: int
    ):
        """Reserve a sandbox from the function's manager and run there. An invoke that never reached a host is
        retried once elsewhere; one that may have started is not, and says so."""
        avoid: list[str] = []
        skipped_managers: set[str] = set()
        retried = False
        for _ in range(4):
            manager = await self._manager_for(config.key, skipped_managers)
            try:
                res = await self.managers.reserve(manager, config, request_id, avoid)
            except PeerUnavailable as err:
                log.warning("manager.unreachable", manager=manager, error=str(err))
                skipped_managers.add(manager)
                self._manager_down[manager] = time.monotonic() + MANAGER_DOWN_S
                continue
            release = dict(function_key=config.key, sandbox_id=res["sandbox_id"], request_id=request_id)
            try:
                resp = await self.workers.run(
                    res["endpoint"],
                    sandbox_id=res["sandbox_id"],
                    request_id=request_id,
                    function_key=config.key,
                    payload=payload,
                    timeout_s=config.timeout_s,
                    log_tail=log_tail,
                    not_after_ms=not_after_ms,
                )
            except PeerUnavailable as err:
                self._spawn(self.managers.release(manager, **release, outcome="node_failed"))
                if err.reason == "NotSent" and not retried:
                    retried = True
                    avoid.append(res["node_id"])
                    log.warning("invoke.retrying_elsewhere", failed_node=res["node_id"], error=str(err))
                    continue
                lost = ServiceException(
                    f"the host running this invoke ({res['node_id']}) failed: {err.message}. The function may "
                    "have run; retry if it is safe to run it again.",
                    reason="WorkerLost",
                    retryable=True,
                )
                lost.may_still_run = err.reason != "NotSent"  # it may be running on a host we cannot hear
                raise lost from None
            except (ResourceNotFoundException, ResourceConflictException) as err:
                # the worker no longer has that sandbox (reaped, crashed) or it is busy: nothing ran; go again
                self._spawn(self.managers.release(manager, **release, outcome="gone"))
                log.info("invoke.sandbox_stale", error=str(err))
                continue
            outcome = "ok" if resp.fields.get("sandbox_alive", True) else "gone"
            self._spawn(self.managers.release(manager, **release, outcome=outcome))
            if res.get("cold"):
                resp.fields["cold_start"] = True
            return resp
        raise ServiceException("no worker manager or host could take this invoke; retry shortly", reason="NoRoute")

    async def _manager_for(self, function_key: str, skipped: set[str]) -> str:
        await self.view.refresh()
        nodes = {n["node_id"]: n for n in self.view.healthy("manager")}
        endpoints = {nid: f"tcp://{n['address']}:{n['ports']['manager']}" for nid, n in nodes.items()}
        order = [endpoints[n] for n in rendezvous_order(function_key, endpoints) if endpoints[n] not in skipped]
        now = time.monotonic()
        for endpoint in order:  # a manager that just failed us is skipped until placement catches up
            if self._manager_down.get(endpoint, 0.0) <= now:
                return endpoint
        if order:
            return order[0]
        if self.view.nodes and not nodes:
            raise ServiceException("no healthy worker manager in the region", reason="NoManager")
        raise ServiceException("every worker manager failed this invoke; retry shortly", reason="NoManager")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _tenant(req: Request) -> str:
    tenant = req.tenant
    if tenant is None:
        raise AccessDeniedException("this operation needs a tenant key")
    return tenant


def _check_environment(env: dict[str, str]) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > m.ENV_MAX_BYTES:
        raise InvalidParameterValueException(
            f"environment variables take {size} bytes; the limit is {m.ENV_MAX_BYTES} bytes"
        )
    for key in env:
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise InvalidParameterValueException(f"environment variable name {key!r} is not valid")


def _public(record: dict) -> dict:
    """What a tenant sees of a function record."""
    return {k: v for k, v in record.items() if k != "tenant"}
