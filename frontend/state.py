"""Front end decisions that need no I/O: which manager owns a function, and the function metadata cache."""

from __future__ import annotations

import hashlib
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
        self._entries.pop((tenant, name), None)
