"""Worker manager service: hands out warm sandboxes, creates them on healthy workers, reaps idle ones."""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from manager.state import BUSY, IDLE, ManagerState, SandboxRecord, WorkerCandidate
from nodes.runtime import Runtime
from placement.client import NodeView, PlacementClient
from wire import messages as m
from wire.errors import FlintError, PeerUnavailable, ServiceException
from wire.sockets import Request
from worker.client import WorkerClient

log = structlog.get_logger("manager")

HOUSEKEEPING_INTERVAL_S = 1.0
FORGET_UNHEALTHY_AFTER_S = 10.0  # a host unhealthy this long has lost its sandboxes as far as we route


def worker_endpoint(node: dict) -> str:
    return f"tcp://{node['address']}:{node['ports']['worker']}"


class ManagerService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.state = ManagerState(rt.config.settings.keep_alive_s)
        self.view = NodeView(PlacementClient(rt.control("placement")), max_age_s=0.25)
        self.workers = WorkerClient(rt.pool)
        self.endpoint = rt.config.endpoint("manager")
        self._unhealthy_since: dict[str, float] = {}
        self._incarnations: dict[str, int] = {}
        self._background: set[asyncio.Task] = set()

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
        record = self.state.reserve(key, msg.request_id, self.rt.now(), avoid)
        if record is not None:
            return _reservation(record, cold=False)
        await self.view.refresh()
        for _ in range(3):
            candidates = [
                WorkerCandidate(n["node_id"], n["az"], worker_endpoint(n), n.get("sandboxes", 0))
                for n in self.view.healthy("worker")
            ]
            choice = self.state.choose_worker(key, candidates, avoid)
            if choice is None:
                raise ServiceException(
                    "no healthy worker host is available for a new sandbox; check `flint cluster status`",
                    reason="NoHealthyWorker",
                )
            sandbox_id = f"{choice.node_id}-{os.urandom(6).hex()}"
            began = time.perf_counter()
            try:
                resp = await self.workers.create_sandbox(choice.endpoint, sandbox_id, config, self.endpoint)
            except PeerUnavailable as err:
                log.warning("sandbox.create_unreachable", target_node=choice.node_id, error=str(err))
                avoid.add(choice.node_id)
                continue
            except ServiceException as err:
                if err.reason != "WorkerFull":
                    raise
                avoid.add(choice.node_id)
                continue
            record = SandboxRecord(
                sandbox_id, key, choice.node_id, choice.az, choice.endpoint, state=BUSY, request_id=msg.request_id
            )
            self.state.add(record, self.rt.now())
            cold_ms = (time.perf_counter() - began) * 1000
            log.info("sandbox.placed", function=config.name, target_node=choice.node_id, cold_ms=round(cold_ms, 1))
            return _reservation(record, cold=True, init_ms=resp.fields.get("init_ms", 0.0))
        raise ServiceException("could not create a sandbox on any healthy worker; retry", reason="NoHealthyWorker")

    async def release(self, req: Request) -> dict:
        msg = req.msg
        if msg.outcome == "ok":
            released = self.state.release(msg.sandbox_id, msg.request_id, self.rt.now())
        elif msg.outcome == "gone":
            released = self.state.remove(msg.sandbox_id) is not None
        else:  # node_failed: the frontend could not reach the host; stop routing there until placement says
            record = self.state.sandboxes.get(msg.sandbox_id)
            released = record is not None
            if record is not None:
                gone = self.state.drop_nodes([record.node_id])
                log.warning("node.reported_failed", target_node=record.node_id, sandboxes_dropped=len(gone))
        return {"released": released}

    async def status(self, req: Request) -> dict:
        return {**self.state.summary(), "unhealthy_nodes": sorted(self._unhealthy_since)}

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
        known = {n["node_id"]: n for n in self.view.nodes}
        for node_id, node in known.items():
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
        stale = [n for n, since in self._unhealthy_since.items() if now - since > FORGET_UNHEALTHY_AFTER_S]
        if stale:
            self.state.drop_nodes(stale)
        for record in self.state.reap_idle(self.rt.now()):
            self._spawn(self._destroy(record))

    async def _destroy(self, record: SandboxRecord) -> None:
        try:
            await self.workers.destroy(record.endpoint, record.sandbox_id)
            log.info("sandbox.reaped", sandbox_id=record.sandbox_id, target_node=record.node_id)
        except FlintError:
            pass

    async def _rebuild(self) -> None:
        """After a restart: take back the sandboxes the workers still hold for this manager."""
        adopted = 0
        for node in self.view.healthy("worker"):
            try:
                sandboxes = await self.workers.list_sandboxes(worker_endpoint(node))
            except FlintError:
                continue
            for s in sandboxes:
                if s["manager"] != self.endpoint or s["state"] not in (IDLE, BUSY):
                    continue
                record = SandboxRecord(
                    s["sandbox_id"], s["function_key"], node["node_id"], node["az"], worker_endpoint(node),
                    state=IDLE if s["state"] == IDLE else BUSY, invocations=s["invocations"],
                )
                self.state.adopt(record, self.rt.now())
                adopted += 1
        if adopted:
            log.info("manager.rebuilt", sandboxes=adopted)

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
