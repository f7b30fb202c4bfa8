"""Out of worker capacity, as a tenant meets it on a real region: a throttle at once, never a function error,
and never more sandboxes than the hosts hold; capacity taken back from a host lets what runs there finish."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flint import Client
from tests.conftest import start_region
from tests.support.cluster import executions
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import FlintError, Reason, TooManyRequestsException

pytestmark = pytest.mark.slow

SLEEPY = "import time\n\ndef handle(event, context):\n    time.sleep(event.get('s', 1.5))\n    return 'slept'\n"


def code(tmp: Path) -> Path:
    d = tmp / "sleepy"
    d.mkdir(exist_ok=True)
    (d / "handler.py").write_text(SLEEPY)
    return d


def invoke_in_background(region, seconds: float) -> tuple[threading.Thread, dict]:
    """One sleepy invoke on its own thread; what it got lands in the dict ("result" or "error")."""
    outcome: dict = {}

    def invoke() -> None:
        with Client.from_region(region.root, retries=0) as c:
            try:
                outcome["result"] = c.invoke("sleepy", {"s": seconds})
            except FlintError as err:
                outcome["error"] = err

    caller = threading.Thread(target=invoke)
    caller.start()
    return caller, outcome


def busy_sandbox(region) -> tuple[str, str] | None:
    """(node, sandbox id) of a sandbox running an invoke, if one is."""
    for n in region.nodes():
        for s in region.call("worker", m.ListSandboxes(), node=n["node_id"]).sandboxes:
            if s.state == "busy":
                return n["node_id"], s.sandbox_id
    return None


def peak_concurrency(region) -> int:
    changes = []
    for e in executions(region):
        changes += [(e.started, 1), (e.ended if e.ended is not None else float("inf"), -1)]
    running = peak = 0
    for _, step in sorted(changes):
        running += step
        peak = max(peak, running)
    return peak


def test_no_capacity_is_a_throttle_with_a_reason_never_a_function_error_and_the_cap_holds(tmp_path, report):
    # 3 hosts of 2 sandboxes each: room for 6 at once
    region = start_region(tmp_path, settings={"max_sandboxes": 2, "sandbox_pool": 2, "record_executions": True,
                                              "keep_alive_s": 600})
    try:
        with Client.from_region(region.root) as c:
            c.create_function("sleepy", code=code(tmp_path), handler="handler.handle", timeout_s=10)

        def invoke(_: int) -> tuple[str, float]:
            with Client.from_region(region.root, retries=0) as c:
                began = time.monotonic()
                try:
                    result = c.invoke("sleepy", {"s": 2.0})
                    return ("function error" if result.function_error else "ok"), time.monotonic() - began
                except FlintError as err:
                    return f"{err.type_name}:{err.reason}", time.monotonic() - began

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(invoke, range(16)))
        kinds = sorted({kind for kind, _ in outcomes})
        refused = sorted(round(s, 3) for kind, s in outcomes if kind != "ok")
        report(f"outcomes {kinds}; refusals took {refused[:3]}...{refused[-3:]} s")
        assert set(kinds) <= {"ok", f"TooManyRequestsException:{Reason.NO_CAPACITY}"}, outcomes
        assert "ok" in kinds and len(refused) >= 10  # the rest were told at once that there is no room
        assert peak_concurrency(region) <= 6
    finally:
        region.down()


def test_a_revoked_worker_lease_lets_the_invoke_running_there_finish(tmp_path):
    region = start_region(tmp_path, settings={"keep_alive_s": 600})
    try:
        with Client.from_region(region.root) as c:
            c.create_function("sleepy", code=code(tmp_path), handler="handler.handle", timeout_s=10)
        caller, outcome = invoke_in_background(region, 3.0)
        host, _ = wait_until(lambda: busy_sandbox(region), 15, what="the invoke to run on a host")
        for _ in range(3):  # three system errors make the host suspect: placement takes its leases back
            region.call("placement", m.ReportOutcome(node_id=host, ok=False))
        leased = wait_until(lambda: region.call("placement", m.ListWorkerLeases()).leases, 5,
                            until=lambda leases: all(lease.node_id != host for lease in leases),
                            what="placement to revoke the host's leases")
        assert all(lease.node_id != host for lease in leased)
        caller.join(20)
        assert "error" not in outcome, f"the revoke cut a running invoke off: {outcome.get('error')}"
        assert outcome["result"].function_error is None and outcome["result"].json() == "slept"
    finally:
        region.down()


def test_a_sandbox_the_platform_destroys_mid_invoke_is_the_platforms_error_not_the_functions(tmp_path):
    region = start_region(tmp_path, settings={"keep_alive_s": 600})
    try:
        with Client.from_region(region.root) as c:
            c.create_function("sleepy", code=code(tmp_path), handler="handler.handle", timeout_s=10)
        caller, outcome = invoke_in_background(region, 5.0)
        node, sandbox_id = wait_until(lambda: busy_sandbox(region), 15, what="the invoke to run in a sandbox")
        region.call("worker", m.DestroySandbox(sandbox_id=sandbox_id), node=node)
        caller.join(20)
        assert "result" not in outcome, f"a platform kill came back as the function's: {outcome.get('result')}"
        err = outcome["error"]
        assert err.type_name == "ServiceException" and err.reason == Reason.SANDBOX_RECLAIMED
        assert not isinstance(err, TooManyRequestsException)
    finally:
        region.down()
