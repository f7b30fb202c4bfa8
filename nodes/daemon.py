"""The node daemon: runs one host's roles under a supervisor.

A role that crashes is restarted with backoff; one that crashes more than `role_restarts` times within
`role_restart_window_s` ends the node with a non-zero exit, so a host is never left half alive. SIGTERM drains:
every service refuses new requests (ShuttingDown, so callers go elsewhere at once) and the requests in hand,
running invokes included, get up to `shutdown_grace_s` to finish; then every role stops (sandboxes included),
the Raft groups close and the node exits 0. A write to the data dir that fails (wire/persist.py) ends the node at
once with one `node.persistence_failed` line and EXIT_PERSISTENCE_FAILED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import tomli_w
import uvloop

from wire import log as flog
from wire import messages as m
from wire.config import RAFT_GROUPS, NodeConfig
from wire.errors import error_fields
from wire.host import Host
from wire.persist import DiskWatch, on_failure, persisting
from wire.raft import GroupConfig, RaftGroup, cluster_password
from wire.server import Request

log = structlog.get_logger("node")

# Exit codes besides 0 (stopped as asked) and the `flint` command's own (2: a bad config, saying what is wrong):
EXIT_ROLE_FAILED = 3  # a role crashed more than role_restarts times within role_restart_window_s
# A write to the data dir failed (no space, no inodes, an I/O error): logged `node.persistence_failed` with the path
# and the error; free space or inodes there (or replace the disk) and start the node again
EXIT_PERSISTENCE_FAILED = 4
HAND_BACK_S = 3.0
ROLE_STOP_S = 10.0  # a role told to stop gets this long to clean up after itself  # after the drain: credit and worker leases go back to their owners within this


class InjectedCrash(Exception):
    pass


@dataclasses.dataclass
class RoleRunner:
    name: str
    factory: Callable[[], Awaitable[None]]
    restarts: list[float] = dataclasses.field(default_factory=list)
    state: str = "starting"
    crash: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def run_once(self) -> None:
        role = asyncio.get_running_loop().create_task(self.factory(), name=f"role:{self.name}")
        fault = asyncio.get_running_loop().create_task(self.crash.wait())
        self.state = "running"
        try:
            done, _ = await asyncio.wait({role, fault}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # the node is stopping: the role must stop too, and get to run its own clean-up (sandboxes, slots,
            # cgroups) before the node goes, not be dropped half way when the loop closes
            role.cancel()
            await asyncio.wait({role}, timeout=ROLE_STOP_S)
            raise
        finally:
            fault.cancel()
        if fault in done and not role.done():
            role.cancel()
            await asyncio.gather(role, return_exceptions=True)
            self.crash.clear()
            raise InjectedCrash(f"fault injected into role {self.name}")
        await role  # raises what the role raised; a role that returns is also a failure


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.host: Host | None = None
        self.roles: dict[str, RoleRunner] = {}
        self.started = time.time()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        s = config.settings
        self.disk = DiskWatch([config.data_dir, config.data_dir / "raft", config.data_dir / "blobs"],
                              interval_s=s.persist_probe_interval_s, min_free_mb=s.persist_min_free_mb,
                              min_free_inodes=s.persist_min_free_inodes)
        self._failing = threading.Lock()

    async def run(self) -> int:
        c = self.config
        flog.bind(node=c.node_id, az=c.az)
        on_failure(self._persistence_failed)
        self.host = host = Host(c)
        host.auth.start()
        self._start_raft(host)
        self._plan_roles(host)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("node.starting", roles=list(c.roles), address=c.address, pid=os.getpid())
        self._tasks = [loop.create_task(self._supervise(r), name=f"supervise:{r.name}") for r in self.roles.values()]
        self._tasks.append(loop.create_task(self.disk.run(), name="disk-watch"))
        await self._stop.wait()
        log.info("node.stopping", exit_code=self.exit_code)
        if self.exit_code == 0:  # asked to stop (SIGTERM): what is running gets its grace
            grace_s = c.settings.shutdown_grace_s
            unfinished = await host.drain(grace_s)
            log.info("node.drained", grace_s=grace_s, unfinished=unfinished)
            await host.hand_back(HAND_BACK_S)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        host.close()
        log.info("node.stopped", exit_code=self.exit_code)
        return self.exit_code

    # --- Raft replicas ---------------------------------------------------------------------------------------------

    @property
    def _hosting_file(self) -> Path:
        return self.config.data_dir / "raft" / "hosted.toml"

    def _raft_plan(self) -> dict[str, list[str] | None]:
        """group -> the peers of this node's replica, or None where it hosts none. Control nodes host every group
        with the other control nodes as peers; membership changes made at run time override that (hosted.toml)."""
        c = self.config
        plan: dict[str, list[str] | None] = {
            g: ([c.raft_address(g, a) for a in c.control_nodes if a != c.address] if "control" in c.roles else None)
            for g in RAFT_GROUPS
        }
        if self._hosting_file.exists():
            for group, entry in tomllib.loads(self._hosting_file.read_text()).items():
                if group in plan:
                    plan[group] = list(entry.get("peers", [])) if entry.get("hosted") else None
        return plan

    def _save_hosting(self, group: str, peers: list[str] | None) -> None:
        current = tomllib.loads(self._hosting_file.read_text()) if self._hosting_file.exists() else {}
        current[group] = {"hosted": peers is not None, "peers": list(peers or [])}
        with persisting(self._hosting_file):
            self._hosting_file.parent.mkdir(parents=True, exist_ok=True)
            self._hosting_file.write_text(tomli_w.dumps(current))

    def _start_raft(self, host: Host) -> None:
        for group, peers in self._raft_plan().items():
            if peers is not None:
                self._start_group(host, group, peers)

    def _start_group(self, host: Host, group: str, peers: list[str]) -> RaftGroup:
        c = self.config
        from counting.state import Ledger
        from placement.state import PlacementState
        from registry.state import ControlState

        states = {
            "control": ControlState,  # its limits (backoff, quotas, retention) come from the leader's settings
            "counting": lambda: Ledger(
                default_limit=c.settings.default_tenant_limit,
                unreserved_min=c.settings.unreserved_min,
                cold_start_allowance_s=c.settings.cold_start_allowance_s,
            ),
            "placement": lambda: PlacementState(c.settings.heartbeat_interval_s * c.settings.missed_heartbeats,
                                                hold_down_s=c.settings.hold_down_s,
                                                tick_interval_s=c.settings.heartbeat_interval_s),
        }
        with persisting(c.data_dir / "raft"):
            (c.data_dir / "raft").mkdir(parents=True, exist_ok=True)
        cfg = GroupConfig(group, c.raft_address(group), list(peers), c.data_dir / "raft", cluster_password(c.keys_dir),
                          compaction_entries=c.settings.raft_compaction_entries,
                          compaction_interval_s=c.settings.raft_compaction_interval_s,
                          compaction_mb=c.settings.raft_compaction_mb)
        host.groups[group] = RaftGroup(cfg, states[group]())
        return host.groups[group]

    def _plan_roles(self, host: Host) -> None:
        c = self.config
        plans: dict[str, Callable[[], Awaitable[None]]] = {"admin": self._admin, "agent": self._agent}
        if "control" in c.roles:
            plans["control"] = self._control
        elif "counting" in host.groups:
            plans["counting"] = self._counting_only  # a counting replica added to a non-control node
        if "worker" in c.roles:
            plans["worker"] = self._worker
        if "manager" in c.roles:
            plans["manager"] = self._manager
        if "frontend" in c.roles:
            plans["frontend"] = self._frontend
        self.roles = {name: RoleRunner(name, factory) for name, factory in plans.items()}

    async def _supervise(self, runner: RoleRunner) -> None:
        settings = self.config.settings
        while True:
            try:
                await runner.run_once()
                raise RuntimeError(f"role {runner.name} returned")
            except asyncio.CancelledError:
                runner.state = "stopped"
                raise
            except Exception as exc:
                now = time.monotonic()
                runner.restarts = [t for t in runner.restarts if now - t < settings.role_restart_window_s]
                runner.restarts.append(now)
                runner.state = "restarting"
                if len(runner.restarts) > settings.role_restarts:
                    log.error("role.giving_up", role=runner.name, restarts=len(runner.restarts), **error_fields(exc))
                    runner.state = "failed"
                    self.exit_code = EXIT_ROLE_FAILED
                    self._stop.set()
                    return
                backoff = min(5.0, 0.2 * 2 ** (len(runner.restarts) - 1))
                log.warning("role.crashed", role=runner.name, restart_in_s=backoff, **error_fields(exc),
                            exc_info=not isinstance(exc, InjectedCrash))
                await asyncio.sleep(backoff)

    def _persistence_failed(self, path: str, err: OSError) -> None:
        """A write to the data dir failed, on whichever thread (wire/persist.py): one line, and the node ends at
        once, without a drain: a Raft replica must not answer after a write it could not make (pysyncobj would log
        and retry for ever), and its sandboxes die with it (parent-death signal), as on a SIGKILL."""
        with self._failing:  # another thread failing meanwhile waits here for the exit: one line
            try:
                log.critical("node.persistence_failed", path=path, **error_fields(err),
                             exit_code=EXIT_PERSISTENCE_FAILED, node=self.config.node_id, az=self.config.az,  # any thread
                             action="the node stopped rather than run on what it cannot write: free space or inodes "
                                    "on that filesystem (or replace the disk), then start the node again; its Raft "
                                    "replicas catch up from their peers and its missing code blobs are copied back")
            finally:
                os._exit(EXIT_PERSISTENCE_FAILED)

    # --- roles ---------------------------------------------------------------------------------------------------

    async def _control(self) -> None:
        from counting.service import CountingService
        from placement.service import PlacementService
        from registry.service import RegistryService

        host = self.host
        assert host is not None
        await asyncio.gather(
            RegistryService(host, host.groups["control"]).run(),
            CountingService(host).run(),
            PlacementService(host, host.groups["placement"]).run(),
        )

    async def _counting_only(self) -> None:
        from counting.service import CountingService

        assert self.host is not None
        await CountingService(self.host).run()

    async def _worker(self) -> None:
        from worker.service import WorkerService

        assert self.host is not None
        await WorkerService(self.host).run()

    async def _manager(self) -> None:
        from manager.service import ManagerService

        assert self.host is not None
        await ManagerService(self.host).run()

    async def _frontend(self) -> None:
        from frontend.service import FrontendService

        assert self.host is not None
        await FrontendService(self.host).run()

    async def _agent(self) -> None:
        from placement.agent import PlacementAgent

        assert self.host is not None
        await PlacementAgent(self.host).run()

    async def _admin(self) -> None:
        assert self.host is not None
        server = self.host.server(
            "admin",
            {m.NodeStatus: self._status, m.InjectFault: self._inject, m.RaftJoin: self._raft_join,
             m.RaftLeave: self._raft_leave},
        )
        await server.serve()

    async def _status(self, req: Request) -> m.NodeStatusReply:
        assert self.host is not None
        c = self.config
        return m.NodeStatusReply(
            node_id=c.node_id,
            az=c.az,
            address=c.address,
            roles=tuple(c.roles),
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started, 1),
            role_states={n: m.RoleState(state=r.state, restarts=len(r.restarts)) for n, r in self.roles.items()},
            raft={name: g.status() for name, g in self.host.groups.items()},
            isolation=self.host.facts.isolation,
            isolation_details=self.host.facts.isolation_details,
            sandboxes=self.host.facts.sandboxes,
            can_persist=self.disk.can_persist,
            persist_problem=self.disk.problem,
        )

    async def _inject(self, req: Request) -> m.FaultInjected:
        runner = self.roles.get(req.msg.role)
        if runner is None:
            from wire.errors import ResourceNotFoundException

            raise ResourceNotFoundException(f"node {self.config.node_id} has no role {req.msg.role}")
        log.warning("fault.injected", role=req.msg.role, fault=req.msg.fault)
        # answer first: the crash may end the node, and the operator should still hear that it was injected
        asyncio.get_running_loop().call_later(0.05, runner.crash.set)
        return m.FaultInjected(role=req.msg.role, fault=req.msg.fault, in_s=0.05)

    async def _raft_join(self, req: Request) -> m.RaftJoined:
        host = self.host
        assert host is not None
        group = req.msg.group
        if group in host.groups:
            from wire.errors import ResourceConflictException

            raise ResourceConflictException(f"node {self.config.node_id} already holds a {group} replica")
        peers = [p for p in req.msg.peers if p != self.config.raft_address(group)]
        self._start_group(host, group, peers)
        self._save_hosting(group, peers)
        if group == "counting" and "control" not in self.config.roles and "counting" not in self.roles:
            runner = RoleRunner("counting", self._counting_only)
            self.roles["counting"] = runner
            self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(runner)))
        log.info("raft.joined", group=group, peers=peers)
        return m.RaftJoined(address=self.config.raft_address(group))

    async def _raft_leave(self, req: Request) -> m.RaftLeft:
        host = self.host
        assert host is not None
        group = req.msg.group
        replica = host.groups.pop(group, None)
        if replica is not None:
            await asyncio.to_thread(replica.close)
            replica.erase()
        self._save_hosting(group, None)
        log.info("raft.left", group=group)
        return m.RaftLeft(left=replica is not None)


def main(config_path: str, *, log_level: str = "info") -> int:
    # The event loop and the Raft threads hand the GIL to each other on every commit: a shorter switch interval
    # than the default 5 ms cut commit p99 at the leader from ~10 ms to ~4 ms on a 2-core box.
    sys.setswitchinterval(0.0005)
    config = NodeConfig.load(config_path)
    flog.configure(level=log_level)
    return uvloop.run(Node(config).run())
