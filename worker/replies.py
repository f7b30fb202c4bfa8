"""What a sandbox may answer on its control channel, checked before the worker believes any of it.

A sandbox runs tenant code, and that code can write on its channel as well as the runtime can (the frames are
documented in worker/bootstrap.py). So every message the worker reads from a sandbox (worker/sandbox.py) goes
through `init_reply` or `invoke_reply` here: what is exactly a reply the runtime sends comes back as plain,
bounded values the worker can always carry to the frontend (`wire.messages.RunResult`); anything else raises
`InvalidResponse`, which is that invoke's function error (`Unhandled`, errorType `Runtime.InvalidResponse`, as
Lambda names a runtime's malformed response) and retires the sandbox: what it sends after is never read as
another invoke's reply. No I/O here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from wire.messages import SYNC_PAYLOAD_MAX_BYTES

FRAME_MAX_BYTES = 16 * 1024 * 1024  # no reply the runtime sends is longer (a 6 MB result and its log tail)
LOG_TAIL_CHARS = 4096  # the runtime sends at most the last 4 KB of its log
ERROR_TYPE_MAX_CHARS = 256
ERROR_MESSAGE_MAX_CHARS = 128 * 1024  # with the stack's bounds: under 4 MB of JSON even all escaped
STACK_TRACE_MAX_LINES = 50
STACK_LINE_MAX_CHARS = 4096


class InvalidResponse(Exception):
    """A reply no runtime of ours sends: the message says what was wrong with it, for the tenant to read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One invoke's answer, as the worker passes it on."""

    payload: bytes  # the result's JSON, or the error's (a JSON map of errorType, errorMessage, stackTrace)
    function_error: bool  # True: the handler or the runtime failed (Lambda's "Unhandled")
    log: str | None = None  # the tail of the sandbox log, when asked for
    retire: bool = False  # the runtime asks not to be used again (it ran out of memory)


def invoke_reply(msg: Any) -> Reply:
    """An invoke's reply: {"t": "result", "payload"} or {"t": "error", "error"}, each with "log" if asked for
    and "retire" if the runtime wants no more invokes."""
    fields = _map(msg)
    log = fields.get("log")
    if log is not None and not isinstance(log, str):
        raise InvalidResponse(f"its log tail is {type(log).__name__}, not text")
    retire = fields.get("retire", False)
    if not isinstance(retire, bool):
        raise InvalidResponse(f"its retire flag is {type(retire).__name__}, not true or false")
    log = log[-LOG_TAIL_CHARS:] if log is not None else None
    kind = fields.get("t")
    if kind == "result":
        payload = fields.get("payload")
        if payload is None or payload == b"":
            payload = b"null"
        if not isinstance(payload, bytes):
            raise InvalidResponse(f"its result is {type(payload).__name__}, not bytes of JSON")
        if len(payload) > SYNC_PAYLOAD_MAX_BYTES:
            raise InvalidResponse(f"its result of {len(payload)} bytes is over the {SYNC_PAYLOAD_MAX_BYTES}-byte "
                                  "limit of a response")
        return Reply(payload, False, log, retire)
    if kind == "error":
        return Reply(error_json(error_map(fields.get("error"))), True, log, retire)
    raise InvalidResponse(f"it answered {str(kind)[:40]!r} where a result or an error belongs")


def init_reply(msg: Any) -> dict[str, Any] | None:
    """The runtime's first message: {"t": "ready"} (None here) or {"t": "init_error", "error"} (its error
    map)."""
    fields = _map(msg)
    kind = fields.get("t")
    if kind == "ready":
        return None
    if kind == "init_error":
        return error_map(fields.get("error"))
    raise InvalidResponse(f"it answered {str(kind)[:40]!r} where ready or an init error belongs")


def error_map(error: Any) -> dict[str, Any]:
    """A function error as Lambda shapes it: errorType and errorMessage (text), stackTrace (lines of text) if
    given; anything longer than a tenant could use is cut, so the error always fits a response."""
    if not isinstance(error, dict):
        raise InvalidResponse(f"its error is {type(error).__name__}, not a map")
    error_type, message = error.get("errorType"), error.get("errorMessage", "")
    if not isinstance(error_type, str) or not isinstance(message, str):
        raise InvalidResponse("its error's errorType and errorMessage must be text")
    out: dict[str, Any] = {"errorType": error_type[:ERROR_TYPE_MAX_CHARS] or "Unhandled",
                           "errorMessage": _cut(message, ERROR_MESSAGE_MAX_CHARS)}
    stack = error.get("stackTrace")
    if stack is not None:
        if not isinstance(stack, list) or not all(isinstance(line, str) for line in stack):
            raise InvalidResponse("its error's stackTrace must be a list of text")
        out["stackTrace"] = [_cut(line, STACK_LINE_MAX_CHARS) for line in stack[-STACK_TRACE_MAX_LINES:]]
    return out


def invalid_response(request_id: str, why: str) -> dict[str, Any]:
    """The function error for a reply that failed these checks."""
    return {"errorType": "Runtime.InvalidResponse",
            "errorMessage": f"RequestId: {request_id} Error: the runtime's response could not be used: {why}"}


def error_json(error: dict[str, Any]) -> bytes:
    return json.dumps(error).encode()


def frame_length(n: int) -> int:
    if n > FRAME_MAX_BYTES:
        raise InvalidResponse(f"it announced a frame of {n} bytes, over the {FRAME_MAX_BYTES}-byte limit")
    return n


def _map(msg: Any) -> dict[Any, Any]:
    if not isinstance(msg, dict):
        raise InvalidResponse(f"it sent {type(msg).__name__} where a map belongs")
    return msg


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} characters cut)"
