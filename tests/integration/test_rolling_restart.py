"""A rolling restart under load, as an operator does one: every node in turn gets SIGTERM, comes back, and the
region serves on. Nothing a client sent runs twice, and a function's reserved concurrency is whole at once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flint import Client
from tests.conftest import dump_logs, start_region
from tests.support.cluster import executions
from wire.errors import FlintError

pytestmark = pytest.mark.slow

WORK = "import time\n\ndef handle(event, context):\n    time.sleep(0.3)\n    return context.aws_request_id\n"


def test_a_rolling_restart_under_load_runs_no_invoke_twice_and_leaves_the_limit_whole(tmp_path, report):
    region = start_region(tmp_path, settings={"record_executions": True, "shutdown_grace_s": 10.0})
    code = tmp_path / "work"
    code.mkdir()
    (code / "handler.py").write_text(WORK)
    outcomes: Counter = Counter()
    stop = threading.Event()

    def caller() -> None:
        with Client.from_region(region.root, timeout_s=20) as c:  # the client's own retries, as users run it
            while not stop.is_set():
                try:
                    c.invoke("work")
                    outcomes["ok"] += 1
                except FlintError as err:
                    outcomes[f"{err.type_name}:{err.reason}"] += 1

    try:
        with Client.from_region(region.root) as c:
            c.create_function("work", code=code, handler="handler.handle", timeout_s=5)
            c.put_function_concurrency("work", 3)
        callers = [threading.Thread(target=caller) for _ in range(3)]
        for t in callers:
            t.start()
        time.sleep(1.0)
        for node in [n["node_id"] for n in region.nodes()]:
            assert region.stop_node(node), f"{node} did not stop within its grace"
            region.start_node(node)
            region.wait_healthy(60)
        stop.set()
        for t in callers:
            t.join(30)
        starts = Counter(e.request_id for e in executions(region))
        twice = {rid: n for rid, n in starts.items() if n > 1}
        report(f"outcomes through a rolling restart of every node: {dict(outcomes)}")
        assert not twice, f"these invokes ran more than once: {twice}"
        assert outcomes["ok"] > 20

        # the leases of the stopped frontends went back with them: the reserved 3 are all there at once
        def one(_: int) -> str:
            with Client.from_region(region.root, retries=0) as c:
                try:
                    return "ok" if c.invoke("work").function_error is None else "function error"
                except FlintError as err:
                    return f"{err.type_name}:{err.reason}"

        with ThreadPoolExecutor(3) as pool:
            after = list(pool.map(one, range(3)))
        assert after == ["ok", "ok", "ok"], after
    except Exception:
        dump_logs(region, 20)
        raise
    finally:
        stop.set()
        region.down()
