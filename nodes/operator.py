"""What an operator asks a running local region, with the cluster key: each node's status over its admin port, calls
to any service, health, the default tenant, and the counting group's members."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq.asyncio

from nodes.layout import DEFAULT_TENANT, RegionDir, RegionError
from nodes.processes import NodeProcesses
from wire import messages as m
from wire.client import ClientPool, Failover
from wire.errors import FlintError


class Operator:
    def __init__(self, files: RegionDir, processes: NodeProcesses):
        self.files = files
        self.processes = processes

    @contextlib.asynccontextmanager
    async def _pool(self) -> AsyncIterator[ClientPool]:
        keys = self.files.cluster_keys()
        ctx = zmq.asyncio.Context()
        pool = ClientPool(ctx, keys, keys.public)
        try:
            yield pool
        finally:
            pool.close()
            ctx.destroy(linger=0)

    # --- status --------------------------------------------------------------------------------------------------

    async def _status_async(self, timeout_s: float) -> dict[str, Any]:
        async with self._pool() as pool:
            nodes = self.files.nodes()
            configs = {n["node_id"]: self.files.config(n["node_id"]) for n in nodes}

            async def admin(node_id: str) -> m.NodeStatusReply | None:
                if self.processes.pid(node_id) is None:
                    return None
                try:
                    return await pool.call(configs[node_id].endpoint("admin"), m.NodeStatus(), timeout_s=timeout_s)
                except FlintError:
                    return None

            admins = await asyncio.gather(*(admin(n["node_id"]) for n in nodes))
            placement: dict[str, m.NodeView] = {}
            any_config = next(iter(configs.values()))
            try:
                fo = Failover(pool, any_config.control_endpoints("placement"))
                placement = {p.node_id: p for p in (await fo.call(m.ListNodes(), timeout_s=timeout_s)).nodes}
            except FlintError:
                pass
            return {"nodes": nodes, "admin": dict(zip([n["node_id"] for n in nodes], admins)),
                    "placement": placement}

    def status(self, timeout_s: float = 1.0) -> list[dict[str, Any]]:
        """One row per node: process, placement health, roles, Raft roles, isolation."""
        raw = asyncio.run(self._status_async(timeout_s))
        rows = []
        for n in raw["nodes"]:
            nid = n["node_id"]
            admin = raw["admin"].get(nid)
            seen = raw["placement"].get(nid)
            raft = admin.raft if admin else {}
            roles_ok = admin is not None and all(r.state == "running" for r in admin.role_states.values())
            can_persist = admin.can_persist if admin else None  # its data dir takes writes, with room to spare
            pid = self.processes.pid(nid)
            rows.append(
                {
                    "node": nid,
                    "az": n["az"],
                    "address": n["address"],
                    "roles": ",".join(n["roles"]),
                    "pid": pid,
                    "process": "up" if admin else ("unresponsive" if pid else "down"),
                    "health": ("healthy" if seen and seen.healthy and roles_ok and can_persist else "unhealthy")
                    if admin else "down",
                    "can_persist": can_persist,
                    "persist_problem": admin.persist_problem if admin else None,
                    "raft": ",".join(f"{g}:{s.state[0].upper()}" for g, s in raft.items()) or "-",
                    "raft_leaders": {g: s.leader is not None for g, s in raft.items()},
                    "isolation": admin.isolation if admin else None,
                    "isolation_details": admin.isolation_details if admin else None,
                    "sandboxes": admin.sandboxes if admin else 0,
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
                    log_path = self.files.node_dir(r["node"]) / "node.log"
                    raise RegionError(f"node {r['node']} exited during start-up; see {log_path}")
            if progress:
                progress(rows)
            time.sleep(0.3)
        raise RegionError(
            "region not healthy after {:.0f}s: {}".format(
                timeout_s, ", ".join(f"{r['node']}={r['health']}" + (f" ({r['persist_problem']})"
                                                                     if r.get("persist_problem") else "")
                                     for r in rows)
            )
        )

    # --- calls ---------------------------------------------------------------------------------------------------

    def call(self, service: str, msg: m.Message, *, node: str | None = None, timeout_s: float = 10.0) -> Any:
        """Operator call with the cluster key: to `service` on `node`, or on any control node. Returns the
        request's typed reply."""

        async def go() -> Any:
            async with self._pool() as pool:
                if node is not None:
                    return await pool.call(self.files.config(node).endpoint(service), msg, timeout_s=timeout_s)
                config = self.files.config(self.files.nodes()[0]["node_id"])
                return await Failover(pool, config.control_endpoints(service)).call(msg, timeout_s=timeout_s)

        return asyncio.run(go())

    def ensure_tenant(self, tenant: str = DEFAULT_TENANT) -> None:
        """Register the operator's key and the default tenant's key with the registry (idempotent)."""
        operator = self.files.operator_key()
        self.call("registry", m.RegistryAddOperator(public_key=operator.public.decode()))
        key = self.files.tenant_key(tenant)
        self.call("registry", m.RegistryCreateTenant(tenant=tenant, public_keys=(key.public.decode(),)))

    # --- counting replicas ---------------------------------------------------------------------------------------

    def counting_members(self) -> list[dict[str, Any]]:
        members = self.call("counting", m.CountingMembers(), timeout_s=3.0).members
        by_address = {self.files.config(n["node_id"]).raft_address("counting"): n["node_id"]
                      for n in self.files.nodes()}
        return [{**mb.to_fields(), "node": by_address.get(mb.address, "?")} for mb in members]

    def counting_add(self, node_id: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Start a counting replica on `node_id` and add it to the group; returns when it has caught up."""
        members = self.counting_members()
        address = self.files.config(node_id).raft_address("counting")
        if any(mb["address"] == address for mb in members):
            raise RegionError(f"{node_id} already holds a counting replica")
        if self.processes.pid(node_id) is None:
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
        address = self.files.config(node_id).raft_address("counting")
        if not any(mb["address"] == address for mb in members):
            raise RegionError(f"{node_id} holds no counting replica")
        if len(members) <= 1:
            raise RegionError("cannot remove the last counting replica")
        self.call("counting", m.ChangeMembers(action="remove", address=address), timeout_s=20.0)
        if self.processes.pid(node_id) is not None:
            self.call("admin", m.RaftLeave(group="counting"), node=node_id)
        return self.counting_members()
