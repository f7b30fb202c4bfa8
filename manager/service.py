"""Worker manager service: hands out warm sandboxes, creates new ones on worker capacity it leases from
placement, reaps idle ones, drains and returns leases, and tells placement which hosts fail."""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from manager.state import BUSY, IDLE, LeaseRecord, ManagerState, SandboxRecord
from nodes.runtime import Runtime
from placement.client import NodeView, PlacementClient
from wire import messages as m
from wire.errors import FlintError, PeerUnavailable, ServiceException
from wire.sockets import Request
from worker.client import WorkerClient

log = structlog.get_logger("manager")

HOUSEKEEPING_INTERVAL_S = 1.0
FORGET_UNHEALTHY_AFTER_S = 10.0  # a host unhealthy this long has lost its sandboxes as far as we route
REPORT_SUCCESSES = 10  # after a failure on a host, report this many successes so its error window can clear


def worker_endpoint(node: dict) -> str:
    return f"tcp://{node['address']}:{node['ports']['worker']}"


class ManagerService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        settings = rt.config.settings
        self.state = ManagerState(settings.keep_alive_s, drain_margin_s=min(60.0, settings.worker_lease_s / 4))
        self.placement = PlacementClient(rt.control("placement"))
        self.view = NodeView(self.placement, max_age_s=0.25)
        self.workers = WorkerClient(rt.pool)
        self.endpoint = rt.config.endpoint("manager")
        self._unhealthy_since: dict[str, float] = {}
        self._incarnations: dict[str, int] = {}
        self._report_ok: dict[str, int] = {}  # node -> successes still to report after a failure
        self._background: set[asyncio.Task] = set()
        self._leasing = asyncio.Lock()

    async def run(self) -> None:
        server = self.rt.server(
            "manager", {m.Reserve: self.reserve, m.ManagerRelease: self.release, m.ManagerStatus: self.status}
        )
        await self.view.refresh(force=True)
        await self._rebuild()
        keeper = asyncio.get_running_loop().create_task(self._housekeeping(), name="manager-housekeeping")
        try:
            await server.serve()
        finally:
            keeper.cancel()

    # --- handlers ------------------------------------------------------------------------------------------------

    async def reserve(self, req: Request) -> dict:
        msg = req.msg
        config = msg.config
        key = config.key
        avoid = set(msg.avoid_nodes) | set(self._unhealthy_since)
        if msg.attempt is not None and not self.state.claim(msg.request_id, msg.attempt, self.rt.now()):
            log.warning("invoke.duplicate_refused", invoke_id=msg.request_id, function=config.name)
            raise ServiceException(
                f"invoke {msg.request_id} was already started by an earlier try of the same request, whose "
                "frontend was lost; it may have run, so it is not started again. Invoke again (a new request) "
                "if running it twice is safe.", reason="AlreadyStarted", retryable=False)
        try:
            return await self._reserve(msg, config, key, avoid)
        except BaseException:
            if msg.attempt is not None:
                self.state.unclaim(msg.request_id, msg.attempt)  # no sandbox was handed out: nothing ran
            raise

    async def _reserve(self, msg: m.Reserve, config: m.FunctionConfig, key: str, avoid: set[str]) -> dict:
        record = self.state.reserve(key, msg.request_id, self.rt.now(), avoid)
        if record is not None:
            return _reservation(record, cold=False)
        await self.view.refresh()
        for _ in range(3):
            lease = await self._capacity_for(config, avoid)
            sandbox_id = f"{lease.node_id}-{os.urandom(6).hex()}"
            began = time.perf_counter()
            try:
                resp = await self.workers.create_sandbox(lease.endpoint, sandbox_id, config, self.endpoint)
            except PeerUnavailable as err:
                log.warning("sandbox.create_unreachable", target_node=lease.node_id, error=str(err))
                self._report(lease.node_id, ok=False)
                avoid.add(lease.node_id)
                continue
            except ServiceException as err:
                if err.reason != "WorkerFull":
                    self._report(lease.node_id, ok=False)
                avoid.add(lease.node_id)
                log.warning("sandbox.create_failed", target_node=lease.node_id, error=str(err))
                continue
            record = SandboxRecord(
                sandbox_id, key, lease.node_id, lease.az, lease.endpoint, state=BUSY, request_id=msg.request_id,
                lease_id=lease.lease_id, memory_mb=config.memory_mb,
            )
            self.state.add(record, self.rt.now())
            cold_ms = (time.perf_counter() - began) * 1000
            log.info("sandbox.placed", function=config.name, target_node=lease.node_id, az=lease.az,
                     cold_ms=round(cold_ms, 1))
            return _reservation(record, cold=True, init_ms=resp.fields.get("init_ms", 0.0))
        raise ServiceException("could not create a sandbox on any healthy worker; retry", reason="NoHealthyWorker")

    async def _capacity_for(self, config: m.FunctionConfig, avoid: set[str]) -> LeaseRecord:
        """Leased capacity for one more sandbox of this function, leasing more from placement if needed."""
        key, memory = config.key, config.memory_mb
        lease = self.state.place(key, memory, self.rt.now(), avoid)
        if lease is not None:
            return lease
        async with self._leasing:  # one lease request at a time: a burst of cold starts shares what it brings
            lease = self.state.place(key, memory, self.rt.now(), avoid)
            if lease is not None:
                return lease
            settings = self.rt.config.settings
            # Where capacity is already leased, placement is asked for a lease in another AZ only briefly: if it
            # cannot answer (its leader is failing over) or has no room, stacking in one AZ beats failing.
            fallback = self.state.place(key, memory, self.rt.now(), avoid, spread=False)
            try:
                granted = await self.placement.lease_worker(
                    f"{self.rt.node_id}-{os.urandom(6).hex()}", self.endpoint,
                    max(settings.lease_block_mb, memory), settings.worker_lease_s,
                    prefer_azs=self.state.wanted_azs(key, self.view.azs()), avoid_nodes=sorted(avoid),
                    timeout_s=0.5 if fallback is not None else 3.0,
                )
            except FlintError as err:
                if fallback is not None:
                    log.info("lease.fallback_to_stacking", function=config.name, reason=err.reason)
                    return fallback
                raise
            self._adopt_lease(granted["lease"], granted["node"])
        # the new lease may be in the same AZ (no capacity elsewhere): then stacking is allowed
        lease = self.state.place(key, memory, self.rt.now(), avoid, spread=False)
        if lease is None:
            raise ServiceException("leased capacity is already taken; retry", reason="NoCapacity")
        return lease

    def _adopt_lease(self, lease: dict, node: dict) -> None:
        self.state.add_lease(LeaseRecord(lease["lease_id"], lease["node_id"], node["az"], worker_endpoint(node),
                                         lease["memory_mb"], lease["expires_at"]), self.rt.now())
        log.info("lease.taken", lease_id=lease["lease_id"], target_node=lease["node_id"], az=node["az"],
                 memory_mb=lease["memory_mb"])

    async def release(self, req: Request) -> dict:
        msg = req.msg
        record = self.state.sandboxes.get(msg.sandbox_id)
        if msg.outcome == "ok":
            released = self.state.release(msg.sandbox_id, msg.request_id, self.rt.now())
            if record is not None and self._report_ok.get(record.node_id):
                self._report(record.node_id, ok=True)
        elif msg.outcome == "gone":
            released = self.state.remove(msg.sandbox_id) is not None
        else:  # node_failed, not_sent: the frontend could not reach the host; stop routing there until placement says
            if msg.outcome == "not_sent":
                self.state.unclaim(msg.request_id)  # the invoke never reached the host: it may start elsewhere
            released = record is not None
            if record is not None:
                gone = self.state.drop_nodes([record.node_id])
                self._report(record.node_id, ok=False)
                log.warning("node.reported_failed", target_node=record.node_id, sandboxes_dropped=len(gone))
        return {"released": released}

    async def status(self, req: Request) -> dict:
        return {**self.state.summary(), "unhealthy_nodes": sorted(self._unhealthy_since)}

    # --- host outcomes -------------------------------------------------------------------------------------------

    def _report(self, node_id: str, ok: bool) -> None:
        """Failures always go to placement (3 of the last 10 make a host suspect); successes only while a
        recent failure is still in the host's window, so the healthy majority costs no commits."""
        if ok:
            left = self._report_ok.get(node_id, 0)
            if left <= 0:
                return
            self._report_ok[node_id] = left - 1
        else:
            self._report_ok[node_id] = REPORT_SUCCESSES
        self._spawn(self._send_report(node_id, ok))

    async def _send_report(self, node_id: str, ok: bool) -> None:
        try:
            await self.placement.report(node_id, ok, self._incarnations.get(node_id))
        except FlintError:
            pass

    # --- background ----------------------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                await self._sweep()
            except Exception:
                log.exception("manager.housekeeping_failed")

    async def _sweep(self) -> None:
        await self.view.refresh()
        now = time.monotonic()
        for node in self.view.nodes:
            node_id = node["node_id"]
            if node["healthy"]:
                self._unhealthy_since.pop(node_id, None)
            else:
                self._unhealthy_since.setdefault(node_id, now)
            previous = self._incarnations.get(node_id)
            if previous is not None and previous != node["incarnation"]:
                gone = self.state.drop_nodes([node_id])  # the host restarted: its old sandboxes died with it
                if gone:
                    log.info("node.restarted", target_node=node_id, sandboxes_dropped=len(gone))
            self._incarnations[node_id] = node["incarnation"]
        self.state.drain_nodes(n["node_id"] for n in self.view.nodes if n.get("draining"))
        stale = [n for n, since in self._unhealthy_since.items() if now - since > FORGET_UNHEALTHY_AFTER_S]
        if stale:
            self.state.drop_nodes(stale)
        short_azs = await self._sync_leases()
        for record in self.state.reap_idle(self.rt.now()):
            self._spawn(self._destroy(record))
        for lease in self.state.leases_to_return(self.rt.now(), short_azs):
            self._spawn(self._return(lease))

    async def _sync_leases(self) -> list[str]:
        """Placement revokes leases on hosts that went bad; what it no longer lists is gone here too. Returns
        the AZs placement says are short of free capacity."""
        try:
            leases, headroom = await self.placement.list_leases(self.endpoint)
        except FlintError:
            return []  # keep routing on what we know
        held = {lease["lease_id"]: lease for lease in leases}
        for lease_id in [i for i in self.state.leases if i not in held]:
            gone = self.state.drop_lease(lease_id)
            for record in gone:
                self._spawn(self._destroy(record))
            log.info("lease.revoked", lease_id=lease_id, sandboxes_dropped=len(gone))
        for lease_id, lease in held.items():
            if lease_id not in self.state.leases:
                self._adopt_lease(lease, lease["node"])
        return list(headroom.get("short_azs", ()))

    async def _return(self, lease: LeaseRecord) -> None:
        try:
            await self.placement.return_lease(lease.lease_id)
            log.info("lease.returned", lease_id=lease.lease_id, target_node=lease.node_id, why=lease.return_why)
        except FlintError:
            pass  # it expires on its own

    async def _destroy(self, record: SandboxRecord) -> None:
        try:
            await self.workers.destroy(record.endpoint, record.sandbox_id)
            log.info("sandbox.reaped", sandbox_id=record.sandbox_id, target_node=record.node_id)
        except FlintError:
            pass

    async def _rebuild(self) -> None:
        """After a restart: take back our leases from placement and our sandboxes from the workers."""
        await self._sync_leases()
        adopted = 0
        for lease in list(self.state.leases.values()):
            try:
                sandboxes = await self.workers.list_sandboxes(lease.endpoint)
            except FlintError:
                continue
            for s in sandboxes:
                if s["manager"] != self.endpoint or s["state"] not in (IDLE, BUSY):
                    continue
                record = SandboxRecord(
                    s["sandbox_id"], s["function_key"], lease.node_id, lease.az, lease.endpoint,
                    state=IDLE if s["state"] == IDLE else BUSY, invocations=s["invocations"],
                    lease_id=lease.lease_id, memory_mb=s.get("memory_mb", 128),
                )
                self.state.adopt(record, self.rt.now())
                adopted += 1
        if adopted:
            log.info("manager.rebuilt", sandboxes=adopted, leases=len(self.state.leases))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _reservation(record: SandboxRecord, *, cold: bool, init_ms: float = 0.0) -> dict:
    return {
        "sandbox_id": record.sandbox_id,
        "node_id": record.node_id,
        "endpoint": record.endpoint,
        "cold": cold,
        "init_ms": init_ms,
    }
