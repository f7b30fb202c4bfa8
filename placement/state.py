"""Placement: the worker registry and its health. No I/O; time comes in as `now` (seconds, the proposer's clock).

Replicated through the `placement` Raft group: `cmd_*` methods are commands, the rest are reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wire.errors import ResourceNotFoundException

HEARTBEAT_INTERVAL_S = 0.5
MISSED_HEARTBEATS = 3  # a node is unhealthy after this many intervals without a heartbeat


@dataclasses.dataclass
class NodeRecord:
    info: dict[str, Any]  # NodeInfo fields: node_id, az, address, roles, ports, memory_mb, cores, isolation
    registered_at: float
    last_heartbeat: float
    sandboxes: int = 0
    memory_used_mb: int = 0
    incarnation: int = 1  # bumped on every re-registration: a restarted node is a new incarnation

    @property
    def node_id(self) -> str:
        return self.info["node_id"]


class PlacementState:
    def __init__(self, heartbeat_timeout_s: float = HEARTBEAT_INTERVAL_S * MISSED_HEARTBEATS):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.nodes: dict[str, NodeRecord] = {}
        self.last_tick = 0.0  # the placement leader commits a tick each interval: proof the group is committing

    # --- commands ------------------------------------------------------------------------------------------------

    def cmd_register(self, now: float, node: dict[str, Any]) -> int:
        """A node (re)announces itself. Returns its incarnation number."""
        node_id = node["node_id"]
        old = self.nodes.get(node_id)
        incarnation = old.incarnation + 1 if old else 1
        self.nodes[node_id] = NodeRecord(dict(node), now, now, incarnation=incarnation)
        return incarnation

    def cmd_tick(self, now: float) -> None:
        self.last_tick = max(self.last_tick, now)

    def cmd_heartbeat(self, now: float, node_id: str, sandboxes: int = 0, memory_used_mb: int = 0) -> int:
        record = self.nodes.get(node_id)
        if record is None:
            raise ResourceNotFoundException(f"node {node_id} is not registered; register it first")
        record.last_heartbeat = max(record.last_heartbeat, now)
        record.sandboxes = sandboxes
        record.memory_used_mb = memory_used_mb
        return record.incarnation

    # --- reads ---------------------------------------------------------------------------------------------------

    def is_healthy(self, node_id: str, now: float) -> bool:
        """A node is unhealthy when it missed heartbeats that others made. Ages count from the last moment the
        group is known to have committed (a tick or any heartbeat), not from the clock alone: while the placement group itself cannot commit (a
        leader election, a lost quorum), every node keeps the health it had instead of all turning unhealthy."""
        record = self.nodes.get(node_id)
        if record is None:
            return False
        reference = min(now, self.newest_heartbeat())
        return reference - record.last_heartbeat <= self.heartbeat_timeout_s

    def newest_heartbeat(self) -> float:
        """The last moment the group is known to have been committing: a tick or any node's heartbeat."""
        return max([self.last_tick, *(r.last_heartbeat for r in self.nodes.values())])

    def healthy(self, now: float, role: str | None = None) -> list[NodeRecord]:
        return [
            r
            for r in self.nodes.values()
            if self.is_healthy(r.node_id, now) and (role is None or role in r.info.get("roles", ()))
        ]

    def view(self, now: float) -> list[dict[str, Any]]:
        """Every known node with its health, for status tables and for managers and frontends to route by."""
        out = []
        for r in sorted(self.nodes.values(), key=lambda r: r.node_id):
            out.append(
                {
                    **r.info,
                    "healthy": self.is_healthy(r.node_id, now),
                    "last_heartbeat_age_s": round(max(0.0, now - r.last_heartbeat), 3),
                    "placement_stalled_s": round(max(0.0, now - self.newest_heartbeat()), 3),
                    "sandboxes": r.sandboxes,
                    "memory_used_mb": r.memory_used_mb,
                    "incarnation": r.incarnation,
                }
            )
        return out
