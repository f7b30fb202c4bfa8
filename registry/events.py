"""The async event queue: every accepted `Event` invoke until it has run, or has run out of tries or age.

No I/O; `now` is the proposer's clock. Replicated in the `control` group (registry.state.ControlState), so an
event is committed to a majority before its 202 goes back, and survives any minority of control nodes. The
frontend's poller (frontend/poller.py) takes and settles events through the registry service.

Delivery is at least once. Pollers take events with a visibility timeout: an event whose poller dies becomes
visible again when the timeout passes and is delivered again. A function error uses one of the event's
retries (0 to 2, default 2) and the next try waits a backoff; a throttle or a system error waits and tries
again without using a retry. An event that runs out of retries, or is older than its maximum age (default 6 h),
goes to the tenant's dead-letter queue with its last error, from where it can be redriven.

What the queue keeps is bounded per tenant (`EventLimits`), so one tenant at its quota never blocks another:
- events not yet run (queued or in flight) take at most `queued_bytes`, each counting its payload and
  EVENT_RECORD_BYTES for its record; an accept or a redrive past it is refused with TooManyRequestsException
  (EventQueueLimitExceeded);
- dead letters take at most `dlq_bytes`: a new one past it pushes the tenant's oldest out (`dlq_dropped`);
- a finished event's payload goes at once (a take's result never carries one either: the registry service
  reads payloads from its replica, so the results the group remembers stay small); its record goes after
  `done_retention_s`, and a dead letter (kept whole, for a redrive) after `dlq_retention_s` (`expire`).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from typing import Any

from wire.config import DEFAULTS, Settings
from wire.errors import Reason, TooManyRequestsException
from wire.messages import EVENT_AGE_S_MAX, RETRIES_MAX, EventState, MiB, SettleOutcome

QUEUED, INFLIGHT, DONE, DLQ = EventState.QUEUED, EventState.INFLIGHT, EventState.DONE, EventState.DLQ
EVENT_RECORD_BYTES = 1024  # what an event's record costs beside its payload; counted against the quotas
MAX_EVENTS = 500_000  # while the queue holds more than half of this, done events go before their retention


@dataclasses.dataclass(frozen=True)
class EventLimits:
    """What the queue keeps of each tenant and for how long. The control leader replicates its settings
    (ControlState.cmd_set_limits), so every replica decides with the same numbers."""

    queued_bytes: int = DEFAULTS.tenant_event_queue_mb * MiB
    dlq_bytes: int = DEFAULTS.tenant_dlq_mb * MiB
    done_retention_s: float = DEFAULTS.event_done_retention_s
    dlq_retention_s: float = DEFAULTS.event_dlq_retention_s
    retry_backoff_s: float = DEFAULTS.event_retry_backoff_s

    @classmethod
    def of(cls, s: Settings) -> EventLimits:
        return cls(queued_bytes=s.tenant_event_queue_mb * MiB, dlq_bytes=s.tenant_dlq_mb * MiB,
                   done_retention_s=s.event_done_retention_s, dlq_retention_s=s.event_dlq_retention_s,
                   retry_backoff_s=s.event_retry_backoff_s)


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
    payload_bytes: int = 0  # as accepted (the payload itself goes when the event is done)

    @property
    def cost(self) -> int:
        return self.payload_bytes + EVENT_RECORD_BYTES

    def view(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "payload"}


class EventQueue:
    def __init__(self, limits: EventLimits = EventLimits(), throttle_backoff_s: float = 0.2):
        self.limits = limits
        self.throttle_backoff_s = throttle_backoff_s
        self.events: dict[str, Event] = {}
        self._ready: list[tuple[float, int, str]] = []  # (visible_at, seq, event id); stale entries skipped
        self._seq = 0
        self._finished: deque[tuple[float, str]] = deque()  # (settled_at, event id) of done events, in order
        # per tenant: what its events not yet run and its dead letters take, and its dead letters oldest first
        self.queued_bytes: dict[str, int] = {}
        self.dlq_bytes: dict[str, int] = {}
        self.dlq_dropped: dict[str, int] = {}
        self._dead_letters: dict[str, dict[str, None]] = {}

    # --- commands ------------------------------------------------------------------------------------------------

    def put(self, now: float, event_id: str, tenant: str, function: str, payload: bytes,
            qualifier: str | None = None, max_retries: int = RETRIES_MAX,
            max_age_s: float = EVENT_AGE_S_MAX) -> dict[str, Any]:
        """Accept an event, unless its tenant's events not yet run would take more than its quota. Idempotent:
        the same id (a client's retry) is the same event."""
        existing = self.events.get(event_id)
        if existing is not None:
            return existing.view()
        self.expire(now)
        self.check_room(tenant, len(payload))
        event = Event(event_id, tenant, function, qualifier, payload, now, max(0, min(RETRIES_MAX, max_retries)),
                      max_age_s, visible_at=now, payload_bytes=len(payload))
        self.events[event_id] = event
        self._book(event, +1)
        self._push(event)
        return event.view()

    def take(self, now: float, poller: str, limit: int, visibility_s: float) -> list[dict[str, Any]]:
        """Up to `limit` visible events for `poller`, hidden from others for `visibility_s` (views without their
        payloads: see `payload`). Events past their maximum age go to the dead-letter queue instead."""
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
            self._move(event, INFLIGHT)
            event.owner = poller
            event.deliveries += 1
            event.visible_at = now + visibility_s
            self._push(event)
            out.append(event.view())
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
                self._move(event, DONE)
                event.settled_at, event.payload = now, b""
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
                    self._retry(event, now, self.limits.retry_backoff_s * 2 ** (event.attempts - 1))
            else:  # throttled or system_error: wait and try again, no retry used (the age still counts)
                event.last_error = o.get("error")
                self._retry(event, now, self.throttle_backoff_s * min(32, 2 ** min(event.deliveries, 5)))
            results.append({"event_id": event.event_id, "state": event.state})
        return results

    def redrive(self, now: float, tenant: str, event_ids: list[str] | None = None) -> int:
        """Dead-lettered events of `tenant` (all, or those named) back to the queue, oldest first, with fresh
        retries and a fresh age: as many as its quota of events not yet run has room for (refused if none)."""
        named = set(event_ids) if event_ids is not None else None
        moved = 0
        for event_id in [e for e in self._dead_letters.get(tenant, {}) if named is None or e in named]:
            event = self.events[event_id]
            try:
                self.check_room(tenant, event.payload_bytes)
            except TooManyRequestsException:
                if moved:
                    break  # the rest stay dead letters: redrive them when these have run
                raise
            self._move(event, QUEUED)
            event.attempts, event.accepted_at, event.settled_at, event.visible_at = 0, now, None, now
            self._push(event)
            moved += 1
        return moved

    def expire(self, now: float) -> int:
        """Forget done events past their retention (sooner, oldest first, while the queue holds more than half
        of MAX_EVENTS) and dead letters past theirs; never an event not yet run. Returns how many went."""
        gone = 0
        while self._finished:
            settled_at, event_id = self._finished[0]
            if now - settled_at <= self.limits.done_retention_s and len(self.events) < MAX_EVENTS // 2:
                break
            self._finished.popleft()
            event = self.events.get(event_id)
            if event is not None and event.state == DONE:
                self._forget(event)
                gone += 1
        for order in list(self._dead_letters.values()):
            while order:
                event = self.events[next(iter(order))]
                if now - _settled(event, now) <= self.limits.dlq_retention_s:
                    break
                self._forget(event)
                gone += 1
        return gone

    # --- reads ---------------------------------------------------------------------------------------------------

    def check_room(self, tenant: str, payload_bytes: int) -> None:
        """Refuse an event of `payload_bytes` that would take `tenant` past its quota of events not yet run (also
        asked by the registry service before an accept is committed, so a refused payload never enters the log)."""
        used, cost = self.queued_bytes.get(tenant, 0), payload_bytes + EVENT_RECORD_BYTES
        quota = self.limits.queued_bytes
        if used + cost > quota:
            raise TooManyRequestsException(
                f"Your async events not yet run take {_size(used)} of your event queue quota of {_size(quota)}; "
                f"this event ({_size(cost)}) does not fit. Retry with backoff once some of them have run (raising "
                "the function's reserved concurrency lets them run sooner), or ask your operator for a larger "
                "quota (tenant_event_queue_mb).",
                reason=Reason.EVENT_QUEUE_FULL,
            )

    def expiring(self, now: float) -> bool:
        """Whether `expire` now would forget anything (read by the control leader before it commits one)."""
        if self._finished and (now - self._finished[0][0] > self.limits.done_retention_s
                               or len(self.events) >= MAX_EVENTS // 2):
            return True
        return any(now - _settled(self.events[next(iter(order))], now) > self.limits.dlq_retention_s
                   for order in self._dead_letters.values())

    def payload(self, event_id: str) -> bytes | None:
        """A taken event's payload; None once it is done or forgotten (then it need not run again)."""
        event = self.events.get(event_id)
        return event.payload if event is not None and event.state != DONE else None

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

    def counts(self, tenant: str) -> dict[str, int]:
        """A tenant's events by state, the bytes its quotas count, and how many dead letters it lost to its quota."""
        out = {QUEUED: 0, INFLIGHT: 0, DONE: 0, DLQ: 0}
        for e in self.events.values():
            if e.tenant == tenant:
                out[e.state] += 1
        return {**out, "queued_bytes": self.queued_bytes.get(tenant, 0), "dlq_bytes": self.dlq_bytes.get(tenant, 0),
                "dlq_dropped": self.dlq_dropped.get(tenant, 0)}

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
        self._move(event, QUEUED)
        event.owner = ""
        event.visible_at = now + delay_s
        self._push(event)

    def _dead(self, event: Event, now: float, error: dict[str, Any] | None) -> None:
        """To the tenant's dead-letter queue (payload kept, for a redrive); past its quota, its oldest go."""
        self._move(event, DLQ)
        event.settled_at, event.owner, event.last_error = now, "", error
        order = self._dead_letters[event.tenant]
        while self.dlq_bytes.get(event.tenant, 0) > self.limits.dlq_bytes and order:
            self._forget(self.events[next(iter(order))])
            _add(self.dlq_dropped, event.tenant, 1)

    def _move(self, event: Event, state: str) -> None:
        self._book(event, -1)
        event.state = state
        self._book(event, +1)

    def _forget(self, event: Event) -> None:
        self._book(event, -1)
        del self.events[event.event_id]

    def _book(self, event: Event, sign: int) -> None:
        """Count (+1) or uncount (-1) an event in its tenant's usage of the quota its state falls under."""
        if event.state in (QUEUED, INFLIGHT):
            _add(self.queued_bytes, event.tenant, sign * event.cost)
        elif event.state == DLQ:
            _add(self.dlq_bytes, event.tenant, sign * event.cost)
            order = self._dead_letters.setdefault(event.tenant, {})
            if sign > 0:
                order[event.event_id] = None
            else:
                order.pop(event.event_id, None)
                if not order:
                    del self._dead_letters[event.tenant]


def _add(book: dict[str, int], tenant: str, delta: int) -> None:
    value = book.get(tenant, 0) + delta
    if value:
        book[tenant] = value
    else:
        book.pop(tenant, None)


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MB" if n >= MiB // 10 else f"{n / 1024:.0f} KB"


def _settled(event: Event, now: float) -> float:
    """When an event was settled (a time of 0 is a time, not "never")."""
    return event.settled_at if event.settled_at is not None else now
