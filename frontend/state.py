"""Front end decisions that need no I/O: which manager owns a function, and the function metadata cache."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable
from typing import Any

DEFAULT_CACHE_TTL_S = 2.0


def _score(function_key: str, manager_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{function_key}|{manager_id}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(function_key: str, managers: Iterable[str]) -> list[str]:
    """Managers in the order this function tries them (highest random weight first).

    Every frontend computes the same order from the same set of live managers, so a function's sandboxes gather
    at one manager; when that manager dies only its functions move, each to its own next choice.
    """
    return sorted(set(managers), key=lambda m: _score(function_key, m), reverse=True)


class FunctionCache:
    """Resolved function configs, per (tenant, name), kept for `ttl_s`. Misses and expiries go to the registry."""

    def __init__(self, ttl_s: float = DEFAULT_CACHE_TTL_S, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    def get(self, tenant: str, name: str, now: float) -> dict[str, Any] | None:
        hit = self._entries.get((tenant, name))
        if hit is None or now - hit[0] > self.ttl_s:
            return None
        return hit[1]

    def put(self, tenant: str, name: str, config: dict[str, Any], now: float) -> None:
        if len(self._entries) >= self.max_entries:
            oldest = min(self._entries, key=lambda k: self._entries[k][0])
            del self._entries[oldest]
        self._entries[(tenant, name)] = (now, config)

    def forget(self, tenant: str, name: str) -> None:
        """Forget a function: its $LATEST and every name:qualifier entry."""
        for key in [k for k in self._entries if k[0] == tenant and (k[1] == name or k[1].startswith(name + ":"))]:
            del self._entries[key]


# --- admission: the credits this frontend holds ------------------------------------------------------------------

DEFAULT_LEASE_S = 3.0
DEFAULT_SKEW_MARGIN_S = 0.25
DEFAULT_IDLE_RETURN_S = 2.0
MIN_BLOCK = 2


@dataclasses.dataclass
class HeldLease:
    lease_id: str
    tenant: str
    pool: str
    function: str  # the function that opened it: renewals name it so the ledger finds the same pool
    credits: int = 0
    in_use: int = 0
    valid_until: float = 0.0  # local monotonic; no admission at or after it
    max_timeout_s: float = 0.0  # the ledger frees the credits this long after expiry (plus cold-start allowance)
    peak: int = 0  # the most in use since the last renewal
    last_used: float = 0.0
    target: int | None = None  # the ledger asked us to come down to this
    closed: bool = False  # replaced or expired: kept only until its executions end

    def spare(self, now: float) -> int:
        if self.closed or now >= self.valid_until:
            return 0
        limit = self.credits if self.target is None else min(self.credits, max(self.target, 0))
        return limit - self.in_use


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One admitted execution and the lease whose credit it holds."""

    lease_id: str
    tenant: str
    function: str
    admitted_at: float  # local monotonic


@dataclasses.dataclass(frozen=True)
class LeaseRequest:
    lease_id: str
    tenant: str
    function: str
    want: int
    in_use: int
    max_timeout_s: float


