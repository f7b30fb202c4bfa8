"""Waiting for a state that arrives asynchronously: poll it, return it as soon as it holds, and fail saying what
was awaited and what was last seen, instead of sleeping a guessed time and then asserting."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, *, interval_s: float = 0.05, what: str,
               ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """Call `predicate` every `interval_s` until it returns something truthy, and return that. After `timeout_s`
    fail with AssertionError naming `what` was awaited and the last value seen. An exception of a type in
    `ignoring` counts as a falsy answer (and is the last value seen); any other propagates at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last: Any = predicate()
        except ignoring as err:
            last = err
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, last))
        time.sleep(interval_s)


async def wait_until_async(predicate: Callable[[], T | Awaitable[T]], timeout_s: float, *, interval_s: float = 0.05,
                           what: str, ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """wait_until for code on an event loop: sleeps without blocking the loop; `predicate` may be a coroutine
    function."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last: Any = predicate()
            if asyncio.iscoroutine(last):
                last = await last
        except ignoring as err:
            last = err
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, last))
        await asyncio.sleep(interval_s)


def _timed_out(what: str, timeout_s: float, last: Any) -> str:
    shown = repr(last)
    if len(shown) > 2000:
        shown = shown[:2000] + "..."
    return f"timed out after {timeout_s:g}s waiting for {what}; last seen: {shown}"
