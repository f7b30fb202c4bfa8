"""The async poller on every frontend: takes queued events, runs them through the sync path, settles them.

A take hides events from other pollers for `event_visibility_s`; a delivery that runs long extends it, and one
whose poller dies reappears when it passes (so delivery is at least once). Outcomes are settled in batches.
The event's id is the invoke's request id, so the handler sees it as `context.aws_request_id` and can
deduplicate.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import structlog

from wire.errors import FlintError, ResourceNotFoundException, TooManyRequestsException
from wire.sockets import new_request_id

if TYPE_CHECKING:
    from frontend.service import FrontendService

log = structlog.get_logger("frontend.poller")

FLUSH_S = 0.02
IDLE_MAX_S = 0.2


class Poller:
    def __init__(self, frontend: FrontendService, name: str):
        self.fe = frontend
        self.name = name
        settings = frontend.rt.config.settings
        self.concurrency = settings.event_pollers
        self.visibility_s = settings.event_visibility_s
        self.inflight: dict[str, float] = {}  # event id -> when its delivery began (monotonic)
        self.extended: dict[str, float] = {}
        self.outbox: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.delivered = 0

    async def run(self) -> None:
        flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="event-settle")
        idle = FLUSH_S
        try:
            while True:
                free = self.concurrency - len(self.inflight)
                if free <= 0:
                    await self._sleep(IDLE_MAX_S)
                    continue
                try:
                    visible = (await self.fe.registry.events("visible", timeout_s=2.0))["visible"]
                    taken = []
                    if visible:
                        out = await self.fe.registry.events(
                            "take", request_id=new_request_id(), poller=self.name, limit=free,
                            visibility_s=self.visibility_s,
                        )
                        taken = out["result"]
                except FlintError as err:
                    log.warning("poller.take_failed", error=str(err))
                    taken = []
                if not taken:
                    await self._sleep(idle)
                    idle = min(IDLE_MAX_S, idle * 2)
                    continue
                idle = FLUSH_S
                for event in taken:
                    self.inflight[event["event_id"]] = time.monotonic()
                    asyncio.get_running_loop().create_task(self._deliver(event))
        finally:
            flusher.cancel()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self.wake.clear()

    async def _deliver(self, event: dict[str, Any]) -> None:
        event_id = event["event_id"]
        outcome: dict[str, Any] = {"event_id": event_id, "outcome": "ok"}
        structlog.contextvars.bind_contextvars(event_id=event_id, function=event["function"])
        try:
            config = await self.fe.resolve(event["tenant"], event["function"], event["qualifier"])
            reply = await self.fe.run_invoke(event["tenant"], config, event_id, event["payload"] or b"")
            if reply.fields.get("function_error"):
                outcome = {"event_id": event_id, "outcome": "function_error", "error": _error(reply.payload)}
            else:
                self.delivered += 1
        except TooManyRequestsException as err:
            outcome = {"event_id": event_id, "outcome": "throttled", "error": err.to_wire()}
        except ResourceNotFoundException as err:  # the function or its alias is gone: no retry can help
            outcome = {"event_id": event_id, "outcome": "fatal", "error": err.to_wire()}
        except FlintError as err:
            outcome = {"event_id": event_id, "outcome": "system_error", "error": err.to_wire()}
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
                    self.outbox.append({"event_id": event_id, "outcome": "extend", "visibility_s": self.visibility_s})
            if not self.outbox:
                continue
            batch, self.outbox = self.outbox[:500], self.outbox[500:]
            try:
                await self.fe.registry.events("settle", request_id=new_request_id(), poller=self.name,
                                              outcomes=batch)
            except FlintError as err:
                log.warning("poller.settle_failed", error=str(err), outcomes=len(batch))
                self.outbox = batch + self.outbox  # try again; a lost settle only means a redelivery


def _error(payload: bytes | None) -> dict[str, Any]:
    try:
        error = json.loads(payload or b"{}")
        return error if isinstance(error, dict) else {"errorMessage": str(error)}
    except ValueError:
        return {"errorMessage": (payload or b"")[:500].decode(errors="replace")}
