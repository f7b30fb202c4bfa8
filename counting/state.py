"""The region-wide concurrency ledger: limits, reservations and credit leases. No I/O; `now` is the proposer's
wall clock, carried in every command, so every replica applies expiry identically.

Pools. Each tenant has a limit (default 1000). A function may reserve concurrency, carved out of the limit; at
least `unreserved_min` (default 100) stays unreserved. A function with a reservation draws from its own pool
(the function's name); every other function shares the unreserved pool (""). Reserved 0 throttles the function.

Leases. A frontend holds, per tenant and pool, a lease on `credits`. It admits locally while it has a spare
credit and renews the lease (one command) to grow, shrink or extend it. The ledger only ever grows a lease out
of free capacity and never shrinks one on its own: it can ask (`target`, pushed to the holder as a revision),
and the holder shrinks when it renews, having first stopped using what it gives up. A lease's credits stay held
until `free_at` = expiry + the longest timeout it could have admitted + the cold-start allowance, by which time
the worker has killed anything admitted under it. Hence: the credits of live leases never exceed a pool's
capacity when they are granted, and no execution outlives the credits that admitted it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

from wire.config import DEFAULTS
from wire.errors import InvalidParameterValueException, ResourceNotFoundException

UNRESERVED = ""


@dataclasses.dataclass
class CreditLease:
    lease_id: str
    holder: str  # the frontend that holds it
    endpoint: str  # where revisions are pushed
    tenant: str
    pool: str
    credits: int
    in_use: int
    expires_at: float
    free_at: float
    max_timeout_s: float
    demand: int = 0  # what the holder last asked for
    target: int | None = None  # the ledger asks the holder to come down to this

    def view(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Ledger:
    def __init__(
        self,
        default_limit: int = DEFAULTS.default_tenant_limit,
        unreserved_min: int = DEFAULTS.unreserved_min,
        cold_start_allowance_s: float = DEFAULTS.cold_start_allowance_s,
    ):
        self.default_limit = default_limit
        self.unreserved_min = unreserved_min
        self.cold_start_allowance_s = cold_start_allowance_s
        self.limits: dict[str, int] = {}
        self.reserved: dict[str, dict[str, int]] = {}
        self.leases: dict[str, CreditLease] = {}

    # --- reads ---------------------------------------------------------------------------------------------------

    def limit(self, tenant: str) -> int:
        return self.limits.get(tenant, self.default_limit)

    def pool_for(self, tenant: str, function: str) -> str:
        return function if function in self.reserved.get(tenant, {}) else UNRESERVED

    def capacity(self, tenant: str, pool: str) -> int:
        reserved = self.reserved.get(tenant, {})
        if pool != UNRESERVED:
            return reserved.get(pool, 0)
        return max(0, self.limit(tenant) - sum(reserved.values()))

    def pool_leases(self, tenant: str, pool: str) -> list[CreditLease]:
        return [lease for lease in self.leases.values() if lease.tenant == tenant and lease.pool == pool]

    def held(self, tenant: str, pool: str, now: float) -> int:
        """Credits counted against the pool: every lease not yet freed, expired or not."""
        return sum(lease.credits for lease in self.pool_leases(tenant, pool) if lease.free_at > now)

    def tenant_view(self, tenant: str, now: float) -> dict[str, Any]:
        pools = {UNRESERVED, *self.reserved.get(tenant, {})}
        return {
            "limit": self.limit(tenant),
            "unreserved_min": self.unreserved_min,
            "reserved": dict(self.reserved.get(tenant, {})),
            "pools": {
                p or "(unreserved)": {
                    "capacity": self.capacity(tenant, p),
                    "held": self.held(tenant, p, now),
                    "in_use": sum(lease.in_use for lease in self.pool_leases(tenant, p)),
                    "leases": len(self.pool_leases(tenant, p)),
                }
                for p in sorted(pools)
            },
        }

    def digest(self) -> str:
        """A fingerprint of the whole ledger: replicas at the same commit index must agree on it."""
        h = hashlib.sha256()
        h.update(repr(sorted(self.limits.items())).encode())
        h.update(repr(sorted((t, sorted(r.items())) for t, r in self.reserved.items())).encode())
        for lease_id in sorted(self.leases):
            h.update(repr(sorted(self.leases[lease_id].view().items())).encode())
        return h.hexdigest()[:16]

    # --- commands ------------------------------------------------------------------------------------------------

    def cmd_lease(
        self,
        now: float,
        lease_id: str,
        holder: str,
        endpoint: str,
        tenant: str,
        function: str,
        want: int,
        in_use: int,
        max_timeout_s: float,
        duration_s: float,
    ) -> dict[str, Any]:
        """Take or renew a lease on credits for `function`'s pool. Grows only out of free capacity; shrinks only
        to what the holder asks (`want`, which the holder has already stopped using beyond)."""
        if want < 0 or in_use < 0 or duration_s <= 0 or max_timeout_s < 0:
            raise InvalidParameterValueException("want, in_use, duration_s and max_timeout_s must be positive")
        self._collect(now)
        pool = self.pool_for(tenant, function)
        lease = self.leases.get(lease_id)
        if lease is not None and (lease.expires_at <= now or lease.pool != pool or lease.tenant != tenant):
            # An expired lease, or one whose function changed pool, is not renewed: its credits stay held until
            # free_at, and the holder starts a new lease for new admissions.
            return {"lease_id": lease_id, "renewed": False, "pool": pool, "credits": 0, "expires_at": lease.expires_at,
                    "revise": [], "reason": "expired" if lease.expires_at <= now else "pool_changed"}
        cap = self.capacity(tenant, pool)
        want = max(want, in_use)
        current = lease.credits if lease is not None else 0
        if want <= current:
            credits = want  # the holder gives back what it no longer uses
        else:
            free = max(0, cap - self.held(tenant, pool, now))
            grow = min(want - current, free)
            if self._others_short(tenant, pool, lease_id, now):
                # others wait for credits: grow no further than a fair share, so freed credits reach them
                grow = min(grow, max(0, self._fair_share(tenant, pool, cap, lease_id, now) - current))
            credits = current + grow
        if lease is None:
            lease = CreditLease(lease_id, holder, endpoint, tenant, pool, credits, in_use, 0.0, 0.0, 0.0)
            self.leases[lease_id] = lease
        lease.credits = credits
        lease.in_use = in_use
        lease.demand = want
        # A target is recomputed at every renewal and stays until the holder has come down to it:
        # - over capacity (the limit was lowered under running executions): shed the excess;
        # - others are short of credits: come down to a fair share.
        # The holder keeps what runs but admits nothing beyond its target as its executions finish.
        over = self.held(tenant, pool, now) - cap
        share = self._fair_share(tenant, pool, cap, lease_id, now)
        if over > 0:
            lease.target = max(0, credits - over)
        elif credits > share and self._others_short(tenant, pool, lease_id, now):
            lease.target = share
        else:
            lease.target = None
        lease.max_timeout_s = max(lease.max_timeout_s, max_timeout_s)
        lease.expires_at = now + duration_s
        lease.free_at = lease.expires_at + lease.max_timeout_s + self.cold_start_allowance_s
        revise: list[str] = []
        reclaimable = 0
        if credits < want:
            revise, reclaimable = self._share(tenant, pool, cap, exclude=lease_id)
        return {
            "lease_id": lease_id,
            "renewed": True,
            "pool": pool,
            "credits": credits,
            "expires_at": lease.expires_at,
            "capacity": cap,
            "reclaimable": reclaimable,
            "revise": revise,
            "target": lease.target,
        }

    def cmd_release(self, now: float, lease_id: str, in_use: int) -> dict[str, Any]:
        """The holder gives back every credit it is not using. With nothing in use the lease ends at once: the
        holder has stopped admitting under it before sending this."""
        self._collect(now)
        lease = self.leases.get(lease_id)
        if lease is None:
            return {"released": False}
        if in_use <= 0:
            del self.leases[lease_id]
        else:
            lease.credits = min(lease.credits, max(in_use, 0)) if lease.expires_at > now else lease.credits
            lease.in_use = in_use
            lease.demand = 0
        return {"released": True}

    def cmd_set_limit(self, now: float, tenant: str, limit: int) -> dict[str, Any]:
        if limit < 0:
            raise InvalidParameterValueException("a concurrency limit cannot be negative")
        reserved = sum(self.reserved.get(tenant, {}).values())
        if reserved and limit - reserved < self.unreserved_min:
            raise InvalidParameterValueException(
                f"the functions of {tenant} reserve {reserved}; a limit of {limit} would leave fewer than "
                f"{self.unreserved_min} unreserved. Lower reservations first."
            )
        self.limits[tenant] = limit
        return {"limit": limit, "revise": self._ask_all(tenant, now)}

    def cmd_set_reserved(self, now: float, tenant: str, function: str, reserved: int | None) -> dict[str, Any]:
        """Reserve `reserved` for `function` (0 throttles it), or remove its reservation (None)."""
        table = self.reserved.setdefault(tenant, {})
        if reserved is None:
            if table.pop(function, None) is None:
                raise ResourceNotFoundException(f"function {function} has no reserved concurrency")
        else:
            if reserved < 0:
                raise InvalidParameterValueException("reserved concurrency cannot be negative")
            others = sum(v for f, v in table.items() if f != function)
            unreserved = self.limit(tenant) - others - reserved
            if unreserved < self.unreserved_min:
                raise InvalidParameterValueException(
                    "Specified ReservedConcurrentExecutions for function decreases account's "
                    f"UnreservedConcurrentExecution below its minimum value of [{self.unreserved_min}]."
                )
            table[function] = reserved
        if not table:
            self.reserved.pop(tenant, None)
        return {"reserved": reserved, "revise": self._ask_all(tenant, now)}

    # --- internals -----------------------------------------------------------------------------------------------

    def _collect(self, now: float) -> None:
        for lease_id in [i for i, lease in self.leases.items() if lease.free_at <= now]:
            del self.leases[lease_id]

    def _active(self, tenant: str, pool: str, now: float, include: str) -> list[CreditLease]:
        return [
            lease for lease in self.pool_leases(tenant, pool)
            if lease.lease_id == include or (lease.expires_at > now and (lease.demand > 0 or lease.in_use > 0))
        ]

    def _fair_share(self, tenant: str, pool: str, cap: int, lease_id: str, now: float) -> int:
        return math.ceil(cap / max(1, len(self._active(tenant, pool, now, lease_id))))

    def _others_short(self, tenant: str, pool: str, lease_id: str, now: float) -> bool:
        return any(
            lease.lease_id != lease_id and lease.expires_at > now and lease.demand > lease.credits
            for lease in self.pool_leases(tenant, pool)
        )

    def _share(self, tenant: str, pool: str, cap: int, exclude: str) -> tuple[list[str], int]:
        """A request went short: ask holders above their fair share to come down to it."""
        active = [lease for lease in self.pool_leases(tenant, pool) if lease.demand > 0 or lease.in_use > 0]
        share = math.ceil(cap / max(1, len(active)))
        revise: list[str] = []
        reclaimable = 0
        for lease in self.pool_leases(tenant, pool):
            if lease.lease_id == exclude:
                continue
            if lease.credits > share:
                # busy or idle, it comes down to the share: idle credits at once, busy ones as executions end
                lease.target = share
                reclaimable += lease.credits - share
                if lease.endpoint not in revise:
                    revise.append(lease.endpoint)
        return revise, reclaimable

    def _ask_all(self, tenant: str, now: float) -> list[str]:
        """After a limit or reservation change: every holder of the tenant renews at once."""
        endpoints: list[str] = []
        for lease in self.leases.values():
            if lease.tenant == tenant and lease.free_at > now:
                lease.target = 0
                if lease.endpoint not in endpoints:
                    endpoints.append(lease.endpoint)
        return endpoints

Ledger.COMMANDS = {
    "lease": Ledger.cmd_lease,
    "release": Ledger.cmd_release,
    "set_limit": Ledger.cmd_set_limit,
    "set_reserved": Ledger.cmd_set_reserved,
}
