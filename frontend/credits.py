"""The credits one frontend holds, and how it admits on them. No I/O; `now` is the frontend's monotonic clock.

A frontend holds, per tenant and concurrency pool, a credit lease carved out of the limit by the counting
service (counting/state.py). It admits locally while a lease has a spare credit (`CreditWallet.try_admit`, the
microsecond path) and asks the ledger for more when it runs out; `AdmissionRule` says what to do with each
answer: use it, ask again, wait for idle credits elsewhere to come back, or throttle.
"""

from __future__ import annotations

import dataclasses
import math

from wire.config import DEFAULTS, SKEW_MARGIN_S
from wire.errors import Reason, TooManyRequestsException
from wire.messages import CreditGrant

DEFAULT_IDLE_RETURN_S = 2.0
MIN_BLOCK = 2


@dataclasses.dataclass
class HeldCreditLease:
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
        lease_s: float = DEFAULTS.credit_lease_s,
        skew_margin_s: float = SKEW_MARGIN_S,
        idle_return_s: float = DEFAULT_IDLE_RETURN_S,
    ):
        self.holder = holder
        self.lease_s = lease_s
        self.skew_margin_s = skew_margin_s
        self.idle_return_s = idle_return_s
        self.pools: dict[tuple[str, str], str] = {}  # (tenant, function) -> pool, as the ledger said
        self.active: dict[tuple[str, str], HeldCreditLease] = {}  # (tenant, pool) -> the lease new admissions use
        self.by_id: dict[str, HeldCreditLease] = {}  # every lease still holding credits, active or draining
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

    def lease_for(self, tenant: str, function: str) -> HeldCreditLease | None:
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

    def apply(self, request: LeaseRequest, grant: CreditGrant, sent_at: float) -> HeldCreditLease | None:
        """Fold the ledger's answer in."""
        pool = grant.pool
        self.pools[(request.tenant, request.function)] = pool
        lease = self.by_id.get(request.lease_id)
        if not grant.renewed:
            if lease is not None:
                self._close(lease)
            return None
        if lease is None:
            lease = HeldCreditLease(request.lease_id, request.tenant, pool, request.function, last_used=sent_at)
            self.by_id[lease.lease_id] = lease
        previous = self.active.get((request.tenant, pool))
        if previous is not None and previous is not lease:
            self._close(previous)
        self.active[(request.tenant, pool)] = lease
        lease.credits = grant.credits
        lease.max_timeout_s = max(lease.max_timeout_s, request.max_timeout_s)
        lease.valid_until = sent_at + self.lease_s - self.skew_margin_s
        lease.target = grant.target
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

    def close_all(self) -> list[LeaseRequest]:
        """The frontend is stopping: no admission from here on; the releases to send for every lease with nothing
        running under it (one still running something goes back when that ends, or expires)."""
        for lease in list(self.active.values()):
            self._close(lease)
        out, self.outbox = self.outbox, []
        return out

    # --- internals -----------------------------------------------------------------------------------------------

    def _close(self, lease: HeldCreditLease) -> None:
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


# --- what an admission does with the ledger's answer ------------------------------------------------------------

RECLAIM_WAITS_S = (0.02, 0.04, 0.08, 0.16, 0.32)  # how long to wait while idle credits elsewhere come back
MAX_ASKS = 12  # requests to the ledger one admission may make


@dataclasses.dataclass(frozen=True)
class AskAgain:
    """Ask the ledger again at once."""


@dataclasses.dataclass(frozen=True)
class WaitFor:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Throttle:
    error: TooManyRequestsException


class AdmissionRule:
    """One admission that found no spare credit: after each answer from the ledger (and a failed local admit),
    what next. Credits reclaimed from idle holders elsewhere take a few commits to come back, so an admission
    waits a little for them; when the ledger has nothing more to give, the limit really is in use."""

    def __init__(self, function: str):
        self.function = function
        self.reserved_pool = False  # the function draws on its own reservation, as the ledger last said
        self.asks = 0
        self.waits = 0

    def after(self, grant: CreditGrant, wanted: int) -> AskAgain | WaitFor | Throttle:
        """`wanted`: the credits the request asked for (its lease's new size)."""
        self.asks += 1
        self.reserved_pool = bool(grant.pool)
        if self.asks >= MAX_ASKS:
            return Throttle(self.error())
        if grant.renewed and grant.credits >= wanted:
            return AskAgain()  # we got all we asked for, but other admissions here took it: ask again
        if grant.reclaimable or grant.target is not None or not grant.renewed:
            # idle credits elsewhere are on their way back, or our own lease is being reshaped
            if self.waits < len(RECLAIM_WAITS_S):
                self.waits += 1
                return WaitFor(RECLAIM_WAITS_S[self.waits - 1])
        return Throttle(self.error())

    def error(self) -> TooManyRequestsException:
        if self.reserved_pool:
            return TooManyRequestsException(
                f"Rate Exceeded. Function {self.function} is at its reserved concurrency.",
                reason=Reason.RESERVED_LIMIT,
            )
        return TooManyRequestsException(
            "Rate Exceeded. The tenant's concurrency limit is in use.", reason=Reason.CONCURRENT_LIMIT
        )
