"""Steady load against a local region while it is being broken, and how long it took to heal.

Used by the failover chaos tests and `benchmarks/failover.py`: a few callers invoke a function back to back
(no client retries, so every outcome is what the platform itself gave), each outcome recorded with the
moment its invoke started and ended on this machine's monotonic clock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from pathlib import Path

from flint.client import Client, ClientConfig
from frontend.state import rendezvous_order
from wire.errors import FlintError
from wire.keys import KeyPair


@dataclasses.dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    error: str = ""  # "Type:Reason" of the error a client got


class SteadyLoad:
    def __init__(self, region_dir: Path, function: str, callers: int = 4, payload: dict | None = None,
                 timeout_s: float = 10.0, pause_s: float = 0.005):
        self.region_dir = region_dir
        self.function = function
        self.callers = callers
        self.payload = payload or {"name": "chaos"}
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self.unclear: list[str] = []  # anything that was not a Lambda-named error: a bug
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._caller, daemon=True) for _ in range(callers)]

    def start(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def _caller(self) -> None:
        cfg = ClientConfig.load(self.region_dir)
        client = Client(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(cfg.key_file),
                        timeout_s=self.timeout_s, retries=0)
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    result = client.invoke(self.function, self.payload)
                    error = ""
                    if result.function_error is not None:
                        error = f"FunctionError:{(result.json() or {}).get('errorType', result.function_error)}"
                    outcome = Outcome(began, time.monotonic(), result.function_error is None, error)
                except FlintError as err:
                    outcome = Outcome(began, time.monotonic(), False, f"{err.type_name}:{err.reason}")
                except Exception as exc:  # noqa: BLE001 - recorded as a failure of the platform to be clear
                    outcome = Outcome(began, time.monotonic(), False, f"unclear:{exc!r}")
                    with self._lock:
                        self.unclear.append(repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)
                time.sleep(self.pause_s)
        finally:
            client.close()

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return sorted((o for o in self.outcomes if o.started >= t), key=lambda o: o.started)

    def errors(self, t0: float, t1: float) -> Counter:
        with self._lock:
            return Counter(o.error for o in self.outcomes if t0 <= o.started < t1 and not o.ok)

    def recovery(self, broke_at: float) -> tuple[float | None, float | None]:
        """(first, steady): seconds from `broke_at` to the first success of an invoke started after it, and to
        the start of the run of successes that lasts to the end of the record."""
        after = self.since(broke_at)
        first = next((o.ended - broke_at for o in after if o.ok), None)
        steady = None
        for o in reversed(after):
            if not o.ok:
                break
            steady = o.started - broke_at
        return first, steady

    def wait_steady(self, broke_at: float, successes: int = 20, timeout_s: float = 30.0) -> None:
        """Block until `successes` invokes in a row have succeeded since `broke_at` (or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            after = self.since(broke_at)
            streak = 0
            for o in reversed(after):
                if not o.ok:
                    break
                streak += 1
            if streak >= successes:
                return
            time.sleep(0.05)


def function_owner(function_id: str, managers: list[str]) -> str:
    """The manager node a function maps to, as every frontend computes it."""
    return rendezvous_order(function_id, managers)[0]
