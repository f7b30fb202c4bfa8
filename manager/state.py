"""Worker manager: the sandboxes of the functions it owns, idle or busy, and the worker capacity it has leased
from placement to put new ones on. No I/O; time comes in as `now`.

Soft state: after a restart the service rebuilds it from placement's leases and the workers' own lists.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from wire.config import DEFAULTS
from wire.messages import SandboxState

DRAIN_MARGIN_S = 60.0  # no new sandbox on a lease this close to its expiry: it drains, then goes back
IDLE_LEASE_RETURN_S = 300.0  # an empty lease nobody placed on for this long goes back to placement
SHORT_IDLE_LEASE_RETURN_S = 5.0  # ... or for this long, where placement says its AZ is short of free capacity

PLACEMENT_FULL_S = 1.0  # after placement says it has no room, cold starts hear "no capacity" this long at once
STARTED_KEEP_S = 960.0  # how long a sync invoke's request id is remembered: past the longest function timeout
STARTED_MAX = 200_000  # ... and how many (the oldest go first; beyond this a duplicate is no longer caught)

IDLE, BUSY = SandboxState.IDLE, SandboxState.BUSY


@dataclasses.dataclass
class SandboxRecord:
    sandbox_id: str
    function_key: str
    node_id: str
    az: str
    endpoint: str  # the worker service to run invokes on
    state: str = BUSY
    request_id: str | None = None  # the invoke holding it while busy
    last_used: float = 0.0
    invocations: int = 0
    lease_id: str = ""
    memory_mb: int = 0
    retired: bool = False  # built from a configuration that changed, or of a deleted function: gone once idle


def function_of(function_key: str) -> str:
    """The function and version ("tenant/name/version") a sandbox pool key belongs to."""
    return function_key.rsplit("/", 1)[0]


@dataclasses.dataclass
class HeldWorkerLease:
    """Capacity on one worker, leased from placement until `expires_at`."""

    lease_id: str
    node_id: str
    az: str
    endpoint: str
    memory_mb: int
    expires_at: float
    used_mb: int = 0
    last_placed: float = 0.0
    draining: bool = False  # the host is being taken out: nothing new here; it goes back once empty
    return_why: str = ""  # set by leases_to_return: closing, az_short_of_capacity or idle

    @property
    def free_mb(self) -> int:
        return self.memory_mb - self.used_mb

    def closing(self, now: float, margin_s: float) -> bool:
        return self.draining or self.expires_at - now <= margin_s


class ManagerState:
    def __init__(self, keep_alive_s: float = DEFAULTS.keep_alive_s, drain_margin_s: float = DRAIN_MARGIN_S):
        self.keep_alive_s = keep_alive_s
        self.drain_margin_s = drain_margin_s
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.pools: dict[str, dict[str, SandboxRecord]] = {}  # function key -> sandbox id -> record
        self.idle: dict[str, list[str]] = {}  # function key -> idle sandbox ids, most recently used last
        self.leases: dict[str, HeldWorkerLease] = {}
        self.started: OrderedDict[str, tuple[str, float]] = OrderedDict()  # request id -> (attempt, when)
        self._placement_full_until = float("-inf")  # monotonic

    # --- at most one start per request ----------------------------------------------------------------------------

    def claim(self, request_id: str, attempt: str, now: float) -> bool:
        """A sync invoke's handling `attempt` is about to start `request_id`. False if another handling already
        did (a client retried after losing its frontend): that one may have run, so this one must not."""
        self._forget_started(now)
        held = self.started.get(request_id)
        if held is not None and held[0] != attempt:
            return False
        self.started[request_id] = (attempt, now)
        self.started.move_to_end(request_id)
        return True

    def unclaim(self, request_id: str, attempt: str | None = None) -> None:
        """The handling never reached a host: nothing ran, so a later handling may start it."""
        held = self.started.get(request_id)
        if held is not None and (attempt is None or held[0] == attempt):
            del self.started[request_id]

    def _forget_started(self, now: float) -> None:
        while self.started:
            request_id, (_, when) = next(iter(self.started.items()))
            if now - when <= STARTED_KEEP_S and len(self.started) < STARTED_MAX:
                break
            del self.started[request_id]

    # --- warm routing --------------------------------------------------------------------------------------------

    def reserve(self, function_key: str, request_id: str, now: float, avoid: Iterable[str] = ()) -> SandboxRecord | None:
        """Hand the most recently used idle sandbox of this function to `request_id`, or None (cold start)."""
        stack = self.idle.get(function_key)
        if not stack:
            return None
        avoid = set(avoid)
        for i in range(len(stack) - 1, -1, -1):
            record = self.sandboxes[stack[i]]
            if record.node_id in avoid:
                continue
            del stack[i]
            record.state = BUSY
            record.request_id = request_id
            record.last_used = now
            return record
        return None

    def release(self, sandbox_id: str, request_id: str | None, now: float) -> bool:
        """The invoke `request_id` is done with the sandbox. Idempotent: a second release is a no-op.
        A busy sandbox adopted after a restart has no known request id; any release frees it."""
        record = self.sandboxes.get(sandbox_id)
        if record is None or record.state != BUSY:
            return False
        if record.request_id is not None and record.request_id != request_id:
            return False  # a stale release from an earlier invoke; the sandbox is busy with another
        if record.retired:
            self.remove(sandbox_id)  # the caller sees `retired` and destroys it rather than hand it out again
            return True
        record.state = IDLE
        record.request_id = None
        record.last_used = now
        record.invocations += 1
        self.idle.setdefault(record.function_key, []).append(sandbox_id)
        return True

    # --- placing new sandboxes -----------------------------------------------------------------------------------

    def place(
        self, function_key: str, memory_mb: int, now: float, avoid: Iterable[str] = (), spread: bool = True
    ) -> HeldWorkerLease | None:
        """Which leased capacity a new sandbox of this function goes on, or None: lease more first.

        A function with a sandbox already spreads to an AZ it is not in; with `spread` it waits for a lease
        there rather than stack a second sandbox in the same AZ. Then: the AZ and host where it has fewest
        (different functions mix on a host), then the fullest lease (pack before opening new capacity)."""
        avoid = set(avoid)
        pool = self.pools.get(function_key, {}).values()
        per_az: dict[str, int] = {}
        per_node: dict[str, int] = {}
        for record in pool:
            per_az[record.az] = per_az.get(record.az, 0) + 1
            per_node[record.node_id] = per_node.get(record.node_id, 0) + 1
        options = [
            lease for lease in self.leases.values()
            if lease.node_id not in avoid and lease.free_mb >= memory_mb
            and not lease.closing(now, self.drain_margin_s)
        ]
        if per_az:
            elsewhere = [lease for lease in options if lease.az not in per_az]
            if elsewhere:
                options = elsewhere
            elif spread and len(per_az) < 2:
                return None  # ask placement for capacity in another AZ before stacking this one
        if not options:
            return None
        return min(options, key=lambda lease: (
            per_az.get(lease.az, 0), per_node.get(lease.node_id, 0), lease.free_mb, lease.node_id,
        ))

    def wanted_azs(self, function_key: str, azs: Iterable[str]) -> list[str]:
        """The AZs a new lease for this function should prefer: those it has no sandbox in yet."""
        present = {r.az for r in self.pools.get(function_key, {}).values()}
        return sorted(az for az in azs if az not in present) if present else []

    def add(self, record: SandboxRecord, now: float) -> None:
        record.last_used = now
        self.sandboxes[record.sandbox_id] = record
        self.pools.setdefault(record.function_key, {})[record.sandbox_id] = record
        if record.state == IDLE:
            self.idle.setdefault(record.function_key, []).append(record.sandbox_id)
        lease = self.leases.get(record.lease_id)
        if lease is not None:
            lease.used_mb += record.memory_mb
            lease.last_placed = now

    def remove(self, sandbox_id: str) -> SandboxRecord | None:
        record = self.sandboxes.pop(sandbox_id, None)
        if record is None:
            return None
        pool = self.pools.get(record.function_key, {})
        pool.pop(sandbox_id, None)
        if not pool:
            self.pools.pop(record.function_key, None)
        stack = self.idle.get(record.function_key)
        if stack and sandbox_id in stack:
            stack.remove(sandbox_id)
        if not stack:
            self.idle.pop(record.function_key, None)
        lease = self.leases.get(record.lease_id)
        if lease is not None:
            lease.used_mb -= record.memory_mb
        return record

    # --- leases --------------------------------------------------------------------------------------------------

    def add_lease(self, lease: HeldWorkerLease, now: float) -> None:
        if lease.lease_id not in self.leases:
            lease.last_placed = now
            self.leases[lease.lease_id] = lease

    def drop_lease(self, lease_id: str) -> list[SandboxRecord]:
        """Placement revoked it (the host went bad): its sandboxes take nothing new. Idle ones are removed and
        returned, to be destroyed; busy ones finish their invoke first (then go, as retired ones do)."""
        self.leases.pop(lease_id, None)
        gone = []
        for record in [r for r in self.sandboxes.values() if r.lease_id == lease_id]:
            record.retired = True
            if record.state == IDLE:
                self.remove(record.sandbox_id)
                gone.append(record)
            else:
                record.lease_id = ""  # it counts on no lease now: the lease is gone
        return gone

    def drain_nodes(self, node_ids: Iterable[str]) -> None:
        """Operators took these hosts out: their leases take nothing new and go back once empty."""
        node_ids = set(node_ids)
        for lease in self.leases.values():
            lease.draining = lease.node_id in node_ids

    def leases_to_return(self, now: float, short_azs: Iterable[str] = ()) -> list[HeldWorkerLease]:
        """Empty leases that are draining toward expiry, or that nothing was placed on for a while: 5 minutes,
        or 5 s in an AZ where placement is short of free capacity."""
        short = set(short_azs)
        out = []
        for lease in self.leases.values():
            if lease.used_mb:
                continue
            idle_s = now - lease.last_placed
            if lease.closing(now, self.drain_margin_s):
                lease.return_why = "closing"
            elif lease.az in short and idle_s >= SHORT_IDLE_LEASE_RETURN_S:
                lease.return_why = "az_short_of_capacity"
            elif idle_s >= IDLE_LEASE_RETURN_S:
                lease.return_why = "idle"
            else:
                continue
            out.append(lease)
        for lease in out:
            del self.leases[lease.lease_id]
        return out

    # --- capacity ----------------------------------------------------------------------------------------------

    def note_placement_full(self, now: float) -> None:
        """Placement had no worker capacity to lease: cold starts behind this one hear it at once for a moment,
        rather than each asking again (each answer is a Raft commit)."""
        self._placement_full_until = now + PLACEMENT_FULL_S

    def placement_full(self, now: float) -> bool:
        return now < self._placement_full_until

    def make_room(self, tenant: str, memory_mb: int, cap_mb: int) -> list[SandboxRecord] | None:
        """Room for one more sandbox of `memory_mb` under a tenant's cap on the memory its sandboxes hold here:
        the tenant's idle sandboxes to destroy for it (least recently used first; removed here), or None when even
        all of them would not make room (its running ones hold the cap)."""
        mine = [r for r in self.sandboxes.values() if r.function_key.startswith(f"{tenant}/")]
        held = sum(r.memory_mb for r in mine)
        victims = []
        for record in sorted((r for r in mine if r.state == IDLE), key=lambda r: r.last_used):
            if held + memory_mb <= cap_mb:
                break
            victims.append(record)
            held -= record.memory_mb
        if held + memory_mb > cap_mb:
            return None
        for record in victims:
            self.remove(record.sandbox_id)
        return victims

    # --- retiring sandboxes of a changed or deleted function ----------------------------------------------------

    def retire_stale(self, function_key: str) -> list[SandboxRecord]:
        """A configuration of a function is being placed: the sandboxes of its earlier configurations (other
        code, settings, or a function of the same name deleted since) must serve nothing more. Idle ones are
        removed and returned, to be destroyed; busy ones finish their invoke first."""
        function_id = function_of(function_key)
        return self._retire(lambda key: key != function_key and function_of(key) == function_id)

    def retire_function(self, tenant: str, name: str) -> list[SandboxRecord]:
        """The function was deleted: every sandbox of every version of it goes."""
        return self._retire(lambda key: key.startswith(f"{tenant}/{name}/"))

    def _retire(self, matches) -> list[SandboxRecord]:
        idle = []
        for key in [k for k in self.pools if matches(k)]:
            for record in list(self.pools[key].values()):
                record.retired = True
                if record.state == IDLE:
                    idle.append(record)
        for record in idle:
            self.remove(record.sandbox_id)
        return idle

    def hand_back(self) -> tuple[list[SandboxRecord], list[HeldWorkerLease]]:
        """The manager is stopping: every idle sandbox goes (to be destroyed), and every lease with nothing
        running on it goes back to placement; a lease still running an invoke is kept to its end or expiry."""
        idle = [r for r in self.sandboxes.values() if r.state == IDLE]
        for record in idle:
            self.remove(record.sandbox_id)
        leases = [lease for lease in self.leases.values() if lease.used_mb == 0]
        for lease in leases:
            lease.return_why = "stopping"
            del self.leases[lease.lease_id]
        return idle, leases

    # --- failures and reaping ------------------------------------------------------------------------------------

    def drop_nodes(self, node_ids: Iterable[str]) -> list[SandboxRecord]:
        """Forget every sandbox on these hosts (dead or unhealthy)."""
        node_ids = set(node_ids)
        gone = [r for r in self.sandboxes.values() if r.node_id in node_ids]
        for record in gone:
            self.remove(record.sandbox_id)
        return gone

    def reap_idle(self, now: float) -> list[SandboxRecord]:
        """Idle sandboxes past the keep-alive, or on a lease that is draining toward its expiry: removed here,
        to be destroyed on their workers by the caller."""
        expired = []
        for record in self.sandboxes.values():
            if record.state != IDLE:
                continue
            lease = self.leases.get(record.lease_id)
            draining = lease is not None and lease.closing(now, self.drain_margin_s)
            if now - record.last_used > self.keep_alive_s or draining:
                expired.append(record)
        for record in expired:
            self.remove(record.sandbox_id)
        return expired

    def adopt(self, record: SandboxRecord, now: float) -> None:
        """Take over a sandbox a worker reports after a manager restart."""
        if record.sandbox_id not in self.sandboxes:
            self.add(record, now)

    def summary(self) -> dict[str, Any]:
        busy = sum(1 for r in self.sandboxes.values() if r.state == BUSY)
        return {
            "sandboxes": len(self.sandboxes), "busy": busy, "idle": len(self.sandboxes) - busy,
            "functions": len(self.pools), "leases": len(self.leases),
            "leased_mb": sum(lease.memory_mb for lease in self.leases.values()),
            "used_mb": sum(lease.used_mb for lease in self.leases.values()),
        }
