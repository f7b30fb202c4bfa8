"""Request ids, the ids derived from them, and the wall-clock milliseconds that deadlines on the wire are written in.

A request id is random (uuid4): nobody can guess another caller's and send it first. It is also the idempotency
key of what the request causes, so whatever a caller's request id names at a shared service (a replicated
command, an execution, an event) is `scoped_id(caller, operation, request id)`: the same for every retry of that
request, never the same for two callers or two kinds of operation.
"""

from __future__ import annotations

import hashlib
import time
import uuid


def new_request_id() -> str:
    return uuid.uuid4().hex


def scoped_id(*parts: str) -> str:
    """32 hex digits naming what one caller's one request causes."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def now_ms() -> int:
    return int(time.time() * 1000)
