"""A local region: every node a real process with its own loopback address and data dir, Raft replicas one per AZ.

Layout of a region directory:
    region.toml                 the nodes (id, AZ, address, roles) and the tenant made at start
    client.toml                 what `flint` / `Client.from_region()` need: frontend endpoints, server key, key file
    keys/cluster.key_secret     the cluster key pair (node to node, and the operator tools)
    keys/cluster.secret         the Raft peer secret
    tenants/default.key_secret  the default tenant's key pair, mode 0600
    nodes/<id>/node.toml        each node's config; nodes/<id>/node.log its JSON log; nodes/<id>/node.pid
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import zmq.asyncio

from wire.config import NodeConfig, Ports
from wire import messages as m
from wire.errors import FlintError
from wire.keys import KeyPair
from wire.raft import generate_secret
from wire.client import ClientPool, Failover

DEFAULT_TENANT = "default"
DEFAULT_BASE_IP = "127.77.0.1"


class RegionError(Exception):
    pass


ALL_ROLES = ["control", "frontend", "manager", "worker"]
DATA_ROLES = ["frontend", "manager", "worker"]


def plan_nodes(n: int, azs: int, base_ip: str, layout: str = "combined") -> list[dict[str, Any]]:
    """Node i goes to AZ (i mod azs); the first node of each AZ is a control node (one replica per AZ).

    layout "combined": control nodes also run frontend, manager and worker (fewest processes).
    layout "dedicated": control nodes run only the control role, as a fleet would.
    """
    if n < 1 or azs < 1:
        raise RegionError("a region needs at least one node and one AZ")
    if layout not in ("combined", "dedicated"):
        raise RegionError(f"unknown layout {layout!r}; use combined or dedicated")
    if layout == "dedicated" and n <= azs:
        raise RegionError(f"a dedicated layout needs more than {azs} nodes: {azs} control nodes and the rest for work")
    base = ipaddress.IPv4Address(base_ip)
    if not base.is_loopback:
        raise RegionError(f"{base_ip} is not a loopback address; a local region binds only 127.0.0.0/8")
    nodes = []
    for i in range(n):
        az = f"az{i % azs + 1}"
        nodes.append(
            {
                "node_id": f"n{i + 1}",
                "az": az,
                "address": str(base + i),
                "roles": (["control"] if layout == "dedicated" else ALL_ROLES) if i < azs else DATA_ROLES,
            }
        )
    return nodes


class Region:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # --- creation ------------------------------------------------------------------------------------------------

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
        region = cls(root)
        if (region.root / "region.toml").exists():
            raise RegionError(f"{region.root} already holds a region; `flint cluster down --dir {region.root}` first")
        plan = plan_nodes(nodes, azs, base_ip, layout)
        for node in plan:
            _check_free(node["address"], ports)
        region.root.mkdir(parents=True, exist_ok=True)
        cluster = KeyPair.generate()
        cluster.save(region.root / "keys", "cluster")
        secret = generate_secret()
        _write_private(region.root / "keys" / "cluster.secret", secret)
        tenant = KeyPair.generate()
        tenant.save(region.root / "tenants", DEFAULT_TENANT)
        KeyPair.generate().save(region.root / "keys", "operator")  # administers tenants and limits
        control = [n["address"] for n in plan if "control" in n["roles"]]
        for node in plan:
            data_dir = region.root / "nodes" / node["node_id"]
            (data_dir / "keys").mkdir(parents=True, exist_ok=True)
            shutil.copy2(region.root / "keys" / "cluster.key_secret", data_dir / "keys" / "cluster.key_secret")
            _write_private(data_dir / "keys" / "cluster.secret", secret)
            config = NodeConfig.from_dict(
                {**node, "control_nodes": control, "data_dir": str(data_dir), "ports": ports.as_dict(),
                 "settings": settings or {}}
            )
            (data_dir / "node.toml").write_text(tomli_w.dumps(config.to_dict()))
        (region.root / "region.toml").write_text(
            tomli_w.dumps({"nodes": plan, "tenant": DEFAULT_TENANT, "base_ip": base_ip, "azs": azs})
        )
        endpoints = [f"tcp://{n['address']}:{ports.frontend}" for n in plan if "frontend" in n["roles"]]
        (region.root / "client.toml").write_text(
            tomli_w.dumps(
                {"endpoints": endpoints, "server_key": cluster.public.decode(),
                 "key_file": f"tenants/{DEFAULT_TENANT}.key_secret",
                 "operator_key_file": "keys/operator.key_secret"}
            )
        )
        return region

    # --- reading -------------------------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return (self.root / "region.toml").exists()

    def manifest(self) -> dict[str, Any]:
        if not self.exists:
            raise RegionError(f"no region at {self.root}; start one with `flint cluster up --dir {self.root}`")
        return tomllib.loads((self.root / "region.toml").read_text())

    def nodes(self) -> list[dict[str, Any]]:
        return self.manifest()["nodes"]

    def node(self, node_id: str) -> dict[str, Any]:
        for n in self.nodes():
            if n["node_id"] == node_id:
                return n
        raise RegionError(f"no node {node_id} in this region; nodes are {', '.join(n['node_id'] for n in self.nodes())}")

    def config(self, node_id: str) -> NodeConfig:
        return NodeConfig.load(self.root / "nodes" / node_id / "node.toml")

    def pid(self, node_id: str) -> int | None:
        try:
            pid = int((self.root / "nodes" / node_id / "node.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def cluster_keys(self) -> KeyPair:
        return KeyPair.load(self.root / "keys" / "cluster.key_secret")

    # --- processes -----------------------------------------------------------------------------------------------

    def start_node(self, node_id: str) -> int:
        self.node(node_id)
        if self.pid(node_id) is not None:
            return self.pid(node_id)  # type: ignore[return-value]
        data_dir = self.root / "nodes" / node_id
        log = open(data_dir / "node.log", "ab")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parent.parent)  # nodes run the same code as this command
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flint", "node", "--config", str(data_dir / "node.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        (data_dir / "node.pid").write_text(str(proc.pid))
        return proc.pid

    def start(self) -> None:
        for n in self.nodes():
            self.start_node(n["node_id"])

    def signal_node(self, node_id: str, sig: int) -> int | None:
        pid = self.pid(node_id)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
        return pid

    def kill_node(self, node_id: str) -> int | None:
        """SIGKILL the node; its sandboxes die with it (parent-death signal)."""
        pid = self.signal_node(node_id, signal.SIGKILL)
        if pid is not None:
            _wait_gone(pid, 5.0)
        return pid

    def kill_az(self, az: str) -> dict[str, int | None]:
        """SIGKILL every node tagged with `az`."""
        nodes = [n["node_id"] for n in self.nodes() if n["az"] == az]
        if not nodes:
            raise RegionError(f"no node is in {az}; AZs are {', '.join(sorted({n['az'] for n in self.nodes()}))}")
        return {node_id: self.kill_node(node_id) for node_id in nodes}

    def pause_node(self, node_id: str) -> int | None:
        """SIGSTOP: the node freezes (its sandboxes run on) - a hung host, not a dead one."""
        return self.signal_node(node_id, signal.SIGSTOP)

    def resume_node(self, node_id: str) -> int | None:
        return self.signal_node(node_id, signal.SIGCONT)

    def stop_node(self, node_id: str, timeout_s: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL if it has not stopped within `timeout_s`. True if it stopped cleanly."""
        pid = self.signal_node(node_id, signal.SIGTERM)
        if pid is None:
            return True
        if _wait_gone(pid, timeout_s):
            return True
        self.kill_node(node_id)
        return False

    def down(self, remove: bool = False) -> dict[str, bool]:
        result = {}
        nodes = self.nodes()
        for n in nodes:
            self.signal_node(n["node_id"], signal.SIGTERM)
        for n in nodes:
            result[n["node_id"]] = self.stop_node(n["node_id"])
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        return result

    # --- status --------------------------------------------------------------------------------------------------

    async def _status_async(self, timeout_s: float) -> dict[str, Any]:
        keys = self.cluster_keys()
        ctx = zmq.asyncio.Context()
        pool = ClientPool(ctx, keys, keys.public)
        try:
            nodes = self.nodes()
            configs = {n["node_id"]: self.config(n["node_id"]) for n in nodes}

            async def admin(node_id: str) -> dict[str, Any] | None:
                if self.pid(node_id) is None:
                    return None
                try:
                    status = await pool.call(configs[node_id].endpoint("admin"), m.NodeStatus(),
                                             timeout_s=timeout_s)
                    return status.to_fields()
                except FlintError:
                    return None

            admins = await asyncio.gather(*(admin(n["node_id"]) for n in nodes))
            placement: dict[str, Any] = {}
            any_config = next(iter(configs.values()))
            try:
                fo = Failover(pool, any_config.control_endpoints("placement"))
                listed = await fo.call(m.ListNodes(), timeout_s=timeout_s)
                placement = {p.node_id: p.to_fields() for p in listed.nodes}
            except FlintError:
                pass
            return {"nodes": nodes, "admin": dict(zip([n["node_id"] for n in nodes], admins)),
                    "placement": placement}
        finally:
            pool.close()
            ctx.destroy(linger=0)

    def status(self, timeout_s: float = 1.0) -> list[dict[str, Any]]:
        """One row per node: process, placement health, roles, Raft roles, isolation."""
        raw = asyncio.run(self._status_async(timeout_s))
        rows = []
        for n in raw["nodes"]:
            nid = n["node_id"]
            admin = raw["admin"].get(nid)
            seen = raw["placement"].get(nid)
            raft = admin.get("raft", {}) if admin else {}
            roles_ok = admin is not None and all(r["state"] == "running" for r in admin["role_states"].values())
            rows.append(
                {
                    "node": nid,
                    "az": n["az"],
                    "address": n["address"],
                    "roles": ",".join(n["roles"]),
                    "pid": self.pid(nid),
                    "process": "up" if admin else ("unresponsive" if self.pid(nid) else "down"),
                    "health": ("healthy" if seen and seen["healthy"] and roles_ok else "unhealthy")
                    if admin else "down",
                    "raft": ",".join(f"{g}:{s['state'][0].upper()}" for g, s in raft.items()) or "-",
                    "raft_leaders": {g: s["leader"] is not None for g, s in raft.items()},
                    "isolation": admin.get("isolation") if admin else None,
                    "isolation_details": admin.get("isolation_details") if admin else None,
                    "sandboxes": admin.get("sandboxes", 0) if admin else 0,
                }
            )
        return rows

    def wait_healthy(self, timeout_s: float = 60.0, *, nodes: list[str] | None = None, progress=None) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = self.status()
            wanted = [r for r in rows if nodes is None or r["node"] in nodes]
            if all(r["health"] == "healthy" and all(r["raft_leaders"].values()) for r in wanted):
                return rows
            for r in wanted:
                if r["process"] == "down":
                    log_path = self.root / "nodes" / r["node"] / "node.log"
                    raise RegionError(f"node {r['node']} exited during start-up; see {log_path}")
            if progress:
                progress(rows)
            time.sleep(0.3)
        raise RegionError(
            "region not healthy after {:.0f}s: {}".format(
                timeout_s, ", ".join(f"{r['node']}={r['health']}" for r in rows)
            )
        )

    def call(self, service: str, msg: m.Message, *, node: str | None = None, timeout_s: float = 10.0) -> Any:
        """Operator call with the cluster key: to `service` on `node`, or on any control node. Returns the
        request's typed reply."""

        async def go() -> Any:
            keys = self.cluster_keys()
            ctx = zmq.asyncio.Context()
            pool = ClientPool(ctx, keys, keys.public)
            try:
                if node is not None:
                    return await pool.call(self.config(node).endpoint(service), msg, timeout_s=timeout_s)
                config = self.config(self.nodes()[0]["node_id"])
                return await Failover(pool, config.control_endpoints(service)).call(msg, timeout_s=timeout_s)
            finally:
                pool.close()
                ctx.destroy(linger=0)

        return asyncio.run(go())

    def ensure_tenant(self, tenant: str = DEFAULT_TENANT) -> None:
        """Register the operator's key and the default tenant's key with the registry (idempotent)."""
        operator = KeyPair.load(self.root / "keys" / "operator.key")
        self.call("registry", m.RegistryAddOperator(public_key=operator.public.decode()))
        key = KeyPair.load(self.root / "tenants" / f"{tenant}.key")
        self.call("registry", m.RegistryCreateTenant(tenant=tenant, public_keys=(key.public.decode(),)))

    # --- counting replicas ---------------------------------------------------------------------------------------

    def counting_members(self) -> list[dict[str, Any]]:
        members = self.call("counting", m.CountingMembers(), timeout_s=3.0).members
        by_address = {self.config(n["node_id"]).raft_address("counting"): n["node_id"] for n in self.nodes()}
        return [{**mb.to_fields(), "node": by_address.get(mb.address, "?")} for mb in members]

    def counting_add(self, node_id: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Start a counting replica on `node_id` and add it to the group; returns when it has caught up."""
        members = self.counting_members()
        address = self.config(node_id).raft_address("counting")
        if any(mb["address"] == address for mb in members):
            raise RegionError(f"{node_id} already holds a counting replica")
        if self.pid(node_id) is None:
            raise RegionError(f"{node_id} is not running; start it first")
        self.call("admin", m.RaftJoin(group="counting", peers=tuple(mb["address"] for mb in members)), node=node_id)
        self.call("counting", m.ChangeMembers(action="add", address=address), timeout_s=15.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.call("admin", m.NodeStatus(), node=node_id).raft.get("counting")
            if status is not None and status.leader and status.ready:
                return self.counting_members()
            time.sleep(0.2)
        raise RegionError(f"the new replica on {node_id} did not catch up within {timeout_s:.0f}s")

    def counting_remove(self, node_id: str) -> list[dict[str, Any]]:
        """Remove `node_id`'s counting replica from the group (handing over leadership first if it leads)."""
        members = self.counting_members()
        address = self.config(node_id).raft_address("counting")
        if not any(mb["address"] == address for mb in members):
            raise RegionError(f"{node_id} holds no counting replica")
        if len(members) <= 1:
            raise RegionError("cannot remove the last counting replica")
        self.call("counting", m.ChangeMembers(action="remove", address=address), timeout_s=20.0)
        if self.pid(node_id) is not None:
            self.call("admin", m.RaftLeave(group="counting"), node=node_id)
        return self.counting_members()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _check_free(address: str, ports: Ports) -> None:
    for name, port in ports.as_dict().items():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services bind: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as exc:
            raise RegionError(
                f"{address}:{port} ({name}) is taken ({exc.strerror}); is another region running? "
                "Pick other addresses with --base-ip"
            ) from None
        finally:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False
