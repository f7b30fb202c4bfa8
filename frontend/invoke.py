"""The invoke path of a frontend: resolve, admit, route to the function's manager, run on a worker.

Sync invokes answer the client; async (`Event`) ones are committed to the replicated queue before their 202, and
this node's poller delivers them later through `run` (frontend/poller.py). The decisions (which manager, what a
failure allows, an alias's canary roll) are frontend/state.py's; this module carries them out.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

import structlog

from frontend.admission import Admission
from frontend.state import Ask, FunctionCache, InvokePlan, ManagersDown, Pause, choose
from manager.client import ManagerClient
from placement.client import NodeView
from registry.client import RegistryClient
from wire import messages as m
from wire.errors import (
    FlintError,
    InvalidRequestContentException,
    PeerUnavailable,
    Reason,
    RequestTooLargeException,
    ResourceConflictException,
    ResourceNotFoundException,
    error_fields,
)
from wire.ids import new_request_id, now_ms, scoped_id
from wire.messages import InvocationType, ReleaseOutcome
from wire.server import Request
from wire.tasks import Background
from wire.transport import node_endpoint
from worker.client import WorkerClient

log = structlog.get_logger("frontend.invoke")


class Invoker:
    def __init__(self, registry: RegistryClient, admission: Admission, view: NodeView, managers: ManagerClient,
                 workers: WorkerClient, cache: FunctionCache, cold_start_allowance_s: float):
        self.registry = registry
        self.admission = admission
        self.view = view
        self.managers = managers
        self.workers = workers
        self.cache = cache
        self.cold_start_allowance_s = cold_start_allowance_s
        self.managers_down = ManagersDown()
        self.event_accepted = asyncio.Event()  # set when this node accepts an event: its poller may run it at once
        self._background = Background("invoke")

    async def invoke(self, req: Request) -> m.InvokeResult:
        msg = req.msg
        tenant = req.tenant
        payload = msg.payload or b""
        structlog.contextvars.bind_contextvars(function=msg.function, tenant=tenant)
        if payload:
            check_json(payload)
        if msg.invocation_type == InvocationType.EVENT:
            if len(payload) > m.ASYNC_PAYLOAD_MAX_BYTES:
                raise RequestTooLargeException(
                    f"Request must be smaller than {m.ASYNC_PAYLOAD_MAX_BYTES} bytes for the Event invocation type"
                )
            config = await self.resolve(tenant, msg.function, msg.qualifier)
            # the client's request id is the idempotency key: a retried accept is the same event
            event_id = "ev-" + scoped_id(tenant, msg.op, req.id)
            await self.registry.command(m.EventsPut(
                event_id=event_id, tenant=tenant, function=msg.function, qualifier=msg.qualifier,
                max_retries=config.maximum_retry_attempts, max_age_s=config.maximum_event_age_s, payload=payload,
            ), request_id=f"put-{event_id}")
            self.event_accepted.set()
            return m.InvokeResult(status_code=202, request_id=event_id)
        config = await self.resolve(tenant, msg.function, msg.qualifier)
        if msg.invocation_type == InvocationType.DRY_RUN:
            return m.InvokeResult(status_code=204, request_id=new_request_id(), executed_version=config.version)
        # The client's request id, which its retries keep, names the execution; each handling is an attempt. The
        # function's manager starts one request id for one attempt only, so a retry after a lost frontend cannot
        # run the function a second time.
        digest = scoped_id(tenant, msg.op, req.id)
        request_id = str(uuid.UUID(digest))  # shaped as a uuid, as Lambda request ids are
        return await self.run(tenant, config, request_id, payload, msg.log_tail, attempt=new_request_id())

    async def resolve(self, tenant: str, name: str, qualifier: str | None) -> m.FunctionConfig:
        """name[:qualifier] -> the configuration this invoke runs (an alias's weight rolled here)."""
        cache_name = name if qualifier in (None, "$LATEST") else f"{name}:{qualifier}"
        now = time.monotonic()
        choices = self.cache.get(tenant, cache_name, now)
        if choices is None:
            choices = await self.registry.resolve(tenant, name, qualifier)
            self.cache.put(tenant, cache_name, choices, now)
        return choose(choices, random.random())

    async def run_event(self, event: m.EventView) -> m.InvokeResult:
        """Deliver an async event: its id is the execution's request id, and a redelivery is meant to run again."""
        config = await self.resolve(event.tenant, event.function, event.qualifier)
        return await self.run(event.tenant, config, event.event_id, event.payload or b"")

    async def run(self, tenant: str, config: m.FunctionConfig, request_id: str, payload: bytes,
                  log_tail: bool = False, attempt: str | None = None) -> m.InvokeResult:
        """Admit, route and run one invoke. With `attempt`, the manager refuses to start `request_id` for any
        other attempt."""
        structlog.contextvars.bind_contextvars(invoke_id=request_id)
        ticket = await self.admission.admit(tenant, config.name, config.timeout_s)
        # Whatever happens, the execution ends by this instant: the ledger frees this credit's lease only after
        # its expiry + the function's timeout + the cold-start allowance, and the worker kills at not_after.
        not_after_ms = now_ms() + int((config.timeout_s + self.cold_start_allowance_s) * 1000)
        try:
            result = await self._execute(config, request_id, payload, log_tail, not_after_ms, attempt)
        except BaseException as err:
            if isinstance(err, FlintError) and err.may_still_run:
                # We lost the host, not necessarily the execution: its credit stays taken until the worker
                # would have killed it, so a partitioned host can never run more than the limit allows.
                delay = max(0.0, (not_after_ms - now_ms()) / 1000)
                asyncio.get_running_loop().call_later(delay, self.admission.release, ticket)
            else:
                self.admission.release(ticket)
            raise
        self.admission.release(ticket)
        return result

    async def _execute(self, config: m.FunctionConfig, request_id: str, payload: bytes, log_tail: bool,
                       not_after_ms: int, attempt: str | None) -> m.InvokeResult:
        plan = InvokePlan(config.function_id, self.managers_down)
        key = config.key  # the sandbox pool this invoke draws on (a hash: made once)
        while True:
            await self.view.refresh()
            managers = {n.node_id: node_endpoint(n, "manager") for n in self.view.healthy("manager")}
            step = plan.next(managers, region_has_nodes=bool(self.view.nodes), now=time.monotonic())
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                continue
            assert isinstance(step, Ask)
            manager = step.manager
            try:
                res = await self.managers.reserve(manager, config, request_id, plan.avoid_nodes, attempt=attempt)
            except PeerUnavailable as err:
                log.warning("manager.unreachable", manager=manager, **error_fields(err))
                plan.manager_unreachable(manager, err.reason, time.monotonic())
                continue
            run = m.Run(sandbox_id=res.sandbox_id, request_id=request_id, function_key=key,
                        log_tail=log_tail, not_after_ms=not_after_ms, payload=payload)
            try:
                out = await self.workers.run(res.endpoint, run, config.timeout_s)
            except PeerUnavailable as err:
                not_sent = err.reason == Reason.NOT_SENT
                self._release(manager, key, res, request_id,
                              ReleaseOutcome.NOT_SENT if not_sent else ReleaseOutcome.NODE_FAILED)
                plan.host_unreachable(res.node_id, err.reason, err.message)  # raises unless it may go elsewhere
                log.warning("invoke.retrying_elsewhere", failed_node=res.node_id, **error_fields(err))
                continue
            except (ResourceNotFoundException, ResourceConflictException) as err:
                # the worker no longer has that sandbox (reaped, crashed) or it is busy: nothing ran; go again
                self._release(manager, key, res, request_id, ReleaseOutcome.GONE)
                log.info("invoke.sandbox_stale", **error_fields(err))
                continue
            except FlintError as err:  # the worker refused or ended the run: the manager hears what became of it
                gone = err.reason == Reason.SANDBOX_RECLAIMED
                self._release(manager, key, res, request_id, ReleaseOutcome.GONE if gone else ReleaseOutcome.OK)
                raise
            self._release(manager, key, res, request_id,
                          ReleaseOutcome.OK if out.sandbox_alive else ReleaseOutcome.GONE)
            return m.InvokeResult(status_code=200, request_id=request_id, executed_version=out.executed_version,
                                  function_error=out.function_error, log_tail=out.log_tail, cold_start=res.cold,
                                  payload=out.payload)

    def _release(self, manager: str, key: str, res: m.Reservation, request_id: str,
                 outcome: ReleaseOutcome) -> None:
        release = m.ManagerRelease(function_key=key, sandbox_id=res.sandbox_id, request_id=request_id,
                                   outcome=outcome)
        self._background.spawn(self.managers.release(manager, release), name="manager-release")



def check_json(payload: bytes) -> None:
    """An invoke's payload must be JSON as Lambda reads it: no NaN or Infinity, and not nested past what a
    parser can follow. A refusal names the problem; nothing of the invoke runs."""
    try:
        json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestContentException(
            "Could not parse request body into json: it is nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequestContentException(f"Could not parse request body into json: {exc}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
