"""Worker manager service: hands out warm sandboxes, creates new ones on worker capacity it leases from
placement, reaps idle ones, drains and returns leases, and tells placement which hosts fail."""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from manager.health import HostHealth, counts_against_host
from manager.state import BUSY, IDLE, HeldWorkerLease, ManagerState, SandboxRecord
from placement.client import NodeView, PlacementClient
from wire import messages as m
from wire.errors import (
    FlintError,
    PeerUnavailable,
    Reason,
    ServiceException,
    TooManyRequestsException,
    error_fields,
)
from wire.host import Host
from wire.messages import ReleaseOutcome
from wire.server import Request
from wire.tasks import Background
from wire.transport import node_endpoint
from worker.client import WorkerClient

log = structlog.get_logger("manager")

HOUSEKEEPING_INTERVAL_S = 1.0


class ManagerService:
    def __init__(self, host: Host):
        self.host = host
        settings = host.config.settings
        self.state = ManagerState(settings.keep_alive_s, drain_margin_s=min(60.0, settings.worker_lease_s / 4))
        self.placement = PlacementClient(host.control("placement"))
        self.view = NodeView(self.placement, max_age_s=0.25)
        self.workers = WorkerClient(host.pool)
        self.endpoint = host.config.endpoint("manager")
        self.health = HostHealth()
        self._background = Background("manager")
        self._leasing = asyncio.Lock()

    async def run(self) -> None:
        server = self.host.server(
            "manager",
            {m.Reserve: self.reserve, m.ManagerRelease: self.release, m.ManagerStatus: self.status,
             m.RetireFunction: self.retire_function},
        )
        await self.view.refresh(force=True)
        await self._rebuild()
        self.host.on_stop("manager", self.hand_back)
        self._background.spawn(self._housekeeping(), name="manager-housekeeping")
        try:
            await server.serve()
        finally:
            self._background.cancel()

    # --- handlers ------------------------------------------------------------------------------------------------

    async def reserve(self, req: Request) -> m.Reservation:
        msg = req.msg
        config = msg.config
        key = config.key
        avoid = set(msg.avoid_nodes) | self.health.avoid()
        if msg.attempt is not None and not self.state.claim(msg.request_id, msg.attempt, self.host.now()):
            log.warning("invoke.duplicate_refused", invoke_id=msg.request_id, function=config.name)
            raise ServiceException(
                f"invoke {msg.request_id} was already started by an earlier try of the same request, whose "
                "frontend was lost; it may have run, so it is not started again. Invoke again (a new request) "
                "if running it twice is safe.", reason=Reason.ALREADY_STARTED, retryable=False)
        try:
            return await self._reserve(msg, config, key, avoid)
        except BaseException:
            if msg.attempt is not None:
                self.state.unclaim(msg.request_id, msg.attempt)  # no sandbox was handed out: nothing ran
            raise

    async def _reserve(self, msg: m.Reserve, config: m.FunctionConfig, key: str, avoid: set[str]) -> m.Reservation:
        record = self.state.reserve(key, msg.request_id, self.host.now(), avoid)
        if record is not None:
            return _reservation(record, cold=False)
        self._destroy_all(self.state.retire_stale(key), why="configuration_changed")
        cap_mb = self.host.config.settings.tenant_sandbox_memory_mb
        if cap_mb:
            victims = self.state.make_room(config.tenant, config.memory_mb, cap_mb)
            if victims is None:
                raise TooManyRequestsException(
                    f"Rate Exceeded. Your running sandboxes hold the {cap_mb} MB of memory your functions may use "
                    "at this manager; retry when some finish, or ask your operator for more.",
                    reason=Reason.TENANT_MEMORY)
            self._destroy_all(victims, why="tenant_memory_cap")
        await self.view.refresh()
        full = 0  # hosts that said they had no room: all of them means no capacity, not sick hosts
        refused: ServiceException | None = None  # a worker that cannot give a function with network its own
        for _ in range(3):
            try:
                lease = await self._capacity_for(config, avoid)
            except FlintError:
                if refused is not None:
                    raise refused from None  # what the tenant can act on, rather than "no capacity elsewhere"
                raise
            # the sandbox's memory is taken on its lease before anything awaits: concurrent cold starts of a
            # big function cannot all land on the one lease that has room for one
            record = SandboxRecord(
                f"{lease.node_id}-{os.urandom(6).hex()}", key, lease.node_id, lease.az, lease.endpoint, state=BUSY,
                request_id=msg.request_id, lease_id=lease.lease_id, memory_mb=config.memory_mb,
            )
            self.state.add(record, self.host.now())
            began = time.perf_counter()
            try:
                created = await self.workers.create_sandbox(lease.endpoint, record.sandbox_id, config, self.endpoint)
            except BaseException as err:
                self.state.remove(record.sandbox_id)
                if not isinstance(err, ServiceException):
                    raise  # the function's own fault (its code cannot be unpacked), or we were cancelled
                if counts_against_host(err):
                    self._report(lease.node_id, ok=False)
                full += err.reason == Reason.WORKER_FULL
                if err.reason == Reason.NO_SAFE_NETWORK:
                    refused = err
                avoid.add(lease.node_id)
                log.warning("sandbox.create_failed", target_node=lease.node_id, **error_fields(err))
                continue
            cold_ms = (time.perf_counter() - began) * 1000
            log.info("sandbox.placed", function=config.name, target_node=lease.node_id, az=lease.az,
                     cold_ms=round(cold_ms, 1))
            return _reservation(record, cold=True, init_ms=created.init_ms)
        if refused is not None:
            raise refused
        if full == 3:
            raise no_capacity("every host tried is full")
        raise ServiceException("could not create a sandbox on any healthy worker; retry",
                               reason=Reason.NO_HEALTHY_WORKER)

    async def _capacity_for(self, config: m.FunctionConfig, avoid: set[str]) -> HeldWorkerLease:
        """Leased capacity for one more sandbox of this function, leasing more from placement if needed."""
        key, memory = config.key, config.memory_mb
        lease = self.state.place(key, memory, self.host.now(), avoid)
        if lease is not None:
            return lease
        async with self._leasing:  # one lease request at a time: a burst of cold starts shares what it brings
            lease = self.state.place(key, memory, self.host.now(), avoid)
            if lease is not None:
                return lease
            if self.state.placement_full(time.monotonic()):  # it just said so: the rest of a burst hears at once
                raise no_capacity("placement has no free worker capacity")
            settings = self.host.config.settings
            # Where capacity is already leased, placement is asked for a lease in another AZ only briefly: if it
            # cannot answer (its leader is failing over) or has no room, stacking in one AZ beats failing.
            fallback = self.state.place(key, memory, self.host.now(), avoid, spread=False)
            try:
                granted = await self.placement.lease_worker(
                    f"{self.host.node_id}-{os.urandom(6).hex()}", self.endpoint,
                    max(settings.lease_block_mb, memory), settings.worker_lease_s,
                    prefer_azs=self.state.wanted_azs(key, self.view.azs()), avoid_nodes=sorted(avoid),
                    timeout_s=0.5 if fallback is not None else 3.0,
                )
            except FlintError as err:
                if fallback is not None:
                    log.info("worker_lease.fallback_to_stacking", function=config.name, **error_fields(err))
                    return fallback
                if err.reason == Reason.NO_CAPACITY:
                    self.state.note_placement_full(time.monotonic())
                    raise no_capacity("placement has no free worker capacity") from None
                raise
            self._adopt_lease(granted.lease, granted.node)
        # the new lease may be in the same AZ (no capacity elsewhere): then stacking is allowed
        lease = self.state.place(key, memory, self.host.now(), avoid, spread=False)
        if lease is None:
            raise no_capacity("the capacity leased for it was taken by other cold starts")
        return lease

    def _adopt_lease(self, lease: m.WorkerLeaseView, node: m.NodeView) -> None:
        self.state.add_lease(HeldWorkerLease(lease.lease_id, lease.node_id, node.az, node_endpoint(node, "worker"),
                                             lease.memory_mb, lease.expires_at), self.host.now())
        log.info("worker_lease.taken", lease_id=lease.lease_id, target_node=lease.node_id, az=node.az,
                 memory_mb=lease.memory_mb)

    async def release(self, req: Request) -> m.Released:
        msg = req.msg
        record = self.state.sandboxes.get(msg.sandbox_id)
        if msg.outcome == ReleaseOutcome.OK:
            released = self.state.release(msg.sandbox_id, msg.request_id, self.host.now())
            if record is not None and self.health.owes_successes(record.node_id):
                self._report(record.node_id, ok=True)
            if released and record is not None and record.retired:
                self._destroy_all([record], why="retired")
        elif msg.outcome == ReleaseOutcome.GONE:
            released = self.state.remove(msg.sandbox_id) is not None
        else:  # node_failed, not_sent: the frontend could not reach the host; stop routing there until placement says
            if msg.outcome == ReleaseOutcome.NOT_SENT:
                self.state.unclaim(msg.request_id)  # the invoke never reached the host: it may start elsewhere
            released = record is not None
            if record is not None:
                gone = self.state.drop_nodes([record.node_id])
                self._report(record.node_id, ok=False)
                log.warning("node.reported_failed", target_node=record.node_id, sandboxes_dropped=len(gone))
                # a sandbox no longer routed to is destroyed, in case its host is alive after all: it must not
                # keep running (and holding memory) where nothing will ever use or reap it
                self._destroy_all(gone, why="host_unreachable")
        return m.Released(released=released)

    async def retire_function(self, req: Request) -> m.Retired:
        idle = self.state.retire_function(req.msg.tenant, req.msg.name)
        self._destroy_all(idle, why="function_deleted")
        return m.Retired(retired=len(idle))

    async def hand_back(self) -> None:
        """On a graceful stop: idle sandboxes destroyed, and the worker leases nothing runs on given back to
        placement, so their capacity serves other managers at once."""
        idle, leases = self.state.hand_back()
        await asyncio.gather(*(self._destroy(r, why="manager_stopping") for r in idle),
                             *(self._return(lease) for lease in leases))

    def _destroy_all(self, records: list[SandboxRecord], why: str) -> None:
        for record in records:
            self._background.spawn(self._destroy(record, why), name="sandbox-destroy")

    async def status(self, req: Request) -> m.ManagerSummary:
        return m.ManagerSummary(**self.state.summary(), unhealthy_nodes=tuple(sorted(self.health.avoid())))

    # --- host outcomes -------------------------------------------------------------------------------------------

    def _report(self, node_id: str, ok: bool) -> None:
        """Tell placement how an invoke on a host went (3 failures of its last 10 make it suspect), as sparingly
        as manager.health says."""
        if self.health.should_report(node_id, ok):
            self._background.spawn(self._send_report(node_id, ok, self.health.incarnation(node_id)),
                                   name="host-report")

    async def _send_report(self, node_id: str, ok: bool, incarnation: int | None) -> None:
        try:
            await self.placement.report(node_id, ok, incarnation)
        except FlintError as err:
            log.info("node.report_unheard", target_node=node_id, ok=ok, **error_fields(err))

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
        changes = self.health.observe(self.view.nodes, time.monotonic())
        for node_id in changes.restarted:
            gone = self.state.drop_nodes([node_id])  # the host restarted: its old sandboxes died with it
            if gone:
                log.info("node.restarted", target_node=node_id, sandboxes_dropped=len(gone))
        self.state.drain_nodes(n.node_id for n in self.view.nodes if n.draining)
        if changes.forgotten:
            self._destroy_all(self.state.drop_nodes(changes.forgotten), why="host_unhealthy")
        short_azs = await self._sync_leases()
        self._destroy_all(self.state.reap_idle(self.host.now()), why="idle")
        for lease in self.state.leases_to_return(self.host.now(), short_azs):
            self._background.spawn(self._return(lease), name="worker-lease-return")

    async def _sync_leases(self) -> list[str]:
        """Placement revokes worker leases on hosts that went bad; what it no longer lists is gone here too.
        Returns the AZs placement says are short of free capacity."""
        try:
            listed = await self.placement.list_leases(self.endpoint)
        except FlintError as err:  # keep routing on what we know
            log.info("worker_lease.list_failed", **error_fields(err))
            return []
        held = {lease.lease_id: lease for lease in listed.leases}
        for lease_id in [i for i in self.state.leases if i not in held]:
            gone = self.state.drop_lease(lease_id)
            self._destroy_all(gone, why="worker_lease_revoked")
            log.info("worker_lease.revoked", lease_id=lease_id, sandboxes_dropped=len(gone))
        for lease_id, lease in held.items():
            if lease_id not in self.state.leases and lease.node is not None:
                self._adopt_lease(lease, lease.node)
        return list(listed.headroom.short_azs)

    async def _return(self, lease: HeldWorkerLease) -> None:
        try:
            await self.placement.return_lease(lease.lease_id)
            log.info("worker_lease.returned", lease_id=lease.lease_id, target_node=lease.node_id,
                     why=lease.return_why)
        except FlintError as err:  # it expires on its own
            log.info("worker_lease.return_unheard", lease_id=lease.lease_id, **error_fields(err))

    async def _destroy(self, record: SandboxRecord, why: str) -> None:
        try:
            await self.workers.destroy(record.endpoint, record.sandbox_id)
            log.info("sandbox.destroyed", sandbox_id=record.sandbox_id, target_node=record.node_id, why=why)
        except FlintError as err:  # its worker reaps it as an orphan in the end
            log.info("sandbox.destroy_unheard", sandbox_id=record.sandbox_id, target_node=record.node_id,
                     **error_fields(err))

    async def _rebuild(self) -> None:
        """After a restart: take back our leases from placement and our sandboxes from the workers."""
        await self._sync_leases()
        adopted = 0
        for lease in list(self.state.leases.values()):
            try:
                sandboxes = await self.workers.list_sandboxes(lease.endpoint)
            except FlintError as err:  # its worker reaps what it had as orphans
                log.warning("manager.rebuild_missed_host", target_node=lease.node_id, **error_fields(err))
                continue
            for s in sandboxes:
                if s.manager != self.endpoint or s.state not in (IDLE, BUSY):
                    continue
                record = SandboxRecord(
                    s.sandbox_id, s.function_key, lease.node_id, lease.az, lease.endpoint,
                    state=s.state, invocations=s.invocations, lease_id=lease.lease_id, memory_mb=s.memory_mb,
                )
                self.state.adopt(record, self.host.now())
                adopted += 1
        if adopted:
            log.info("manager.rebuilt", sandboxes=adopted, leases=len(self.state.leases))


def no_capacity(detail: str) -> TooManyRequestsException:
    """The region has no room for another sandbox: a throttle the caller hears at once, not a failure."""
    return TooManyRequestsException(
        f"Rate Exceeded. There is no worker capacity for this function now ({detail}). Retry with backoff; if "
        "this lasts, the operator should add worker hosts.", reason=Reason.NO_CAPACITY)


def _reservation(record: SandboxRecord, *, cold: bool, init_ms: float = 0.0) -> m.Reservation:
    return m.Reservation(sandbox_id=record.sandbox_id, node_id=record.node_id, endpoint=record.endpoint, cold=cold,
                         init_ms=init_ms)
