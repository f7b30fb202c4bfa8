"""The async event queue: every accepted `Event` invoke until it has run, or has run out of tries or age.

No I/O; `now` is the proposer's clock. Replicated in the `control` group (registry.state.ControlState), so an
event is committed to a majority before its 202 goes back, and survives any minority of control nodes. The
frontend's poller (frontend/poller.py) takes and settles events through the registry service.

Delivery is at least once. Pollers take events with a visibility timeout: an event whose poller dies becomes
visible again when the timeout passes and is delivered again. A function error uses one of the event's
retries (0 to 2, default 2) and the next try waits a backoff; a throttle or a system error waits and tries
again without using a retry. An event that runs out of retries, or is older than its maximum age (default 6 h),
goes to the tenant's dead-letter queue with its last error, from where it can be redriven.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from typing import Any

from wire.messages import EVENT_AGE_S_MAX, RETRIES_MAX, EventState, SettleOutcome

QUEUED, INFLIGHT, DONE, DLQ = EventState.QUEUED, EventState.INFLIGHT, EventState.DONE, EventState.DLQ
DONE_RETENTION_S = 3600.0  # finished events stay listable this long
MAX_EVENTS = 500_000


@dataclasses.dataclass
class Event:
    event_id: str
    tenant: str
    function: str
    qualifier: str | None
    payload: bytes
    accepted_at: float
    max_retries: int
    max_age_s: float
    state: str = QUEUED
    visible_at: float = 0.0
    owner: str = ""
    attempts: int = 0  # function errors so far
    deliveries: int = 0  # times a poller took it
    last_error: dict[str, Any] | None = None
    settled_at: float | None = None

    def view(self, payload: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "payload"}
        if payload:
            out["payload"] = self.payload
        out["payload_bytes"] = len(self.payload)
        return out


class EventQueue:
    def __init__(self, retry_backoff_s: float, throttle_backoff_s: float = 0.2):
        self.retry_backoff_s = retry_backoff_s
        self.throttle_backoff_s = throttle_backoff_s
        self.events: dict[str, Event] = {}
        self._ready: list[tuple[float, int, str]] = []  # (visible_at, seq, event id); stale entries skipped
        self._seq = 0
        self._finished: deque[tuple[float, str]] = deque()  # (settled_at, event id) of done events, in order

    # --- commands ------------------------------------------------------------------------------------------------

    def put(self, now: float, event_id: str, tenant: str, function: str, payload: bytes,
            qualifier: str | None = None, max_retries: int = RETRIES_MAX,
            max_age_s: float = EVENT_AGE_S_MAX) -> dict[str, Any]:
        """Accept an event. Idempotent: the same id (a client's retry) is the same event."""
        existing = self.events.get(event_id)
        if existing is not None:
            return existing.view()
        self._collect(now)
        event = Event(event_id, tenant, function, qualifier, payload, now, max(0, min(RETRIES_MAX, max_retries)),
                      max_age_s, visible_at=now)
        self.events[event_id] = event
        self._push(event)
        return event.view()

    def take(self, now: float, poller: str, limit: int, visibility_s: float) -> list[dict[str, Any]]:
        """Up to `limit` visible events for `poller`, hidden from others for `visibility_s`. Events past their
        maximum age go to the dead-letter queue instead."""
        out: list[dict[str, Any]] = []
        while self._ready and len(out) < limit and self._ready[0][0] <= now:
            visible_at, _, event_id = heapq.heappop(self._ready)
            event = self.events.get(event_id)
            if event is None or event.visible_at != visible_at or event.state not in (QUEUED, INFLIGHT):
                continue  # stale heap entry
            if now - event.accepted_at > event.max_age_s:
                self._dead(event, now, {"errorType": "EventAgeExceeded",
                                        "errorMessage": f"the event was older than {event.max_age_s:.0f}s"})
                continue
            event.state = INFLIGHT
            event.owner = poller
            event.deliveries += 1
            event.visible_at = now + visibility_s
            self._push(event)
            out.append(event.view(payload=True))
        return out

    def settle(self, now: float, poller: str, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Outcomes of taken events: {event_id, outcome: ok | function_error | throttled | system_error |
        fatal | extend, error?}. A success counts whoever reports it; a failure only from the event's current holder."""
        results = []
        for o in outcomes:
            event = self.events.get(o["event_id"])
            if event is None or event.state in (DONE, DLQ):
                continue
            outcome = o["outcome"]
            if outcome == SettleOutcome.OK:
                event.state, event.settled_at, event.payload = DONE, now, b""
                self._finished.append((now, event.event_id))
            elif event.owner != poller or event.state != INFLIGHT:
                continue  # redelivered to someone else meanwhile: theirs to settle
            elif outcome == SettleOutcome.EXTEND:
                event.visible_at = now + float(o.get("visibility_s", 60.0))
                self._push(event)
            elif outcome == SettleOutcome.FATAL:  # the function or its alias is gone: no retry can help
                self._dead(event, now, o.get("error"))
            elif outcome == SettleOutcome.FUNCTION_ERROR:
                event.attempts += 1
                event.last_error = o.get("error")
                if event.attempts > event.max_retries:
                    self._dead(event, now, o.get("error"))
                else:
                    self._retry(event, now, self.retry_backoff_s * 2 ** (event.attempts - 1))
            else:  # throttled or system_error: wait and try again, no retry used (the age still counts)
                event.last_error = o.get("error")
                self._retry(event, now, self.throttle_backoff_s * min(32, 2 ** min(event.deliveries, 5)))
            results.append({"event_id": event.event_id, "state": event.state})
        return results

    def redrive(self, now: float, tenant: str, event_ids: list[str] | None = None) -> int:
        """Dead-lettered events of `tenant` back to the queue, with fresh retries and a fresh age."""
        moved = 0
        for event in list(self.events.values()):
            if event.tenant != tenant or event.state != DLQ:
                continue
            if event_ids is not None and event.event_id not in event_ids:
                continue
            event.state, event.attempts, event.accepted_at, event.settled_at = QUEUED, 0, now, None
            event.visible_at = now
            self._push(event)
            moved += 1
        return moved

    # --- reads ---------------------------------------------------------------------------------------------------

    def visible(self, now: float) -> bool:
        """Whether a take now could find anything (read locally by pollers before they commit a take)."""
        while self._ready:
            visible_at, _, event_id = self._ready[0]
            event = self.events.get(event_id)
            if event is None or event.visible_at != visible_at or event.state not in (QUEUED, INFLIGHT):
                heapq.heappop(self._ready)  # stale; dropping it changes nothing a replica decides on
                continue
            return visible_at <= now
        return False

    def get(self, tenant: str, event_id: str) -> dict[str, Any] | None:
        event = self.events.get(event_id)
        return event.view() if event is not None and event.tenant == tenant else None

    def list(self, tenant: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        found = [e for e in self.events.values() if e.tenant == tenant and (state is None or e.state == state)]
        found.sort(key=lambda e: e.accepted_at, reverse=True)
        return [e.view() for e in found[:limit]]

    def counts(self, tenant: str | None = None) -> dict[str, int]:
        out = {QUEUED: 0, INFLIGHT: 0, DONE: 0, DLQ: 0}
        for e in self.events.values():
            if tenant is None or e.tenant == tenant:
                out[e.state] += 1
        return out

    # --- internals -----------------------------------------------------------------------------------------------

    def _push(self, event: Event) -> None:
        self._seq += 1
        heapq.heappush(self._ready, (event.visible_at, self._seq, event.event_id))

    def _retry(self, event: Event, now: float, delay_s: float) -> None:
        if now + delay_s - event.accepted_at > event.max_age_s:
            self._dead(event, now, {"errorType": "EventAgeExceeded",
                                    "errorMessage": f"the event would be older than {event.max_age_s:.0f}s "
                                                    f"at its next try; last error: {event.last_error}"})
            return
        event.state, event.owner = QUEUED, ""
        event.visible_at = now + delay_s
        self._push(event)

    def _dead(self, event: Event, now: float, error: dict[str, Any] | None) -> None:
        event.state, event.settled_at, event.owner = DLQ, now, ""
        event.last_error = error

    def _collect(self, now: float) -> None:
        """Forget done events past their retention, oldest first (amortised O(1) per accept). Under pressure
        finished events go sooner; unfinished ones never."""
        pressure = len(self.events) >= MAX_EVENTS // 2
        while self._finished and (pressure or now - self._finished[0][0] > DONE_RETENTION_S):
            _, event_id = self._finished.popleft()
            event = self.events.get(event_id)
            if event is not None and event.state == DONE:
                del self.events[event_id]
            pressure = len(self.events) >= MAX_EVENTS // 2
