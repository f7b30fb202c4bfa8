"""Front end decisions that need no I/O: the function metadata cache, which configuration an alias runs, and the
plan of an invoke (which manager, what to do when a step fails). The credits a frontend admits on are in
frontend/credits.py. Time comes in as `now` (the frontend's monotonic clock)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wire.config import DEFAULTS
from wire.errors import Reason, ServiceException
from wire.messages import Choice, FunctionConfig


def _score(function_id: str, manager_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{function_id}|{manager_id}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(function_id: str, managers: Iterable[str]) -> list[str]:
    """Managers in the order this function tries them (highest random weight first).

    Every frontend computes the same order from the same set of live managers, so a function's sandboxes gather
    at one manager; when that manager dies only its functions move, each to its own next choice.
    """
    return sorted(set(managers), key=lambda m: _score(function_id, m), reverse=True)


class FunctionCache:
    """Resolved function configs, per (tenant, name), kept for `ttl_s`. Misses and expiries go to the registry."""

    def __init__(self, ttl_s: float = DEFAULTS.function_cache_ttl_s, max_entries: int = 10_000):
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

    def forget_tenant(self, tenant: str) -> None:
        for key in [k for k in self._entries if k[0] == tenant]:
            del self._entries[key]

    def forget(self, tenant: str, name: str) -> None:
        """Forget a function: its $LATEST and every name:qualifier entry."""
        for key in [k for k in self._entries if k[0] == tenant and (k[1] == name or k[1].startswith(name + ":"))]:
            del self._entries[key]


def choose(choices: Sequence[Choice], roll: float) -> FunctionConfig:
    """Which of an alias's configurations an invoke runs: `roll` in [0, 1) against their weights (the canary)."""
    for choice in choices:
        if roll < choice.weight:
            return choice.config
        roll -= choice.weight
    return choices[-1].config


# --- the invoke plan: which manager, and what to do when a step fails ----------------------------------------------

MANAGER_DOWN_S = 3.0  # a manager that failed us is skipped this long: longer than placement takes to mark it down
MAX_STEPS = 8  # reservations one invoke may ask for before it gives up (NoRoute)
NOT_SENT_ROUNDS = 2  # times an invoke goes round again when every manager failed before the request left
ROUND_PAUSE_S = 0.3  # ... waiting this long times the round number first


@dataclasses.dataclass(frozen=True)
class Ask:
    manager: str  # the manager endpoint to reserve a sandbox from


@dataclasses.dataclass(frozen=True)
class Pause:
    seconds: float


class ManagersDown:
    """Managers that failed an invoke lately, shared by every invoke of a frontend (monotonic time)."""

    def __init__(self, skip_s: float = MANAGER_DOWN_S):
        self.skip_s = skip_s
        self._until: dict[str, float] = {}

    def failed(self, endpoint: str, now: float) -> None:
        self._until[endpoint] = now + self.skip_s

    def is_down(self, endpoint: str, now: float) -> bool:
        return self._until.get(endpoint, 0.0) > now


class InvokePlan:
    """The route of one invoke, step by step: reserve a sandbox from the function's manager (rendezvous order
    over the healthy managers), run there, and on failure decide what is safe. An invoke that certainly never
    reached a host is tried elsewhere; one that may have started is not, and the error says so (`may_still_run`).
    The shell asks `next()` for the manager to try, and reports how each step went."""

    def __init__(self, function_id: str, down: ManagersDown):
        self.function_id = function_id
        self.down = down
        self.avoid_nodes: list[str] = []  # hosts this invoke could not reach: a new reservation avoids them
        self.skipped: set[str] = set()  # managers that failed this invoke
        self.why: list[str] = []  # what each failed manager said, for the error
        self.retried_elsewhere = False
        self.rounds = 0
        self.steps = 0

    def next(self, managers: Mapping[str, str], region_has_nodes: bool, now: float) -> Ask | Pause:
        """`managers`: node id -> manager endpoint, of the healthy managers as placement last said."""
        if (self.skipped and set(managers.values()) <= self.skipped and self.rounds < NOT_SENT_ROUNDS
                and all(w.endswith(Reason.NOT_SENT) for w in self.why)):
            # every manager failed before the request left (nodes starting, a handshake under way): nothing ran
            # anywhere, so wait a moment and go round once more
            self.rounds += 1
            self.skipped.clear()
            return Pause(ROUND_PAUSE_S * self.rounds)
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ServiceException("no worker manager or host could take this invoke; retry shortly",
                                   reason=Reason.NO_ROUTE)
        order = [managers[n] for n in rendezvous_order(self.function_id, managers)
                 if managers[n] not in self.skipped]
        for endpoint in order:  # a manager that just failed us is skipped until placement catches up
            if not self.down.is_down(endpoint, now):
                return Ask(endpoint)
        if order:
            return Ask(order[0])
        if region_has_nodes and not managers:
            raise ServiceException("no healthy worker manager in the region", reason=Reason.NO_MANAGER)
        raise ServiceException(f"every worker manager failed this invoke ({'; '.join(self.why)}); retry shortly",
                               reason=Reason.NO_MANAGER)

    def manager_unreachable(self, endpoint: str, reason: str | None, now: float) -> None:
        self.skipped.add(endpoint)
        self.why.append(f"{endpoint}: {reason}")
        self.down.failed(endpoint, now)

    def host_unreachable(self, node_id: str, reason: str | None, message: str) -> None:
        """The reserved host could not be reached. Returns if the invoke may go to another host (it certainly
        never started); raises the error the caller gets otherwise."""
        if reason == Reason.NOT_SENT and not self.retried_elsewhere:
            self.retried_elsewhere = True
            self.avoid_nodes.append(node_id)
            return
        if reason == Reason.NOT_SENT:  # the second host could not be reached either: nothing ran
            raise ServiceException(
                f"the hosts chosen for this invoke could not be reached (the last: {node_id}); the function did "
                "not run. Retry shortly.", reason=Reason.WORKER_UNREACHABLE)
        raise ServiceException(
            f"the host running this invoke ({node_id}) failed: {message}. The function may have run; retry if it "
            "is safe to run it again.", reason=Reason.WORKER_LOST, retryable=True,
            may_still_run=True,  # it may be running on a host we cannot hear
        )
