"""Front End Invoke: the door tenants and operators come through.

Authenticates (CURVE + ZAP: a key is a tenant's or an operator's, checked again on every request so that a
revoked key stops working on open connections too), resolves name[:version|alias], admits against the
concurrency ledger, routes to the function's worker manager and runs the invoke on a worker. Async (`Event`)
invokes are committed to the replicated queue before their 202; this node's poller runs them later.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from typing import Any

import structlog

from counting.client import CountingClient
from frontend.admission import Admission
from frontend.poller import Poller
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
    RequestTooLargeException,
    ResourceConflictException,
    ResourceNotFoundException,
    ServiceException,
)
from wire.sockets import CLUSTER, Reply, Request, new_request_id, now_ms
from worker.client import WorkerClient

log = structlog.get_logger("frontend")

PRINCIPALS_TTL_S = 1.0  # a revoked key stops working on open connections within about this long
MANAGER_DOWN_S = 3.0  # longer than placement takes to mark a dead node unhealthy
FUNCTION_FIELDS = ("handler", "runtime", "memory_mb", "timeout_s", "environment", "network",
                   "maximum_retry_attempts", "maximum_event_age_s")


class FrontendService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.registry = RegistryClient(rt.control("registry"), self._control_leader)
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
        self.poller = Poller(self, holder)
        self._principals: dict[str, str] = {}
        self._principals_at = float("-inf")  # when the fetch of the map we hold began (monotonic)
        self._principals_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._manager_down: dict[str, float] = {}  # manager endpoint -> skip it until (monotonic)

    async def run(self) -> None:
        self.rt.auth.tenant_lookup = self.principal_for_key
        tenant = self._tenant_only
        server = self.rt.server(
            "frontend",
            {
                m.Invoke: tenant(self.invoke),
                m.CreateFunction: tenant(self.create_function),
                m.GetFunction: tenant(self.get_function),
                m.ListFunctions: tenant(self.list_functions),
                m.DeleteFunction: tenant(self.delete_function),
                m.UpdateFunctionCode: tenant(self.update_code),
                m.UpdateFunctionConfiguration: tenant(self.update_configuration),
                m.PublishVersion: tenant(self.publish_version),
                m.ListVersions: tenant(self.list_versions),
                m.PutAlias: tenant(self.put_alias),
                m.DeleteAlias: tenant(self.delete_alias),
                m.ListAliases: tenant(self.list_aliases),
                m.PutFunctionConcurrency: tenant(self.put_concurrency),
                m.DeleteFunctionConcurrency: tenant(self.delete_concurrency),
                m.GetFunctionConcurrency: tenant(self.get_concurrency),
                m.ListEvents: tenant(self.list_events),
                m.GetEvent: tenant(self.get_event),
                m.RedriveEvents: tenant(self.redrive_events),
                m.TenantCreate: self._operator_only(self.tenant_create),
                m.TenantAddKey: self._operator_only(self.tenant_add_key),
                m.TenantRevokeKey: self._operator_only(self.tenant_revoke_key),
                m.TenantList: self._operator_only(self.tenant_list),
                m.TenantLimit: self._operator_only(self.tenant_limit),
                m.Revise: self.revise,
            },
            zap_domain="tenant",
            allowed=lambda principal: True,  # every handler checks its own kind of caller
        )
        await self.view.refresh(force=True)
        loop = asyncio.get_running_loop()
        renewals = loop.create_task(self.admission.run(), name="admission")
        polling = loop.create_task(self.poller.run(), name="event-poller")
        try:
            await server.serve()
        finally:
            renewals.cancel()
            polling.cancel()

    def _control_leader(self) -> str | None:
        group = self.rt.groups.get("control")
        host = group.leader_host() if group is not None else None
        if group is not None and group.is_leader:
            host = self.rt.config.address
        return self.rt.config.endpoint("registry", host) if host else None

    # --- who is calling ------------------------------------------------------------------------------------------

    async def principal_for_key(self, public_key: bytes) -> str | None:
        """ZAP: whose key opens this connection. Decided on a key map fetched (at the control leader) after the
        connection asked, so a key revoked or added through any frontend counts here at once; connections
        opening together share one fetch."""
        asked = time.monotonic()
        try:
            await self._refresh_principals(newer_than=asked)
        except FlintError:
            pass  # the registry is unreachable: decide on what we knew (static stability)
        return self._principals.get(public_key.decode())

    async def _refresh_principals(self, newer_than: float) -> None:
        """Make sure the key map was fetched no earlier than `newer_than` (monotonic)."""
        if self._principals_at >= newer_than:
            return
        async with self._principals_lock:
            if self._principals_at >= newer_than:
                return  # a fetch that began after we asked finished while we waited
            started = time.monotonic()
            self._principals = await self.registry.principals()
            self._principals_at = started

    async def _still_valid(self, req: Request) -> None:
        """The key that opened this connection must still be active: revocation reaches open connections."""
        try:
            await self._refresh_principals(newer_than=time.monotonic() - PRINCIPALS_TTL_S)
        except FlintError:
            return  # the registry is unreachable: keep serving on what we knew (static stability)
        expected = req.principal.split("|", 1)[0]
        if self._principals.get(req.key or "") != expected:
            raise AccessDeniedException("this key was revoked; ask your operator for a new one")

    def _tenant_only(self, handler):
        async def wrapped(req: Request):
            if req.tenant is None:
                raise AccessDeniedException(f"{req.msg.op} needs a tenant key")
            await self._still_valid(req)
            return await handler(req)

        return wrapped

    def _operator_only(self, handler):
        async def wrapped(req: Request):
            if req.role != "operator":
                raise AccessDeniedException(f"{req.msg.op} needs an operator key")
            await self._still_valid(req)
            return await handler(req)

        return wrapped

    # --- function lifecycle --------------------------------------------------------------------------------------

    async def _code(self, payload: bytes | None) -> tuple[str, int]:
        if not payload:
            raise InvalidParameterValueException("no code: send the zip as the request's payload frame")
        await asyncio.to_thread(validate_zip, payload,
                                unzipped_max_bytes=self.rt.config.settings.unzipped_max_mb * 1024 * 1024)
        await self.registry.put_blob(payload)
        return sha256(payload), len(payload)

    async def create_function(self, req: Request) -> dict:
        msg = req.msg
        _check_environment(msg.environment)
        _check_handler(msg.runtime, msg.handler)
        digest, size = await self._code(req.payload)
        config = m.FunctionConfig(
            tenant=req.tenant, name=msg.name, handler=msg.handler, runtime=msg.runtime, memory_mb=msg.memory_mb,
            timeout_s=msg.timeout_s, environment=msg.environment, code_sha256=digest, code_size=size,
            network=msg.network,
        )
        record = await self.registry.create_function(config, request_id=req.id)
        self.cache.forget(req.tenant, msg.name)
        return {"config": _public(record)}

    async def update_code(self, req: Request) -> dict:
        await self.registry.get_function(req.tenant, req.msg.name)  # missing or not theirs: not found
        digest, size = await self._code(req.payload)
        record = await self.registry.update("update_code", tenant=req.tenant, name=req.msg.name,
                                            code_sha256=digest, code_size=size, request_id=req.id)
        self.cache.forget(req.tenant, req.msg.name)
        return {"config": _public(record)}

    async def update_configuration(self, req: Request) -> dict:
        msg = req.msg
        changes = {f: getattr(msg, f) for f in FUNCTION_FIELDS if getattr(msg, f) is not None}
        if not changes:
            raise InvalidParameterValueException("nothing to change: give at least one setting")
        if "environment" in changes:
            _check_environment(changes["environment"])
        current = await self.registry.get_function(req.tenant, msg.name)
        _check_handler(changes.get("runtime", current["runtime"]), changes.get("handler", current["handler"]))
        record = await self.registry.update("update_config", tenant=req.tenant, name=msg.name, changes=changes,
                                            request_id=req.id)
        self.cache.forget(req.tenant, msg.name)
        return {"config": _public(record)}

    async def get_function(self, req: Request) -> dict:
        choices = await self.registry.describe(req.tenant, req.msg.name, req.msg.qualifier)
        config = _public(choices[0]["config"])
        status = await self.counting.status(req.tenant)
        reserved = status["tenants"].get(req.tenant, {}).get("reserved", {}).get(req.msg.name)
        if reserved is not None:
            config["reserved_concurrency"] = reserved
        return {"config": config}

    async def list_functions(self, req: Request) -> dict:
        return {"functions": [_public(f) for f in await self.registry.list_functions(req.tenant)]}

    async def delete_function(self, req: Request) -> dict:
        await self.registry.delete_function(req.tenant, req.msg.name, request_id=req.id)
        self.cache.forget(req.tenant, req.msg.name)
        try:
            await self.counting.set_reserved(req.tenant, req.msg.name, None)
        except ResourceNotFoundException:
            pass  # it had no reservation
        return {}

    async def publish_version(self, req: Request) -> dict:
        record = await self.registry.update("publish_version", tenant=req.tenant, name=req.msg.name,
                                            description=req.msg.description, request_id=req.id)
        self.cache.forget(req.tenant, req.msg.name)
        return {"config": _public(record)}

    async def list_versions(self, req: Request) -> dict:
        return {"versions": [_public(v) for v in await self.registry.describe(req.tenant, req.msg.name,
                                                                              what="versions")]}

    async def put_alias(self, req: Request) -> dict:
        msg = req.msg
        alias = await self.registry.update(
            "put_alias", tenant=req.tenant, name=msg.name, alias=msg.alias, version=msg.version,
            additional_version=msg.additional_version, weight=msg.weight, create=msg.create, request_id=req.id,
        )
        self.cache.forget(req.tenant, msg.name)
        return {"alias": alias}

    async def delete_alias(self, req: Request) -> dict:
        await self.registry.update("delete_alias", tenant=req.tenant, name=req.msg.name, alias=req.msg.alias,
                                   request_id=req.id)
        self.cache.forget(req.tenant, req.msg.name)
        return {}

    async def list_aliases(self, req: Request) -> dict:
        return {"aliases": await self.registry.describe(req.tenant, req.msg.name, what="aliases")}

    # --- concurrency ---------------------------------------------------------------------------------------------

    async def put_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(req.tenant, req.msg.name)  # ResourceNotFoundException if not theirs
        reserved = await self.counting.set_reserved(req.tenant, req.msg.name, req.msg.reserved)
        return {"reserved_concurrency": reserved}

    async def delete_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(req.tenant, req.msg.name)
        try:
            await self.counting.set_reserved(req.tenant, req.msg.name, None)
        except ResourceNotFoundException:
            pass
        return {}

    async def get_concurrency(self, req: Request) -> dict:
        await self.registry.get_function(req.tenant, req.msg.name)
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

    # --- operator --------------------------------------------------------------------------------------------------

    async def tenant_create(self, req: Request) -> dict:
        tenant = await self.registry.create_tenant(req.msg.tenant, [req.msg.public_key])
        self._principals_at = float("-inf")
        log.info("tenant.created", new_tenant=req.msg.tenant)
        return {"tenant": tenant}

    async def tenant_add_key(self, req: Request) -> dict:
        tenant = await self.registry.update("add_key", tenant=req.msg.tenant, public_key=req.msg.public_key,
                                            request_id=req.id)
        self._principals_at = float("-inf")
        return {"tenant": tenant}

    async def tenant_revoke_key(self, req: Request) -> dict:
        tenant = await self.registry.update("revoke_key", tenant=req.msg.tenant, public_key=req.msg.public_key,
                                            request_id=req.id)
        self._principals_at = float("-inf")
        log.warning("tenant.key_revoked", target_tenant=req.msg.tenant)
        return {"tenant": tenant}

    async def tenant_list(self, req: Request) -> dict:
        return {"tenants": await self.registry.list_tenants()}

    async def tenant_limit(self, req: Request) -> dict:
        if req.msg.limit is not None:
            await self.counting.set_limit(req.msg.tenant, req.msg.limit)
        status = await self.counting.status(req.msg.tenant)
        return {"view": status["tenants"].get(req.msg.tenant, {})}

    # --- async events --------------------------------------------------------------------------------------------

    async def list_events(self, req: Request) -> dict:
        out = await self.registry.events("list", tenant=req.tenant, state=req.msg.state, limit=req.msg.limit)
        return {"events": out["events"], "counts": out["counts"]}

    async def get_event(self, req: Request) -> dict:
        out = await self.registry.events("get", tenant=req.tenant, event_id=req.msg.event_id)
        if out.get("event") is None:
            raise ResourceNotFoundException(f"Event not found: {req.msg.event_id}")
        return {"event": out["event"]}

    async def redrive_events(self, req: Request) -> dict:
        ids = list(req.msg.event_ids) if req.msg.event_ids is not None else None
        out = await self.registry.events("redrive", tenant=req.tenant, event_ids=ids, request_id=req.id)
        return {"redriven": out["result"]}

    # --- invoke --------------------------------------------------------------------------------------------------

    async def invoke(self, req: Request) -> Reply:
        msg = req.msg
        tenant = req.tenant
        payload = req.payload or b""
        structlog.contextvars.bind_contextvars(function=msg.function, tenant=tenant)
        if payload:
            try:
                json.loads(payload)
            except ValueError:
                raise InvalidRequestContentException("Could not parse request body into json") from None
        if msg.invocation_type == "Event":
            if len(payload) > m.ASYNC_PAYLOAD_MAX_BYTES:
                raise RequestTooLargeException(
                    f"Request must be smaller than {m.ASYNC_PAYLOAD_MAX_BYTES} bytes for the Event invocation type"
                )
            config = await self.resolve(tenant, msg.function, msg.qualifier)
            # the client's request id is the idempotency key: a retried accept is the same event
            event_id = "ev-" + _from_client_id(tenant, req.id)
            await self.registry.events(
                "put", payload, request_id=f"put-{event_id}", event_id=event_id, tenant=tenant,
                function=msg.function, qualifier=msg.qualifier, max_retries=config.maximum_retry_attempts,
                max_age_s=config.maximum_event_age_s,
            )
            self.poller.wake.set()  # this node may run it at once
            return Reply({"status_code": 202, "request_id": event_id})
        config = await self.resolve(tenant, msg.function, msg.qualifier)
        if msg.invocation_type == "DryRun":
            return Reply({"status_code": 204, "request_id": new_request_id(),
                          "executed_version": config.version})
        # The client's request id, which its retries keep, names the execution; each handling is an attempt. The
        # function's manager starts one request id for one attempt only, so a retry after a lost frontend cannot
        # run the function a second time.
        digest = _from_client_id(tenant, req.id)
        request_id = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:28]}"
        return await self.run_invoke(tenant, config, request_id, payload, msg.log_tail, attempt=new_request_id())

    async def resolve(self, tenant: str, name: str, qualifier: str | None) -> m.FunctionConfig:
        """name[:qualifier] -> the configuration this invoke runs (an alias's weight rolled here)."""
        cache_name = name if qualifier in (None, "$LATEST") else f"{name}:{qualifier}"
        now = time.monotonic()
        choices = self.cache.get(tenant, cache_name, now)
        if choices is None:
            choices = await self.registry.describe(tenant, name, qualifier)
            self.cache.put(tenant, cache_name, choices, now)
        roll, chosen = random.random(), choices[-1]
        for choice in choices:
            if roll < choice["weight"]:
                chosen = choice
                break
            roll -= choice["weight"]
        return m.FunctionConfig.from_fields(chosen["config"])

    async def run_invoke(self, tenant: str, config: m.FunctionConfig, request_id: str, payload: bytes,
                         log_tail: bool = False, attempt: str | None = None) -> Reply:
        """Admit, route and run one invoke (sync, or an async event's delivery). With `attempt`, the manager
        refuses to start `request_id` for any other attempt (an event's redelivery has none: it is meant to run
        again)."""
        structlog.contextvars.bind_contextvars(invoke_id=request_id)
        ticket = await self.admission.admit(tenant, config.name, config.timeout_s)
        # Whatever happens, the execution ends by this instant: the ledger frees this credit's lease only after
        # its expiry + the function's timeout + the cold-start allowance, and the worker kills at not_after.
        allowance_s = self.rt.config.settings.cold_start_allowance_s
        not_after_ms = now_ms() + int((config.timeout_s + allowance_s) * 1000)
        try:
            resp = await self._execute(config, request_id, payload, log_tail, not_after_ms, attempt)
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

    async def _execute(
        self, config: m.FunctionConfig, request_id: str, payload: bytes, log_tail: bool, not_after_ms: int,
        attempt: str | None = None,
    ):
        """Reserve a sandbox from the function's manager and run there. An invoke that never reached a host is
        retried once elsewhere; one that may have started is not, and says so."""
        avoid: list[str] = []
        skipped_managers: set[str] = set()
        why: list[str] = []
        retried = False
        rounds = 0
        for _ in range(8):
            if skipped_managers and self._all_managers_in(skipped_managers) and rounds < 2 \
                    and all(w.endswith("NotSent") for w in why):
                # every manager failed before the request left (nodes busy starting, a handshake still under
                # way): nothing ran anywhere, so wait a moment and go round once more
                rounds += 1
                await asyncio.sleep(0.3 * rounds)
                skipped_managers.clear()
            manager = await self._manager_for(config.key, skipped_managers, why)
            try:
                res = await self.managers.reserve(manager, config, request_id, avoid, attempt=attempt)
            except PeerUnavailable as err:
                log.warning("manager.unreachable", manager=manager, error=str(err))
                skipped_managers.add(manager)
                why.append(f"{manager}: {err.reason}")
                self._manager_down[manager] = time.monotonic() + MANAGER_DOWN_S
                continue
            release = dict(function_key=config.key, sandbox_id=res["sandbox_id"], request_id=request_id)
            try:
                resp = await self.workers.run(
                    res["endpoint"], sandbox_id=res["sandbox_id"], request_id=request_id, function_key=config.key,
                    payload=payload, timeout_s=config.timeout_s, log_tail=log_tail, not_after_ms=not_after_ms,
                )
            except PeerUnavailable as err:
                self._spawn(self.managers.release(manager, **release,
                                                  outcome="not_sent" if err.reason == "NotSent" else "node_failed"))
                if err.reason == "NotSent" and not retried:
                    retried = True
                    avoid.append(res["node_id"])
                    log.warning("invoke.retrying_elsewhere", failed_node=res["node_id"], error=str(err))
                    continue
                if err.reason == "NotSent":  # the second host could not be reached either: nothing ran
                    raise ServiceException(
                        f"the hosts chosen for this invoke could not be reached (the last: {res['node_id']}); "
                        "the function did not run. Retry shortly.", reason="WorkerUnreachable") from None
                lost = ServiceException(
                    f"the host running this invoke ({res['node_id']}) failed: {err.message}. The function may "
                    "have run; retry if it is safe to run it again.",
                    reason="WorkerLost",
                    retryable=True,
                )
                lost.may_still_run = True  # it may be running on a host we cannot hear
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

    def _all_managers_in(self, endpoints: set[str]) -> bool:
        return all(f"tcp://{n['address']}:{n['ports']['manager']}" in endpoints for n in self.view.healthy("manager"))

    async def _manager_for(self, function_key: str, skipped: set[str], why: list[str] = ()) -> str:
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
        raise ServiceException(f"every worker manager failed this invoke ({'; '.join(why)}); retry shortly",
                               reason="NoManager")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _check_environment(env: dict[str, str]) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > m.ENV_MAX_BYTES:
        raise InvalidParameterValueException(
            f"environment variables take {size} bytes; the limit is {m.ENV_MAX_BYTES} bytes"
        )
    for key in env:
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise InvalidParameterValueException(f"environment variable name {key!r} is not valid")
        if key.startswith("AWS_") or key.startswith("FLINT_") or key == "LAMBDA_TASK_ROOT":
            raise InvalidParameterValueException(f"environment variable {key} is reserved")


def _check_handler(runtime: str, handler: str) -> None:
    if runtime == "python3" and "." not in handler:
        raise InvalidParameterValueException(f"handler {handler!r} must be module.function for python3")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What a tenant sees of a function record."""
    return {k: v for k, v in record.items() if k != "tenant"}


def _from_client_id(tenant: str, client_request_id: str) -> str:
    """32 hex digits naming what a client's request causes (an event, an execution): the same for every retry
    of that request, and never the same for two tenants."""
    return hashlib.sha256(f"{tenant}\0{client_request_id}".encode()).hexdigest()[:32]