class CreditWallet:
    """The leases one frontend holds, per tenant and pool, and the local admission rule. No I/O: the shell sends
    the LeaseRequests this class produces, one at a time per lease, and feeds the grants back with the local
    monotonic time at which each request was sent.

    Safety rests on two habits: credits given back are stopped being used here before the request leaves, and a
    lease counts as valid only until `sent_at + lease_s - skew_margin_s`, never later than the ledger's expiry.
    """

    def __init__(
        self,
        holder: str,
        lease_s: float = DEFAULT_LEASE_S,
        skew_margin_s: float = DEFAULT_SKEW_MARGIN_S,
        idle_return_s: float = DEFAULT_IDLE_RETURN_S,
    ):
        self.holder = holder
        self.lease_s = lease_s
        self.skew_margin_s = skew_margin_s
        self.idle_return_s = idle_return_s
        self.pools: dict[tuple[str, str], str] = {}  # (tenant, function) -> pool, as the ledger said
        self.active: dict[tuple[str, str], HeldLease] = {}  # (tenant, pool) -> the lease new admissions use
        self.by_id: dict[str, HeldLease] = {}  # every lease still holding credits, active or draining
        self.outbox: list[LeaseRequest] = []  # closed, empty leases to release at the ledger
        self._seq = 0

    # --- the hot path --------------------------------------------------------------------------------------------

    def try_admit(self, tenant: str, function: str, timeout_s: float, now: float) -> Ticket | None:
        pool = self.pools.get((tenant, function))
        if pool is None:
            return None
        lease = self.active.get((tenant, pool))
        if lease is None or timeout_s > lease.max_timeout_s or lease.spare(now) <= 0:
            return None
        lease.in_use += 1
        lease.peak = max(lease.peak, lease.in_use)
        lease.last_used = now
        return Ticket(lease.lease_id, tenant, function, now)

    def release(self, ticket: Ticket, now: float) -> LeaseRequest | None:
        """An execution ended. Returns a final release for a draining lease that has just emptied."""
        lease = self.by_id.get(ticket.lease_id)
        if lease is None:
            return None
        lease.in_use = max(0, lease.in_use - 1)
        lease.last_used = now
        if lease.closed and lease.in_use == 0:
            del self.by_id[lease.lease_id]
            return LeaseRequest(lease.lease_id, lease.tenant, lease.function, 0, 0, lease.max_timeout_s)
        return None

    def lease_for(self, tenant: str, function: str) -> HeldLease | None:
        pool = self.pools.get((tenant, function))
        return None if pool is None else self.active.get((tenant, pool))

    # --- asking the ledger ---------------------------------------------------------------------------------------

    def grow(self, tenant: str, function: str, timeout_s: float, waiting: int, now: float) -> LeaseRequest:
        """What to ask for when an admission found no spare credit (`waiting` admissions want one)."""
        lease = self.lease_for(tenant, function)
        if lease is None or lease.closed or now >= lease.valid_until:
            if lease is not None:
                self._close(lease)
            return LeaseRequest(self._new_id(), tenant, function, max(MIN_BLOCK, waiting), 0, timeout_s)
        if lease.target is not None:
            want = max(lease.in_use, lease.target)  # comply first; growth comes after the ledger lets go
            lease.credits = min(lease.credits, want)
        else:
            want = max(lease.credits, lease.in_use + waiting + max(MIN_BLOCK, lease.credits // 2))
        return LeaseRequest(lease.lease_id, tenant, lease.function, want, lease.in_use,
                            max(lease.max_timeout_s, timeout_s))

    def apply(self, request: LeaseRequest, grant: dict, sent_at: float) -> HeldLease | None:
        """Fold the ledger's answer in."""
        pool = grant["pool"]
        self.pools[(request.tenant, request.function)] = pool
        lease = self.by_id.get(request.lease_id)
        if not grant.get("renewed", False):
            if lease is not None:
                self._close(lease)
            return None
        if lease is None:
            lease = HeldLease(request.lease_id, request.tenant, pool, request.function, last_used=sent_at)
            self.by_id[lease.lease_id] = lease
        previous = self.active.get((request.tenant, pool))
        if previous is not None and previous is not lease:
            self._close(previous)
        self.active[(request.tenant, pool)] = lease
        lease.credits = grant["credits"]
        lease.max_timeout_s = max(lease.max_timeout_s, request.max_timeout_s)
        lease.valid_until = sent_at + self.lease_s - self.skew_margin_s
        lease.target = grant.get("target")
        lease.peak = lease.in_use
        return lease

    def due(self, now: float, busy: set[str] = frozenset()) -> tuple[list[LeaseRequest], list[LeaseRequest]]:
        """(renewals, releases) to send now: renew a lease in use before it lapses, or when the ledger asked for
        credits back; release one that has been idle for `idle_return_s`. Leases in `busy` have a request in
        flight and are left alone."""
        renew: list[LeaseRequest] = []
        release: list[LeaseRequest] = []
        for lease in list(self.active.values()):
            if lease.lease_id in busy:
                continue
            idle = lease.in_use == 0 and now - lease.last_used >= self.idle_return_s
            if idle or now >= lease.valid_until:
                self._close(lease)
                continue
            want = max(lease.in_use, math.ceil(lease.peak * 1.25) + 1)
            if lease.target is not None:
                want = max(lease.in_use, min(want, lease.target))
            expiring = lease.valid_until - now < self.lease_s / 2
            if expiring or (lease.target is not None and want < lease.credits):
                if want < lease.credits:
                    lease.credits = want  # stop using what goes back before the ledger hears of it
                renew.append(LeaseRequest(lease.lease_id, lease.tenant, lease.function, want, lease.in_use,
                                          lease.max_timeout_s))
        release.extend(self.outbox)
        self.outbox.clear()
        return renew, release

    def revise(self, tenant: str) -> None:
        """The ledger changed the tenant's limits or wants idle credits back: admit nothing beyond what runs
        until each lease has renewed, and forget which pool each function uses (reservations may have moved)."""
        for key in [k for k in self.pools if k[0] == tenant]:
            del self.pools[key]
        for (t, _), lease in self.active.items():
            if t == tenant:
                lease.target = 0

    # --- internals -----------------------------------------------------------------------------------------------

    def _close(self, lease: HeldLease) -> None:
        lease.closed = True
        if self.active.get((lease.tenant, lease.pool)) is lease:
            del self.active[(lease.tenant, lease.pool)]
        if lease.in_use == 0 and lease.lease_id in self.by_id:
            del self.by_id[lease.lease_id]  # nothing runs under it: give it back now
            self.outbox.append(LeaseRequest(lease.lease_id, lease.tenant, lease.function, 0, 0, lease.max_timeout_s))

    def _new_id(self) -> str:
        self._seq += 1
        return f"{self.holder}.{self._seq}"

    def held(self) -> dict[str, int]:
        return {"leases": len(self.by_id), "credits": sum(lease.credits for lease in self.by_id.values()),
                "in_use": sum(lease.in_use for lease in self.by_id.values())}
