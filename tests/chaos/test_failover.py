"""A healthy host for every invoke, on real processes: steady sync invokes while a worker host, the function's
worker manager and then a whole AZ are SIGKILLed. Every invoke either succeeds or gets a clear, Lambda-named
error; after each recovery, every invoke succeeds. (How fast is benchmarks/failover.py's question.)"""

from __future__ import annotations

import time

import pytest

from flint import Client
from tests.conftest import ROOT, dump_logs, start_region
from tests.support.load import SteadyLoad, function_owner

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

SETTINGS = {"keep_alive_s": 600, "orphan_grace_s": 5}
CLEAR = ("ServiceException", "TooManyRequestsException")


def after_recovery_all_succeed(load: SteadyLoad, broke_at: float, what: str, report, window_s: float = 3.0) -> None:
    load.wait_steady(broke_at, successes=30, timeout_s=20)
    first, steady = load.recovery(broke_at)
    assert first is not None, f"no invoke succeeded after the failure: {load.errors(broke_at, time.monotonic())}"
    assert steady is not None, "invokes kept failing after the failure"
    settle = time.monotonic()
    time.sleep(window_s)
    later = [o for o in load.since(settle)]
    assert later and all(o.ok for o in later), load.errors(settle, time.monotonic())
    report(f"{what}: first success {first:.2f}s, steady {steady:.2f}s after the failure; errors in between: "
           f"{dict(load.errors(broke_at, broke_at + steady))}")


def test_invokes_find_a_healthy_host_through_worker_manager_and_az_loss(tmp_path, report):
    region = start_region(tmp_path, nodes=6, azs=3, settings=SETTINGS)
    load = None
    try:
        with Client.from_region(region.root) as client:
            client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
            key = "default/hello/$LATEST"  # tenant/name/version: what routes a function to its manager
        load = SteadyLoad(region.root, "hello", callers=4).start()
        time.sleep(3.0)
        assert sum(o.ok for o in load.outcomes) > 20

        # 1. a worker host that runs some of the function's sandboxes, and is not its manager
        owner = function_owner(key, [n["node_id"] for n in region.nodes()])
        hosts = sorted(r["node"] for r in region.status() if r["sandboxes"] and r["node"] != owner)
        assert hosts, "the function's sandboxes should run beside its manager's host too (AZ spread)"
        victim = hosts[-1]
        print(f"sandboxes on {hosts}, manager {owner}: killing {victim}")
        broke_at = time.monotonic()
        region.kill_node(victim)
        after_recovery_all_succeed(load, broke_at, f"worker host {victim} killed", report)
        region.start_node(victim)
        region.wait_healthy(30)

        # 2. the function's worker manager
        owner = function_owner(key, [n["node_id"] for n in region.nodes()])
        broke_at = time.monotonic()
        region.kill_node(owner)
        after_recovery_all_succeed(load, broke_at, f"manager {owner} killed", report)
        region.start_node(owner)
        region.wait_healthy(30)

        # 3. a whole AZ: a control replica (every Raft group keeps its quorum), a frontend, a manager, workers
        broke_at = time.monotonic()
        killed = region.kill_az("az2")
        assert len(killed) == 2
        after_recovery_all_succeed(load, broke_at, "az2 killed", report)

        load.stop()
        assert not load.unclear, load.unclear  # every failure was a Lambda-named error
        failures = [o.error for o in load.outcomes if not o.ok]
        assert all(e.split(":")[0] in CLEAR for e in failures), set(failures)
    except Exception:
        dump_logs(region, 20)
        raise
    finally:
        if load is not None:
            load.stop()
        region.down()
