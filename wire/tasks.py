"""Background work that is fired and not awaited: kept referenced, and its failure logged, never lost.

asyncio keeps only a weak reference to a task, so a task nobody holds can vanish mid-run, and an exception in
one nobody awaits is reported (if at all) when it is garbage collected. Every such task in Flint goes through
`Background.spawn`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("wire.tasks")


class Background:
    def __init__(self, owner: str):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task.failed", owner=self.owner, task=task.get_name(), error_type=type(exc).__name__,
                      error=str(exc), exc_info=exc)

    async def wait(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the tasks running now to end; returns how many had not."""
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        return len(still)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)
