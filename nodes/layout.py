"""A local region's layout: which node goes to which AZ and address, and the files that say so.

Layout of a region directory:
    region.toml                 the nodes (id, AZ, address, roles) and the tenant made at start
    client.toml                 what `flint` / `Client.from_region()` need: frontend endpoints, server key, key file
    keys/cluster.key_secret     the cluster key pair (node to node, and the operator tools)
    keys/cluster.secret         the Raft peer secret
    keys/operator.key_secret    the operator's key pair (administers tenants and limits)
    tenants/default.key_secret  the default tenant's key pair, mode 0600
    nodes/<id>/node.toml        each node's config; nodes/<id>/node.log its JSON log; nodes/<id>/node.pid
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from wire.config import NodeConfig, Ports
from wire.keys import KeyPair
from wire.raft import generate_secret
from wire.transport import endpoint

DEFAULT_TENANT = "default"
DEFAULT_BASE_IP = "127.77.0.1"

ALL_ROLES = ["control", "frontend", "manager", "worker"]
DATA_ROLES = ["frontend", "manager", "worker"]


class RegionError(Exception):
    pass


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


class RegionDir:
    """The region directory: written once by `write`, read by everything else."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # --- writing -------------------------------------------------------------------------------------------------

    def plan(self, nodes: int, azs: int, base_ip: str, layout: str) -> list[dict[str, Any]]:
        """The nodes of a new region here; refused if this directory already holds one."""
        if self.exists:
            raise RegionError(f"{self.root} already holds a region; `flint cluster down --dir {self.root}` first")
        return plan_nodes(nodes, azs, base_ip, layout)

    def write(self, plan: list[dict[str, Any]], *, base_ip: str, azs: int, settings: dict[str, Any] | None,
              ports: Ports) -> None:
        """Keys, every node's node.toml, region.toml and client.toml for `plan`."""
        self.root.mkdir(parents=True, exist_ok=True)
        cluster = KeyPair.generate()
        cluster.save(self.root / "keys", "cluster")
        secret = generate_secret()
        _write_private(self.root / "keys" / "cluster.secret", secret)
        tenant = KeyPair.generate()
        tenant.save(self.root / "tenants", DEFAULT_TENANT)
        KeyPair.generate().save(self.root / "keys", "operator")  # administers tenants and limits
        control = [n["address"] for n in plan if "control" in n["roles"]]
        for node in plan:
            data_dir = self.node_dir(node["node_id"])
            (data_dir / "keys").mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / "keys" / "cluster.key_secret", data_dir / "keys" / "cluster.key_secret")
            _write_private(data_dir / "keys" / "cluster.secret", secret)
            config = NodeConfig.from_dict(
                {**node, "control_nodes": control, "data_dir": str(data_dir), "ports": ports.as_dict(),
                 "settings": settings or {}}
            )
            (data_dir / "node.toml").write_text(tomli_w.dumps(config.to_dict()))
        (self.root / "region.toml").write_text(
            tomli_w.dumps({"nodes": plan, "tenant": DEFAULT_TENANT, "base_ip": base_ip, "azs": azs})
        )
        endpoints = [endpoint(n["address"], ports.frontend) for n in plan if "frontend" in n["roles"]]
        (self.root / "client.toml").write_text(
            tomli_w.dumps(
                {"endpoints": endpoints, "server_key": cluster.public.decode(),
                 "key_file": f"tenants/{DEFAULT_TENANT}.key_secret",
                 "operator_key_file": "keys/operator.key_secret"}
            )
        )

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

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

    def node_dir(self, node_id: str) -> Path:
        return self.root / "nodes" / node_id

    def config(self, node_id: str) -> NodeConfig:
        return NodeConfig.load(self.node_dir(node_id) / "node.toml")

    def cluster_keys(self) -> KeyPair:
        return KeyPair.load(self.root / "keys" / "cluster.key_secret")

    def operator_key(self) -> KeyPair:
        """The operator's public key (the registry is told it; the secret stays in operator.key_secret)."""
        return KeyPair.load(self.root / "keys" / "operator.key")

    def tenant_key(self, tenant: str) -> KeyPair:
        """A tenant's public key, as the registry is told it."""
        return KeyPair.load(self.root / "tenants" / f"{tenant}.key")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
