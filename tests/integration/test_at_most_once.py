"""A sync invoke runs at most once per call, even when the client loses its frontend mid-invoke and retries."""

from __future__ import annotations

import threading

import pytest

from flint import Client
from flint.client import ClientConfig
from frontend.state import rendezvous_order
from tests.conftest import dump_logs, start_region
from tests.support.cluster import executions
from tests.support.wait import wait_until
from wire.errors import FlintError
from wire.keys import KeyPair

pytestmark = pytest.mark.slow

SLOW = 'import time\n\ndef handle(event, context):\n    time.sleep(1.5)\n    return "done"\n'


def test_a_retry_after_the_frontend_died_mid_invoke_does_not_run_the_function_again(tmp_path):
    region = start_region(tmp_path, settings={"record_executions": True})
    try:
        cfg = ClientConfig.load(region.root)
        with Client.from_region(region.root) as admin:
            code = tmp_path / "slow"
            code.mkdir()
            (code / "handler.py").write_text(SLOW)
            created = admin.create_function("slow", code=code, handler="handler.handle", timeout_s=5)
        key = "default/slow/$LATEST"  # tenant/name/version: what routes a function to its manager
        manager_node = rendezvous_order(key, [n["node_id"] for n in region.nodes()])[0]
        victim = next(n for n in region.nodes() if n["node_id"] != manager_node)  # its frontend, not the manager
        first = region.config(victim["node_id"]).endpoint("frontend")
        endpoints = [first] + [e for e in cfg.endpoints if e != first]

        outcome: dict = {}

        def call() -> None:
            with Client(endpoints, server_key=cfg.server_key, key=KeyPair.load(cfg.key_file), retries=2) as c:
                try:
                    outcome["result"] = c.invoke("slow", {}).json()
                except FlintError as err:
                    outcome["error"] = err

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: executions(region), 10, until=lambda ex: any(e.function == "slow" for e in ex),
                   what="the function to start, through the victim's frontend")
        region.kill_node(victim["node_id"])
        caller.join(20)
        # the client retried through another frontend with the same request id; the function's manager had
        # already started it once, so it refused rather than run it a second time
        assert "result" not in outcome, "the function ran a second time for one call"
        assert len([e for e in executions(region) if e.function == "slow"]) == 1, "a worker started it twice"
        err = outcome["error"]
        assert err.type_name == "ServiceException" and err.reason == "AlreadyStarted" and not err.retryable
        assert "may have run" in err.message
        with Client.from_region(region.root) as c:  # a new call runs as usual
            assert c.invoke("slow", {}).json() == "done"
    except Exception:
        dump_logs(region)
        raise
    finally:
        region.down()
