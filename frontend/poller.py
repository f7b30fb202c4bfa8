"""The async poller on every frontend: takes queued events, runs them through the sync path, settles them.

A take hides events from other pollers for `visibility_s`; a delivery that runs long extends it, and one whose
poller dies reappears when it passes (so delivery is at least once). Outcomes are settled in batches. The
event's id is the invoke's request id, so the handler sees it as `context.aws_request_id` and can deduplicate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from registry.client import RegistryClient
from wire import messages as m
from wire.errors import FlintError, ResourceNotFoundException, TooManyRequestsException, error_fields
from wire.ids import new_request_id
from wire.messages import SettleOutcome
from wire.tasks import Background

log = structlog.get_logger("frontend.poller")

FLUSH_S = 0.02
IDLE_MAX_S = 0.2
SETTLE_BATCH = 500
VISIBLE_TIMEOUT_S = 2.0

Deliver = Callable[[m.EventView], Awaitable[m.InvokeResult]]


class Poller:
    def __init__(self, name: str, registry: RegistryClient, deliver: Deliver, wake: asyncio.Event, *,
                 concurrency: int, visibility_s: float):
        self.name = name
        self.registry = registry
        self.deliver = deliver  # runs one event through the sync invoke path
        self.wake = wake  # set when there may be something to take at once (this node just accepted an event)
        self.concurrency = concurrency
        self.visibility_s = visibility_s
        self.inflight: dict[str, float] = {}  # event id -> when its delivery began (monotonic)
        self.extended: dict[str, float] = {}
        self.outbox: list[m.Settlement] = []
        self.delivered = 0
        self._background = Background("poller")

    async def run(self) -> None:
        self._background.spawn(self._flush_loop(), name="event-settle")
        idle = FLUSH_S
        try:
            while True:
                free = self.concurrency - len(self.inflight)
                if free <= 0:
                    await self._sleep(IDLE_MAX_S)
                    continue
                taken = await self._take(free)
                if not taken:
                    await self._sleep(idle)
                    idle = min(IDLE_MAX_S, idle * 2)
                    continue
                idle = FLUSH_S
                for event in taken:
                    self.inflight[event.event_id] = time.monotonic()
                    self._background.spawn(self._deliver(event), name="event-delivery")
        finally:
            self._background.cancel()

    async def _take(self, limit: int) -> tuple[m.EventView, ...]:
        try:
            if not (await self.registry.command(m.EventsVisible(), timeout_s=VISIBLE_TIMEOUT_S)).visible:
                return ()
            taken = await self.registry.command(
                m.EventsTake(poller=self.name, limit=limit, visibility_s=self.visibility_s),
                request_id=new_request_id(),
            )
            return taken.events
        except FlintError as err:
            log.warning("poller.take_failed", **error_fields(err))
            return ()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self.wake.clear()

    async def _deliver(self, event: m.EventView) -> None:
        event_id = event.event_id
        outcome = m.Settlement(event_id=event_id, outcome=SettleOutcome.OK)
        structlog.contextvars.bind_contextvars(event_id=event_id, function=event.function)
        try:
            result = await self.deliver(event)
            if result.function_error:
                outcome = m.Settlement(event_id=event_id, outcome=SettleOutcome.FUNCTION_ERROR,
                                       error=_error(result.payload))
            else:
                self.delivered += 1
        except TooManyRequestsException as err:
            outcome = m.Settlement(event_id=event_id, outcome=SettleOutcome.THROTTLED, error=err.to_wire())
        except ResourceNotFoundException as err:  # the function or its alias is gone: no retry can help
            outcome = m.Settlement(event_id=event_id, outcome=SettleOutcome.FATAL, error=err.to_wire())
        except FlintError as err:
            outcome = m.Settlement(event_id=event_id, outcome=SettleOutcome.SYSTEM_ERROR, error=err.to_wire())
        finally:
            self.inflight.pop(event_id, None)
            self.extended.pop(event_id, None)
            self.outbox.append(outcome)
            self.wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            now = time.monotonic()
            for event_id, began in self.inflight.items():  # long deliveries keep their events hidden
                if now - self.extended.get(event_id, began) > self.visibility_s / 2:
                    self.extended[event_id] = now
                    self.outbox.append(m.Settlement(event_id=event_id, outcome=SettleOutcome.EXTEND,
                                                    visibility_s=self.visibility_s))
            if not self.outbox:
                continue
            batch, self.outbox = self.outbox[:SETTLE_BATCH], self.outbox[SETTLE_BATCH:]
            try:
                await self.registry.command(m.EventsSettle(poller=self.name, outcomes=tuple(batch)),
                                            request_id=new_request_id())
            except FlintError as err:
                log.warning("poller.settle_failed", outcomes=len(batch), **error_fields(err))
                self.outbox = batch + self.outbox  # try again; a lost settle only means a redelivery


def _error(payload: bytes | None) -> dict[str, Any]:
    try:
        error = json.loads(payload or b"{}")
        return error if isinstance(error, dict) else {"errorMessage": str(error)}
    except ValueError:
        return {"errorMessage": (payload or b"")[:500].decode(errors="replace")}
