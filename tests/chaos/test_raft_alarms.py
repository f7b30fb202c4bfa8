"""No false alarm from Raft: sync and async invokes run while the counting and control leaders are paused and
killed, over and over. Leader changes and re-sent entries are ordinary; no node may log CRITICAL (pysyncobj's
"truncating already-applied log entries ... may have diverged" was such a false alarm), and the counting and
control replicas still agree afterwards."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Self

import pytest

from flint import Client
from tests.conftest import dump_logs, start_region
from tests.support.cluster import leader_of
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import FlintError

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

NODES = ["n1", "n2", "n3"]
QUICK = "import time\n\ndef handle(event, context):\n    time.sleep(0.002)\n    return event['n']\n"
SETTINGS = {"event_retry_backoff_s": 0.2}
# what happens to which group's leader, one after the other
STORM = [("counting", "pause"), ("control", "pause"), ("counting", "kill"), ("control", "pause"),
         ("counting", "pause"), ("control", "kill")]


class Load:
    """Sync invokes and async events (half of them of 100 KB) from a few threads, with client retries, until
    stopped."""

    def __init__(self, region, sync_callers: int = 4, async_callers: int = 2):
        self.region = region
        self.outcomes: Counter = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._caller, args=("RequestResponse",), daemon=True)
                        for _ in range(sync_callers)]
        self.threads += [threading.Thread(target=self._caller, args=("Event",), daemon=True)
                         for _ in range(async_callers)]

    def _caller(self, kind: str) -> None:
        with Client.from_region(self.region.root, timeout_s=3.0, retries=2) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                # every other event over pysyncobj's 64 KiB batch: its log entry is sent in pieces
                payload = {"n": n, "pad": "x" * (100_000 if kind == "Event" and n % 2 else 0)}
                try:
                    client.invoke("quick", payload, invocation_type=kind)
                    outcome = f"{kind}:ok"
                except FlintError as err:
                    outcome = f"{kind}:{err.type_name}"
                with self.lock:
                    self.outcomes[outcome] += 1

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def criticals(region) -> dict[str, list[str]]:
    out = {}
    for node in NODES:
        lines = (region.config(node).data_dir / "node.log").read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        out[node] = [e["event"] for e in events if e.get("level") == "critical"]
    return out


def counting_digests(region) -> dict[str, tuple[str, int | None]]:
    digests = {}
    for node in NODES:
        try:
            s = region.call("counting", m.CountingStatus(tenant="default"), node=node, timeout_s=1.0)
            digests[node] = (s.digest, s.raft.commit_idx)
        except FlintError:
            pass
    return digests


def replicas(region, group: str) -> dict[str, tuple[int | None, int]]:
    """Per node: its replica's commit index and the commands its state machine applied (part of its state)."""
    out = {}
    for node in NODES:
        try:
            raft = region.call("admin", m.NodeStatus(), node=node, timeout_s=1.0).raft[group]
            out[node] = (raft.commit_idx, raft.applied)
        except FlintError:
            pass
    return out


def test_leader_changes_under_load_raise_no_critical_and_the_replicas_agree(tmp_path, report):
    region = start_region(tmp_path, nodes=3, azs=3, settings=SETTINGS)
    try:
        code = tmp_path / "quick"
        code.mkdir()
        (code / "handler.py").write_text(QUICK)
        with Client.from_region(region.root) as client:
            client.create_function("quick", code=code, handler="handler.handle")
        with Load(region) as load:
            time.sleep(2)
            for group, fault in STORM:
                leader = wait_until(lambda g=group: leader_of(region, g), 10, what=f"a {group} leader")
                if fault == "pause":
                    region.pause_node(leader)
                    time.sleep(1.0)  # several election timeouts: another replica leads meanwhile
                    region.resume_node(leader)
                else:
                    region.kill_node(leader)
                    time.sleep(0.5)
                    region.start_node(leader)
                    region.wait_healthy(30)
                time.sleep(2.0)  # the old leader catches up under load: entries re-sent, logs reconciled
        report(f"invokes during the storm: {dict(load.outcomes)}")
        assert load.outcomes["RequestResponse:ok"] and load.outcomes["Event:ok"], load.outcomes

        agreed = wait_until(lambda: counting_digests(region), 20, what="the counting replicas to agree",
                            until=lambda d: len(d) == 3 and len(set(d.values())) == 1)
        report(f"counting replicas: {agreed}")
        agreed = wait_until(lambda: replicas(region, "control"), 20, what="the control replicas to agree",
                            until=lambda d: len(d) == 3 and len(set(d.values())) == 1)
        report(f"control replicas (commit index, commands applied): {agreed}")
        found = criticals(region)
        report(f"CRITICAL lines per node: { {n: len(c) for n, c in found.items()} }")
        assert not any(found.values()), found
    except Exception:
        dump_logs(region, 15)
        raise
    finally:
        region.down()
