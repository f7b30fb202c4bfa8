"""Request ids and the wall-clock milliseconds that deadlines on the wire are written in."""

from __future__ import annotations

import itertools
import os
import time

_ids = itertools.count()
_id_prefix = f"{os.getpid():x}-{int(time.time() * 1000) & 0xFFFFFF:x}"


def new_request_id() -> str:
    """Unique per process and run; also the idempotency key of whatever the request causes."""
    return f"{_id_prefix}-{next(_ids):x}"


def now_ms() -> int:
    return int(time.time() * 1000)
