"""Waiting for a state that arrives asynchronously: poll it, return it as soon as it holds, and fail saying what
was awaited and what was last seen, instead of sleeping a guessed time and then asserting."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout_s: float, *, what: str, until: Callable[[T], Any] = bool,
               interval_s: float = 0.05, ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """Call `probe` every `interval_s` until `until(value)` holds (by default: the value is truthy), and return
    that value. After `timeout_s`, fail with AssertionError naming `what` was awaited and the last value seen.
    An exception of a type in `ignoring` counts as not yet (and is the last value seen); any other propagates."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last: Any = probe()
        except ignoring as err:
            last = err
        else:
            if until(last):
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, last))
        time.sleep(interval_s)


async def wait_until_async(probe: Callable[[], T | Awaitable[T]], timeout_s: float, *, what: str,
                           until: Callable[[T], Any] = bool, interval_s: float = 0.05,
                           ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """wait_until for code on an event loop: it sleeps without blocking the loop, and `probe` may be a coroutine
    function."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last: Any = probe()
            if asyncio.iscoroutine(last):
                last = await last
        except ignoring as err:
            last = err
        else:
            if until(last):
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, last))
        await asyncio.sleep(interval_s)


def _timed_out(what: str, timeout_s: float, last: Any) -> str:
    shown = repr(last)
    if len(shown) > 2000:
        shown = shown[:2000] + "..."
    return f"timed out after {timeout_s:g}s waiting for {what}; last seen: {shown}"
