"""No accepted event is lost: 2,000 async invokes accepted while a frontend node (with its poller) and then the
`control` Raft leader (which holds the queue) are SIGKILLed. Every event that got its 202 ends up executed at
least once or in the dead-letter queue; the workers' execution records say how many ran more than once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from flint import Client
from tests.conftest import dump_logs, start_region
from tests.support.cluster import executions, leader_of
from wire.errors import FlintError

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

EVENTS = 2000
SENDERS = 4
SETTINGS = {"record_executions": True, "event_visibility_s": 4, "event_retry_backoff_s": 0.2}
QUICK = "import time\n\ndef handle(event, context):\n    time.sleep(0.005)\n    return event['n']\n"


def test_every_accepted_event_runs_or_is_dead_lettered_through_frontend_and_leader_loss(tmp_path, report):
    region = start_region(tmp_path, nodes=5, azs=3, settings=SETTINGS)
    accepted: list[str] = []
    refused: Counter = Counter()
    lock = threading.Lock()
    sent = [0]
    try:
        code = tmp_path / "quick"
        code.mkdir()
        (code / "handler.py").write_text(QUICK)
        with Client.from_region(region.root) as client:
            client.create_function("quick", code=code, handler="handler.handle")

        def sender(k: int) -> None:
            with Client.from_region(region.root, timeout_s=10.0, retries=3) as c:
                for i in range(EVENTS // SENDERS):
                    try:
                        result = c.invoke("quick", {"n": k * 100_000 + i}, invocation_type="Event")
                        assert result.status_code == 202
                        with lock:
                            accepted.append(result.request_id)
                    except FlintError as err:
                        with lock:
                            refused[f"{err.type_name}:{err.reason}"] += 1
                    with lock:
                        sent[0] += 1

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
        for t in threads:
            t.start()
        while sent[0] < EVENTS // 4:
            time.sleep(0.05)
        region.kill_node("n4")  # a frontend node, its poller mid-delivery
        while sent[0] < EVENTS // 2:
            time.sleep(0.05)
        leader = leader_of(region, "control")
        assert leader is not None
        region.kill_node(leader)  # the leader of the group that holds the queue
        for t in threads:
            t.join(300)
        region.start_node("n4")
        region.start_node(leader)
        region.wait_healthy(60)

        with Client.from_region(region.root) as client:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                counts = client.list_events(limit=1)["counts"]
                if counts["queued"] == 0 and counts["inflight"] == 0:
                    break
                time.sleep(0.5)
            assert counts["queued"] == 0 and counts["inflight"] == 0, counts
            events = {e["event_id"]: e for e in client.list_events(limit=10_000)["events"]}

        assert len(accepted) >= EVENTS * 0.9, f"only {len(accepted)} accepted; refused {dict(refused)}"
        assert len(set(accepted)) == len(accepted)
        missing = [e for e in accepted if e not in events]
        assert not missing, f"{len(missing)} accepted events are not in the queue at all"
        states = Counter(events[e]["state"] for e in accepted)
        assert set(states) <= {"done", "dlq"}, states
        ran = Counter(e.request_id for e in executions(region))  # how many times each request id started
        never_ran = [e for e in accepted if events[e]["state"] == "done" and ran[e] == 0]
        assert not never_ran, f"{len(never_ran)} events marked done never started on a worker"
        more_than_once = sum(1 for e in accepted if ran[e] > 1)
        report(f"accepted {len(accepted)} of {EVENTS}; refused {dict(refused)}; states {dict(states)}; "
               f"executed more than once: {more_than_once}")
    except Exception:
        dump_logs(region, 15)
        raise
    finally:
        region.down()
