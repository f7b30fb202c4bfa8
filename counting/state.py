"""The region-wide concurrency ledger. No I/O; `now` is the proposer's clock, carried in each command.

First version: one slot per execution. A slot is held by an invoke's request id until released, or until its
hold time (the function's timeout plus a margin) has passed - after which the worker has killed the execution
anyway, so freeing it cannot overshoot the limit.
"""

from __future__ import annotations

from wire.errors import InvalidParameterValueException, TooManyRequestsException

DEFAULT_TENANT_LIMIT = 1000


class CountingState:
    def __init__(self, default_limit: int = DEFAULT_TENANT_LIMIT):
        self.default_limit = default_limit
        self.limits: dict[str, int] = {}
        self.slots: dict[str, dict[str, float]] = {}  # tenant -> slot id -> expires at

    def limit(self, tenant: str) -> int:
        return self.limits.get(tenant, self.default_limit)

    def in_use(self, tenant: str, now: float) -> int:
        return sum(1 for expires in self.slots.get(tenant, {}).values() if expires > now)

    # --- commands ------------------------------------------------------------------------------------------------

    def cmd_acquire(self, now: float, tenant: str, slot_id: str, hold_s: float) -> int:
        """Take one slot for `slot_id`; idempotent. Returns the tenant's slots in use."""
        if hold_s <= 0:
            raise InvalidParameterValueException("hold_s must be positive")
        slots = self.slots.setdefault(tenant, {})
        self._expire(slots, now)
        if slot_id in slots:
            return len(slots)
        if len(slots) >= self.limit(tenant):
            raise TooManyRequestsException(
                f"Rate Exceeded. The account's concurrency limit of {self.limit(tenant)} is in use.",
                reason="ConcurrentInvocationLimitExceeded",
            )
        slots[slot_id] = now + hold_s
        return len(slots)

    def cmd_release(self, now: float, tenant: str, slot_id: str) -> int:
        slots = self.slots.get(tenant, {})
        slots.pop(slot_id, None)
        self._expire(slots, now)
        return len(slots)

    def cmd_set_limit(self, now: float, tenant: str, limit: int) -> int:
        if limit < 0:
            raise InvalidParameterValueException("a concurrency limit cannot be negative")
        self.limits[tenant] = limit
        return limit

    @staticmethod
    def _expire(slots: dict[str, float], now: float) -> None:
        for slot_id in [s for s, expires in slots.items() if expires <= now]:
            del slots[slot_id]
