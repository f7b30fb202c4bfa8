"""Placement: the worker registry, host health, and time-bounded leases of worker capacity to managers.

No I/O; time comes in as `now` (seconds, the proposer's clock). Replicated through the `placement` Raft group:
`cmd_*` methods are commands, the rest are reads.

Health. A node is unhealthy when it missed heartbeats others made (3 x 0.5 s by default); suspect when managers
reported system errors on 3 of its last 10 invokes (OpenWhisk's rule); draining when an operator took it out.
Recovery is damped: a node that went bad stays out for a hold-down after it looks good again, doubling with each
relapse (up to a cap), so a flapping host does not churn sandboxes back and forth.

Leases. A manager asks for capacity; placement grants a lease on a block of one worker's memory, chosen by the
packing policy, for `lease_s` (default 6 h; seconds in tests). The sum of leased blocks never exceeds a worker's
capacity, and no lease is granted on a host that is unhealthy, suspect, draining or held down.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable
from typing import Any

from wire.config import DEFAULTS, SYSTEM_RESERVED_MB
from wire.errors import Reason, ResourceConflictException, ResourceNotFoundException, ServiceException

SUSPECT_ERRORS, SUSPECT_WINDOW = 3, 10
SUSPECT_MEMORY_S = 30.0  # a reported error counts this long: a suspect host with nothing on it is tried again
HOLD_DOWN_MAX_S = 120.0
RETIRED_LEASES_KEPT = 100_000


@dataclasses.dataclass
class NodeRecord:
    info: dict[str, Any]  # NodeInfo fields: node_id, az, address, roles, ports, memory_mb, cores, isolation
    registered_at: float
    last_heartbeat: float
    sandboxes: int = 0
    memory_used_mb: int = 0
    incarnation: int = 1  # bumped on every re-registration: a restarted node is a new incarnation
    outcomes: deque = dataclasses.field(default_factory=lambda: deque(maxlen=SUSPECT_WINDOW))  # (when, ok)
    draining: bool = False
    last_seen: float = 0.0  # the latest command time this record was looked at (ages reported errors out)
    bad_since: float | None = None  # when it last went unhealthy or suspect
    hold_until: float = 0.0  # damped recovery: no new leases before this
    relapses: int = 0

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    @property
    def az(self) -> str:
        return self.info["az"]

    @property
    def capacity_mb(self) -> int:
        return max(0, int(self.info.get("memory_mb", 0)) - SYSTEM_RESERVED_MB)

    @property
    def suspect(self) -> bool:
        """3 system errors in its last 10 reported invokes, counting only errors of the last 30 s."""
        if not self.outcomes:
            return False
        newest = max(self.outcomes[-1][0], self.last_seen)
        return sum(1 for when, ok in self.outcomes if not ok and newest - when <= SUSPECT_MEMORY_S) >= SUSPECT_ERRORS


@dataclasses.dataclass
class WorkerLease:
    lease_id: str
    node_id: str
    manager: str  # the manager endpoint holding it
    memory_mb: int
    granted_at: float
    expires_at: float

    def view(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PlacementState:
    def __init__(
        self,
        heartbeat_timeout_s: float = DEFAULTS.heartbeat_interval_s * DEFAULTS.missed_heartbeats,
        hold_down_s: float = DEFAULTS.hold_down_s,
        policy: str = "flint",
        tick_interval_s: float = DEFAULTS.heartbeat_interval_s,
    ):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.tick_interval_s = tick_interval_s  # the leader commits a tick this often while the group is up
        self.hold_down_s = hold_down_s
        self.policy = policy  # flint | balance | binpack (the last two for comparison in the simulator)
        self.nodes: dict[str, NodeRecord] = {}
        self.leases: dict[str, WorkerLease] = {}
        self.leased_mb: dict[str, int] = {}  # node id -> memory under live leases
        self.retired: dict[str, None] = {}  # lease ids returned, expired or revoked: never granted again
        self.last_tick = 0.0  # the placement leader commits a tick each interval: proof the group is committing
        self.newest_beat = 0.0  # the latest heartbeat any node got committed

    # --- health --------------------------------------------------------------------------------------------------

    def cmd_register(self, now: float, node: dict[str, Any]) -> int:
        """A node (re)announces itself. Returns its incarnation number."""
        self._bridge_gap(now)
        node_id = node["node_id"]
        old = self.nodes.get(node_id)
        record = NodeRecord(dict(node), now, now, incarnation=old.incarnation + 1 if old else 1)
        self.newest_beat = max(self.newest_beat, now)
        if old is not None:
            record.draining, record.relapses, record.hold_until = old.draining, old.relapses, old.hold_until
            self._revoke(node_id)  # a restarted node has lost every sandbox it had
        self.nodes[node_id] = record
        return record.incarnation

    def cmd_tick(self, now: float) -> None:
        self._bridge_gap(now)
        self.last_tick = max(self.last_tick, now)
        for record in self.nodes.values():
            self._damp(record, now)

    def cmd_heartbeat(self, now: float, node_id: str, sandboxes: int = 0, memory_used_mb: int = 0) -> int:
        record = self.nodes.get(node_id)
        if record is None:
            raise ResourceNotFoundException(f"node {node_id} is not registered; register it first")
        self._bridge_gap(now)
        record.last_heartbeat = max(record.last_heartbeat, now)
        self.newest_beat = max(self.newest_beat, now)
        record.sandboxes = sandboxes
        record.memory_used_mb = memory_used_mb
        self._damp(record, now)
        return record.incarnation

    def cmd_report(self, now: float, node_id: str, ok: bool, incarnation: int | None = None) -> bool:
        """A manager's word on an invoke it ran on `node_id`: True for success, False for a system error.
        A report about an earlier incarnation (the node has restarted since) is ignored. Returns whether the
        node is now suspect."""
        record = self.nodes.get(node_id)
        if record is None or (incarnation is not None and incarnation != record.incarnation):
            return False
        record.outcomes.append((now, bool(ok)))
        self._damp(record, now)
        return record.suspect

    def cmd_drain(self, now: float, node_id: str, draining: bool = True) -> dict[str, Any]:
        record = self.nodes.get(node_id)
        if record is None:
            raise ResourceNotFoundException(f"no node {node_id}")
        record.draining = draining
        return {"node_id": node_id, "draining": draining,
                "leases": [lease.lease_id for lease in self.leases.values() if lease.node_id == node_id]}

    def is_alive(self, node_id: str, now: float) -> bool:
        """Heartbeating. Ages count from the last moment the group is known to have committed (a tick or any
        heartbeat), not from the clock alone: while the placement group itself cannot commit, every node keeps
        the health it had instead of all turning unhealthy."""
        record = self.nodes.get(node_id)
        if record is None:
            return False
        reference = min(now, self.newest_heartbeat())
        return reference - record.last_heartbeat <= self.heartbeat_timeout_s

    def is_healthy(self, node_id: str, now: float) -> bool:
        """Fit for routing: alive and not suspect. (Draining and held-down nodes still serve what they have.)"""
        record = self.nodes.get(node_id)
        return record is not None and self.is_alive(node_id, now) and not record.suspect

    def can_lease(self, node_id: str, now: float) -> bool:
        """Fit for new sandboxes: healthy, not draining, not held down after a recovery."""
        record = self.nodes.get(node_id)
        return (record is not None and self.is_healthy(node_id, now) and not record.draining
                and now >= record.hold_until and "worker" in record.info.get("roles", ()))

    def _bridge_gap(self, now: float) -> None:
        """The group could not commit for a while (its leader died or froze; a new one was elected): ticks
        stopped. The first command after that must not find every node silent, so the outage (the silence
        beyond one tick interval) does not count against anyone: each node keeps the age it had when the group
        went quiet, and has its usual time to be heard again."""
        last = self.newest_heartbeat()
        gap = now - last
        if last > 0 and gap > 2 * self.tick_interval_s:
            outage = gap - self.tick_interval_s
            for record in self.nodes.values():
                record.last_heartbeat += outage
            self.newest_beat += outage

    def newest_heartbeat(self) -> float:
        """The last moment the group is known to have been committing: a tick or any node's heartbeat."""
        return max(self.last_tick, self.newest_beat)

    def _damp(self, record: NodeRecord, now: float) -> None:
        record.last_seen = max(record.last_seen, now)
        bad = not self.is_alive(record.node_id, now) or record.suspect
        if bad and record.bad_since is None:
            record.bad_since = now
            record.relapses += 1
            self._revoke(record.node_id)
        elif not bad and record.bad_since is not None:
            record.bad_since = None
            hold = min(HOLD_DOWN_MAX_S, self.hold_down_s * 2 ** max(0, record.relapses - 1))
            record.hold_until = now + hold

    def healthy(self, now: float, role: str | None = None) -> list[NodeRecord]:
        return [
            r for r in self.nodes.values()
            if self.is_healthy(r.node_id, now) and (role is None or role in r.info.get("roles", ()))
        ]

    # --- leases --------------------------------------------------------------------------------------------------

    def cmd_lease_worker(
        self,
        now: float,
        lease_id: str,
        manager: str,
        memory_mb: int = DEFAULTS.lease_block_mb,
        prefer_azs: Iterable[str] = (),
        avoid_nodes: Iterable[str] = (),
        lease_s: float = DEFAULTS.worker_lease_s,
    ) -> dict[str, Any]:
        """Grant a lease on `memory_mb` of one worker's capacity to `manager`. Idempotent per lease id."""
        self._expire(now)
        existing = self.leases.get(lease_id)
        if existing is not None:
            return {"lease": existing.view(), "node": self._node_view(existing.node_id, now)}
        if lease_id in self.retired:
            raise ResourceConflictException(f"lease {lease_id} has ended; ask again under a new id")
        node = self.choose(now, memory_mb, manager, prefer_azs, avoid_nodes)
        if node is None:
            raise ServiceException(
                f"no healthy worker has {memory_mb} MB free to lease; add hosts or free capacity",
                reason=Reason.NO_CAPACITY,
            )
        lease = WorkerLease(lease_id, node.node_id, manager, memory_mb, now, now + lease_s)
        self.leases[lease_id] = lease
        self.leased_mb[node.node_id] = self.leased_mb.get(node.node_id, 0) + memory_mb
        return {"lease": lease.view(), "node": self._node_view(node.node_id, now)}

    def cmd_return_lease(self, now: float, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        self.retired[lease_id] = None
        while len(self.retired) > RETIRED_LEASES_KEPT:
            del self.retired[next(iter(self.retired))]
        self.leased_mb[lease.node_id] = self.leased_mb.get(lease.node_id, 0) - lease.memory_mb
        return True

    def choose(
        self, now: float, memory_mb: int, manager: str = "", prefer_azs: Iterable[str] = (),
        avoid_nodes: Iterable[str] = (),
    ) -> NodeRecord | None:
        """The packing policy: which worker a new lease goes on.

        flint: a preferred AZ first (a function spreading to a second AZ); then the host most allocated already
        (fill hosts before opening new ones: 99/99/99/0 beats 60/60/60/60); among equals, one this manager has
        no lease on yet (so hosts mix the functions of several managers).
        balance: the least allocated host (balance-the-load). binpack: the most allocated, nothing else.
        """
        prefer = set(prefer_azs)
        avoid = set(avoid_nodes)
        mine = {lease.node_id for lease in self.leases.values() if lease.manager == manager}
        reference = min(now, self.newest_heartbeat())  # is_alive, inlined: this loop runs over every host
        best: NodeRecord | None = None
        best_key: tuple | None = None
        for record in self.nodes.values():
            node_id = record.node_id
            if (node_id in avoid or record.draining or now < record.hold_until
                    or reference - record.last_heartbeat > self.heartbeat_timeout_s or record.suspect
                    or "worker" not in record.info.get("roles", ())):
                continue
            leased = self.leased_mb.get(node_id, 0)
            capacity = record.capacity_mb
            if capacity - leased < memory_mb:
                continue
            used = leased / max(1, capacity)
            if self.policy == "balance":
                key = (used, node_id)
            elif self.policy == "binpack":
                key = (-used, node_id)
            else:
                key = (record.az not in prefer if prefer else False, -used, node_id in mine, node_id)
            if best_key is None or key < best_key:
                best, best_key = record, key
        return best

    def _expire(self, now: float) -> None:
        for lease_id in [i for i, lease in self.leases.items() if lease.expires_at <= now]:
            self.cmd_return_lease(now, lease_id)

    def _revoke(self, node_id: str) -> None:
        for lease_id in [i for i, lease in self.leases.items() if lease.node_id == node_id]:
            self.cmd_return_lease(0.0, lease_id)

    def leases_of(self, manager: str | None, now: float) -> list[dict[str, Any]]:
        return [
            {**lease.view(), "node": self._node_view(lease.node_id, now)}
            for lease in self.leases.values()
            if (manager is None or lease.manager == manager) and lease.expires_at > now
        ]

    def free_capacity_mb(self, now: float) -> int:
        """Capacity a lease request could be answered from at once."""
        return sum(
            max(0, r.capacity_mb - self.leased_mb.get(r.node_id, 0))
            for r in self.nodes.values() if self.can_lease(r.node_id, now)
        )

    def headroom(self, now: float, reserve_mb: int = DEFAULTS.lease_block_mb) -> dict[str, Any]:
        """Whether a lease request can still be answered at once in every AZ that has workers: each needs one
        host with `reserve_mb` unleased. The AZs that cannot are `short`; managers then hand back their empty
        leases there at once instead of after IDLE_LEASE_RETURN_S, so capacity sitting unused under one
        manager is there for the next one that needs it."""
        best: dict[str, int] = {}
        for r in self.nodes.values():
            if "worker" not in r.info.get("roles", ()) or r.draining:
                continue
            free = max(0, r.capacity_mb - self.leased_mb.get(r.node_id, 0)) if self.can_lease(r.node_id, now) else 0
            best[r.az] = max(best.get(r.az, 0), free)
        return {
            "free_mb": self.free_capacity_mb(now),
            "reserve_mb": reserve_mb,
            "short_azs": sorted(az for az, free in best.items() if free < reserve_mb),
        }

    # --- views ---------------------------------------------------------------------------------------------------

    def _node_view(self, node_id: str, now: float) -> dict[str, Any]:
        r = self.nodes[node_id]
        return {
            **r.info,
            "alive": self.is_alive(node_id, now),
            "healthy": self.is_healthy(node_id, now),
            "suspect": r.suspect,
            "draining": r.draining,
            "held_down_s": round(max(0.0, r.hold_until - now), 1),
            "leasable": self.can_lease(node_id, now),
            "last_heartbeat_age_s": round(max(0.0, now - r.last_heartbeat), 3),
            "placement_stalled_s": round(max(0.0, now - self.newest_heartbeat()), 3),
            "sandboxes": r.sandboxes,
            "memory_used_mb": r.memory_used_mb,
            "capacity_mb": r.capacity_mb,
            "leased_mb": self.leased_mb.get(node_id, 0),
            "incarnation": r.incarnation,
        }

    def view(self, now: float) -> list[dict[str, Any]]:
        """Every known node with its health, for status tables and for managers and frontends to route by."""
        return [self._node_view(node_id, now) for node_id in sorted(self.nodes)]

PlacementState.COMMANDS = {
    "register": PlacementState.cmd_register,
    "tick": PlacementState.cmd_tick,
    "heartbeat": PlacementState.cmd_heartbeat,
    "report": PlacementState.cmd_report,
    "drain": PlacementState.cmd_drain,
    "lease_worker": PlacementState.cmd_lease_worker,
    "return_lease": PlacementState.cmd_return_lease,
}
