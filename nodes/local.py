"""A local region: every node a real process with its own loopback address and data dir, Raft replicas one per AZ.

`Region` is what the CLI, the tests and the benchmarks hold; it puts together three parts:
    nodes/layout.py     RegionDir: where each node goes (AZ, address, roles) and the region directory's files
    nodes/processes.py  NodeProcesses: start, signal, stop, kill, pause and resume node processes
    nodes/operator.py   Operator: status over the admin ports, calls with the cluster key, health, counting members
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.layout import ALL_ROLES, DATA_ROLES, DEFAULT_BASE_IP, DEFAULT_TENANT, RegionDir, RegionError, plan_nodes
from nodes.operator import Operator
from nodes.processes import NodeProcesses, check_free
from wire import messages as m
from wire.config import NodeConfig, Ports
from wire.keys import KeyPair
from worker.cgroups import RECORD, clear_recorded
from worker.network import sweep_stale

__all__ = ["ALL_ROLES", "DATA_ROLES", "DEFAULT_BASE_IP", "DEFAULT_TENANT", "Region", "RegionError", "plan_nodes"]


class Region:
    def __init__(self, root: Path | str):
        self.files = RegionDir(root)
        self.processes = NodeProcesses(self.files)
        self.operator = Operator(self.files, self.processes)

    @property
    def root(self) -> Path:
        return self.files.root

    @classmethod
    def create(
        cls,
        root: Path | str,
        *,
        nodes: int = 3,
        azs: int = 3,
        base_ip: str = DEFAULT_BASE_IP,
        settings: dict[str, Any] | None = None,
        ports: Ports = Ports(),
        layout: str = "combined",
    ) -> Region:
        """Plan the region, check its addresses are free, write its directory; no node is started."""
        region = cls(root)
        plan = region.files.plan(nodes, azs, base_ip, layout)
        for node in plan:
            check_free(node["address"], ports)
        region.files.write(plan, base_ip=base_ip, azs=azs, settings=settings, ports=ports)
        return region

    # --- the region directory ------------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self.files.exists

    def manifest(self) -> dict[str, Any]:
        return self.files.manifest()

    def nodes(self) -> list[dict[str, Any]]:
        return self.files.nodes()

    def node(self, node_id: str) -> dict[str, Any]:
        return self.files.node(node_id)

    def config(self, node_id: str) -> NodeConfig:
        return self.files.config(node_id)

    def cluster_keys(self) -> KeyPair:
        return self.files.cluster_keys()

    # --- processes -----------------------------------------------------------------------------------------------

    def pid(self, node_id: str) -> int | None:
        return self.processes.pid(node_id)

    def start_node(self, node_id: str) -> int:
        return self.processes.start_node(node_id)

    def start(self) -> None:
        self.processes.start()

    def signal_node(self, node_id: str, sig: int) -> int | None:
        return self.processes.signal_node(node_id, sig)

    def kill_node(self, node_id: str) -> int | None:
        return self.processes.kill_node(node_id)

    def kill_az(self, az: str) -> dict[str, int | None]:
        return self.processes.kill_az(az)

    def pause_node(self, node_id: str) -> int | None:
        return self.processes.pause_node(node_id)

    def resume_node(self, node_id: str) -> int | None:
        return self.processes.resume_node(node_id)

    def stop_node(self, node_id: str, timeout_s: float = 15.0) -> bool:
        return self.processes.stop_node(node_id, timeout_s)

    def down(self, remove: bool = False) -> dict[str, bool]:
        """Stop every node (per node, True if it stopped cleanly), clear what nodes killed along the way left on the
        host (sandbox networks and cgroups); with `remove`, delete the region directory too."""
        result = self.processes.stop()
        sweep_stale()  # the sandbox networks of nodes killed along the way (their tables outlive them)
        for n in self.nodes():  # and their sandboxes' cgroups, which no later start of theirs would clear
            clear_recorded(self.config(n["node_id"]).data_dir / RECORD)
        if remove:
            self.files.remove()
        return result

    # --- operator calls ------------------------------------------------------------------------------------------

    def status(self, timeout_s: float = 1.0) -> list[dict[str, Any]]:
        return self.operator.status(timeout_s)

    def wait_healthy(self, timeout_s: float = 60.0, *, nodes: list[str] | None = None, progress=None) -> list[dict]:
        return self.operator.wait_healthy(timeout_s, nodes=nodes, progress=progress)

    def call(self, service: str, msg: m.Message, *, node: str | None = None, timeout_s: float = 10.0) -> dict:
        return self.operator.call(service, msg, node=node, timeout_s=timeout_s)

    def ensure_tenant(self, tenant: str = DEFAULT_TENANT) -> None:
        self.operator.ensure_tenant(tenant)

    def counting_members(self) -> list[dict[str, Any]]:
        return self.operator.counting_members()

    def counting_add(self, node_id: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        return self.operator.counting_add(node_id, timeout_s)

    def counting_remove(self, node_id: str) -> list[dict[str, Any]]:
        return self.operator.counting_remove(node_id)
