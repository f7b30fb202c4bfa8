"""Worker service: makes sandboxes on this host, runs invokes in them, keeps the code cache."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
import zipfile
from pathlib import Path

import structlog

from manager.client import ManagerClient
from placement.client import NodeView, PlacementClient
from registry.client import RegistryClient
from registry.package import unpack
from wire import messages as m
from wire.errors import (
    FlintError,
    InvalidZipFileException,
    Reason,
    ServiceException,
    error_fields,
)
from wire.host import Host
from wire.ids import now_ms
from wire.messages import ReleaseOutcome
from wire.server import Request
from wire.tasks import Background
from worker import isolation as iso
from worker.cgroups import RECORD, host_cgroups, parent_name
from worker.network import SandboxNetwork, no_safe_network
from worker.replies import error_json, invalid_response
from worker.sandbox import Outcome, SandboxProcess
from worker.slots import SlotPool
from worker.state import (
    BUSY,
    IDLE,
    CodeCache,
    OrphanWatch,
    SandboxEntry,
    WorkerState,
    live_managers,
)
from worker.zygote_client import Zygote, ZygoteLost

log = structlog.get_logger("worker")


class WorkerService:
    def __init__(self, host: Host):
        self.host = host
        self.state = WorkerState()
        settings = host.config.settings
        self.cache = CodeCache(settings.code_cache_mb * 1024 * 1024)
        self.processes: dict[str, SandboxProcess] = {}
        self.registry = RegistryClient(host.control("registry"))
        self.managers = ManagerClient(host.pool)
        self.code_root = host.config.data_dir / "code"
        self.run_root = host.config.data_dir / "sandboxes"
        self._code_locks: dict[str, asyncio.Lock] = {}
        self._zygote_lock = asyncio.Lock()  # one replacement at a time, however many cold starts found it lost
        self._background = Background("worker")
        self._unzipped_max_bytes = settings.unzipped_max_mb * 1024 * 1024
        self._seq = itertools.count()
        data_dir = host.config.data_dir  # the sandboxes' cgroups under a parent of this node's alone
        self.cgroups = (host_cgroups(parent_name(host.node_id, data_dir), record=data_dir / RECORD)
                        if os.geteuid() == 0 else None)
        self.caps = iso.probe(self.cgroups)
        self.zygote = self._new_zygote()
        self.network = SandboxNetwork.for_node(host.config, self.caps)
        self.pool = self._new_pool()
        host.facts.isolation = self.caps.label()
        host.facts.isolation_details = self.caps.details()
        # Operators (and the chaos tests) can have every execution's start and end recorded on this host's
        # monotonic clock: "S <t> <request id> <tenant> <function>" and "E <t> <request id>", flushed as written.
        self._journal = (
            open(host.config.data_dir / "executions.log", "a", buffering=1)
            if host.config.settings.record_executions else None
        )

    async def run(self) -> None:
        shutil.rmtree(self.run_root, ignore_errors=True)  # sandboxes never outlive their worker process
        self.run_root.mkdir(parents=True, exist_ok=True)
        if not self.caps.full:
            log.warning("worker.partial_isolation", isolation=self.caps.label(), missing=self.caps.reasons)
        await self.network.start()
        self.host.facts.isolation_details = {**self.caps.details(), "network": self.network.details()}
        await self.zygote.start()
        self.pool.start()
        self._background.spawn(self._reap_orphans(), name="orphan-reaper")
        server = self.host.server(
            "worker",
            {
                m.CreateSandbox: self.create_sandbox,
                m.Run: self.run_invoke,
                m.DestroySandbox: self.destroy_sandbox,
                m.ListSandboxes: self.list_sandboxes,
            },
        )
        try:
            await server.serve()
        finally:
            self._background.cancel()
            await self.close_all()

    async def close_all(self) -> None:
        try:
            procs = list(self.processes.values())
            self.processes.clear()
            await asyncio.gather(*(p.close() for p in procs), return_exceptions=True)
            await self.pool.close()
            self.zygote.close()
        finally:
            self.network.close()  # even when the node's stop cancels the awaits above
            if self.cgroups is not None:
                self.cgroups.close()  # what the sandboxes' own clean-up left, and the parents: nothing stays

    # --- handlers ------------------------------------------------------------------------------------------------

    async def create_sandbox(self, req: Request) -> m.SandboxCreated:
        msg = req.msg
        config = msg.config
        if config.network and not self.network.available:  # never the host's network instead
            raise no_safe_network(self.network.why)
        entry = SandboxEntry(msg.sandbox_id, config.key, config.code_sha256, msg.manager, memory_mb=config.memory_mb)
        # the sandbox's place and memory are taken before anything awaits, so concurrent cold starts cannot
        # both pass the check: the host's limits hold however many arrive at once
        self.state.admit(entry, self.host.now(), max_sandboxes=self.host.config.settings.max_sandboxes,
                         capacity_mb=self.host.config.sandbox_capacity_mb)
        try:
            code_dir = await self._code(config.code_sha256)
        except BaseException:
            self.state.remove(msg.sandbox_id)
            raise
        try:
            proc = await self._start_sandbox(msg.sandbox_id, config, code_dir)
        except Exception as exc:
            self.state.remove(msg.sandbox_id)
            log.exception("sandbox.start_failed", sandbox_id=msg.sandbox_id, function=config.name)
            if isinstance(exc, FlintError):
                raise  # already says why (its sandbox network's addresses all in use, say)
            raise ServiceException(f"could not start a sandbox on {self.host.node_id}: {exc}") from exc
        self.processes[msg.sandbox_id] = proc
        self.state.ready(msg.sandbox_id)
        self._publish()
        log.info(
            "sandbox.created",
            sandbox_id=msg.sandbox_id,
            function=config.name,
            tenant=config.tenant,
            cold_ms=round(proc.init_ms, 2),
            init_error=(proc.init_error or {}).get("errorType"),
        )
        return m.SandboxCreated(init_ms=proc.init_ms, isolation=self.caps.label())

    async def run_invoke(self, req: Request) -> m.RunResult:
        msg = req.msg
        max_s = None
        if msg.not_after_ms is not None:
            max_s = (msg.not_after_ms - now_ms()) / 1000
            if max_s <= 0:
                raise ServiceException(
                    "the invoke's admission ran out before a sandbox was ready; nothing ran, retry",
                    reason=Reason.ADMISSION_EXPIRED,
                    retryable=True,
                )
        entry = self.state.begin(msg.sandbox_id, msg.request_id, self.host.now())
        proc = self.processes[msg.sandbox_id]
        structlog.contextvars.bind_contextvars(function=proc.config.name, sandbox_id=msg.sandbox_id)
        if self._journal is not None:
            self._journal.write(f"S {time.monotonic():.6f} {msg.request_id} {proc.config.tenant} {proc.config.name}\n")
        outcome = await proc.invoke(msg.request_id, msg.payload or b"", msg.log_tail, max_s)
        if self._journal is not None:
            self._journal.write(f"E {time.monotonic():.6f} {msg.request_id}\n")
        if entry.reclaimed:  # the platform took the sandbox away mid-invoke: a platform error, not the function's
            self._tell_manager(entry, msg.request_id, ReleaseOutcome.GONE)
            raise ServiceException(
                "the platform stopped the sandbox running this invoke (its host's capacity was taken back); the "
                "function did not fail, but may have run in part. Invoke again if that is safe.",
                reason=Reason.SANDBOX_RECLAIMED, retryable=True, may_still_run=True)
        result = _run_result(proc, msg.request_id, outcome)
        if result.sandbox_alive and proc.alive:
            self.state.end(msg.sandbox_id, self.host.now())
            self._tell_manager(entry, msg.request_id, ReleaseOutcome.OK)
        else:
            await self._discard(msg.sandbox_id)
            self._tell_manager(entry, msg.request_id, ReleaseOutcome.GONE)
            log.info("sandbox.retired", why=(result.payload or b"")[:200].decode(errors="replace"))
        return result

    async def destroy_sandbox(self, req: Request) -> m.Destroyed:
        self._reclaim(req.msg.sandbox_id)
        return m.Destroyed(destroyed=await self._discard(req.msg.sandbox_id))

    def _reclaim(self, sandbox_id: str) -> None:
        """The platform is destroying a sandbox: an invoke running in it ends as the platform's error."""
        entry = self.state.sandboxes.get(sandbox_id)
        if entry is not None and entry.state == BUSY:
            entry.reclaimed = True

    async def list_sandboxes(self, req: Request) -> m.Sandboxes:
        return m.Sandboxes(sandboxes=tuple(m.SandboxView.from_fields(v) for v in self.state.view()),
                           node_id=self.host.node_id)

    # --- internals -----------------------------------------------------------------------------------------------

    async def _reap_orphans(self) -> None:
        """Destroys the sandboxes whose manager has been gone for `orphan_grace_s` (the rule: OrphanWatch in
        worker/state.py); nothing while placement cannot be reached."""
        view = NodeView(PlacementClient(self.host.control("placement")), max_age_s=1.0)
        grace = self.host.config.settings.orphan_grace_s
        watch = OrphanWatch(grace)
        while True:
            await asyncio.sleep(min(2.0, grace / 2))
            await view.refresh()
            await self.network.refuse_peers(n.address for n in view.nodes)
            live = live_managers(view.nodes if view.last_error is None else None)
            for entry in watch.to_reap(self.state, live, time.monotonic()):
                # checked again here: an earlier discard in this loop yielded, and the sandbox may be busy now
                if self.state.sandboxes.get(entry.sandbox_id) is entry and entry.state == IDLE:
                    await self._discard(entry.sandbox_id)
                    log.info("sandbox.orphan_reaped", sandbox_id=entry.sandbox_id, manager=entry.manager)

    async def _start_sandbox(self, sandbox_id: str, config: m.FunctionConfig, code_dir: Path) -> SandboxProcess:
        """A cold start on a working zygote: one that died, or let a spawn go unanswered (hung: it is killed,
        worker/zygote_client.py), is replaced first, and a start it failed is tried once more on the new one."""
        if not self.zygote.alive:
            await self._restart_zygote()
        try:
            return await SandboxProcess.start(sandbox_id, config, code_dir, pool=self.pool)
        except ZygoteLost:
            await self._restart_zygote()
            return await SandboxProcess.start(sandbox_id, config, code_dir, pool=self.pool)

    async def _restart_zygote(self) -> None:
        """The zygote died or hung: its sandboxes die with it (killed first, so nothing waits on a zygote that
        reports nothing); forget them and start a new one."""
        async with self._zygote_lock:
            if self.zygote.alive:
                return  # another cold start replaced it meanwhile
            log.error("zygote.restarting", why=self.zygote.lost, sandboxes_lost=len(self.processes))
            self.zygote.close()
            for sandbox_id in list(self.processes):
                self._reclaim(sandbox_id)
                await self._discard(sandbox_id)
            await self.pool.close()
            self.zygote = self._new_zygote()
            self.pool = self._new_pool()
            await self.zygote.start()
            self.pool.start()

    def _new_zygote(self) -> Zygote:
        return Zygote(self.caps, self.host.config.cores, self.host.config.settings.zygote_spawn_timeout_s)

    def _new_pool(self) -> SlotPool:
        settings = self.host.config.settings
        return SlotPool(self.zygote, self.cgroups, self.run_root, size=settings.sandbox_pool,
                        pids_max=settings.sandbox_pids_max, tmp_mb=settings.sandbox_tmp_mb,
                        freeze_after_s=settings.sandbox_freeze_after_s, network=self.network)

    async def _discard(self, sandbox_id: str) -> bool:
        entry = self.state.remove(sandbox_id)
        proc = self.processes.pop(sandbox_id, None)
        if proc is not None:
            await proc.close()
        self._publish()
        return entry is not None

    def _publish(self) -> None:
        self.host.facts.sandboxes = len(self.state.sandboxes)
        self.host.facts.sandbox_memory_mb = self.state.memory_mb()

    def _tell_manager(self, entry: SandboxEntry, request_id: str, outcome: ReleaseOutcome) -> None:
        """The manager learns the sandbox is free (or gone) even if the frontend that ran the invoke dies."""
        release = m.ManagerRelease(
            function_key=entry.function_key, sandbox_id=entry.sandbox_id, request_id=request_id, outcome=outcome
        )
        self._background.spawn(self.managers.release(entry.manager, release), name="tell-manager")

    async def _code(self, digest: str) -> Path:
        path = self.code_root / digest
        if self.cache.touch(digest, self.host.now()) and path.exists():
            return path
        lock = self._code_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if path.exists():
                self.cache.touch(digest, self.host.now()) or self.cache.add(
                    digest, _du(path), self.host.now(), self.state.code_in_use()
                )
                return path
            began = time.perf_counter()
            data = await self.registry.get_blob(digest)
            try:
                size = await asyncio.to_thread(unpack, data, path, unzipped_max_bytes=self._unzipped_max_bytes)
            except (FlintError, OSError, ValueError, zipfile.BadZipFile) as exc:
                shutil.rmtree(path, ignore_errors=True)
                log.warning("code.unpack_failed", code_sha256=digest, **error_fields(exc))
                raise InvalidZipFileException(
                    f"Flint could not unpack the function's code package on this host: {_message(exc)}. Upload a "
                    "new package (update-code).") from None
            for old in self.cache.add(digest, size, self.host.now(), self.state.code_in_use()):
                shutil.rmtree(self.code_root / old, ignore_errors=True)
            log.info("code.cached", code_sha256=digest, bytes=size, ms=round((time.perf_counter() - began) * 1000, 1))
            return path


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, FlintError) else f"{type(exc).__name__}: {exc}"


def _run_result(proc: SandboxProcess, request_id: str, outcome: Outcome) -> m.RunResult:
    """The reply to the frontend, checked as the frontend will decode it. The sandbox's reply was checked
    already (worker/replies.py); should anything still not fit, it is the invoke's InvalidResponse and the
    sandbox is retired: never a reply the worker cannot send, which the frontend would take for a lost host."""
    result = m.RunResult(executed_version=proc.config.version, sandbox_alive=outcome.alive,
                         function_error=outcome.function_error or None, log_tail=outcome.log, payload=outcome.payload)
    try:
        return result.checked()
    except FlintError as err:
        log.error("sandbox.reply_unusable", **error_fields(err))
        proc.kill()
        return m.RunResult(executed_version=proc.config.version, sandbox_alive=False, function_error="Unhandled",
                           payload=error_json(invalid_response(request_id, err.message)))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

