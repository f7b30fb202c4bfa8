"""The Raft log on a real region: compaction cuts each replica's journal file back down, a replica that was away
catches up from a snapshot, and a restart of every node restores functions and events from dump and journal."""

from __future__ import annotations

import pytest

from flint import Client
from tests.conftest import ROOT, dump_logs, start_region
from tests.support.cluster import leader_of
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import FlintError

pytestmark = pytest.mark.slow

MB = 1024 * 1024
COMPACTION_MB = 4
EVENTS = 120  # of ~244 KiB each: about 29 MB through the control group's log, seven times the compaction size
PAYLOAD = {"name": "x" * 250_000}


def raft_files(region, node: str, group: str = "control") -> dict[str, int]:
    """Bytes on disk (allocated blocks, not the apparent size) of each of a replica's Raft files."""
    raft = region.config(node).data_dir / "raft"
    return {p.name: p.stat().st_blocks * 512 for p in raft.glob(f"{group}.*")}


def replica(region, node: str, group: str = "control") -> m.RaftStatus:
    return region.call("admin", m.NodeStatus(), node=node, timeout_s=5).raft[group]


def events_done(client) -> dict:
    return client.list_events(limit=10_000)


@pytest.fixture
def region(tmp_path):
    region = start_region(tmp_path, settings={"raft_compaction_mb": COMPACTION_MB,
                                              "raft_compaction_interval_s": 3600})
    yield region
    region.down()


def test_compaction_shrinks_journals_and_every_node_restarts_with_its_state(region, report):
    nodes = [n["node_id"] for n in region.nodes()]
    away = next(n for n in reversed(nodes) if n != leader_of(region, "control"))  # no election when it stops
    with Client.from_region(region.root) as client:
        client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
        client.invoke("hello", {"name": "warm"})
        region.stop_node(away)  # it will miss what the others compact away, and need a snapshot
        terms = wait_until(lambda: {n: replica(region, n).term for n in nodes if n != away}, 10,
                           until=lambda t: len(set(t.values())) == 1, what="the replicas left to agree on a term")
        ids = [client.invoke("hello", PAYLOAD, invocation_type="Event").request_id for _ in range(EVENTS)]
        listed = wait_until(lambda: events_done(client), 120, ignoring=(FlintError,),
                            until=lambda e: e["counts"]["done"] >= EVENTS, what=f"{EVENTS} events to run")
        assert {e["event_id"] for e in listed["events"]} >= set(ids)
        sizes = {n: raft_files(region, n) for n in nodes if n != away}
        assert {n: replica(region, n).term for n in terms} == terms  # dumps did not stall Raft into an election
        for n, files in sizes.items():
            assert files.get("control.dump", 0) > 0, (n, files)
            # Without compaction the journal holds every event (~30 MB); with it, at most what came since the
            # last cut (COMPACTION_MB) in a file that doubles as it grows.
            assert files["control.journal"] < 3 * COMPACTION_MB * MB, (n, files)

        region.start_node(away)
        try:
            region.wait_healthy(60, nodes=[away])
            caught_up = wait_until(lambda: [replica(region, n).applied for n in nodes], 30, ignoring=(FlintError,),
                                   until=lambda applied: len(set(applied)) == 1,
                                   what=f"{away} to catch up (from a snapshot)")
        except Exception:
            dump_logs(region)
            raise
        report(f"journals and dumps (bytes on disk) after {EVENTS} events: {sizes}; "
               f"{away} after catching up: {raft_files(region, away)}; commands applied {caught_up}")

    region.down()
    region.start()
    try:
        region.wait_healthy(60)
    except Exception:
        dump_logs(region)
        raise
    with Client.from_region(region.root) as client:
        assert "hello" in [f["name"] for f in client.list_functions()]
        after = wait_until(lambda: events_done(client), 30, ignoring=(FlintError,),
                           until=lambda e: e["counts"]["done"] >= EVENTS, what="the events after a full restart")
        assert {e["event_id"] for e in after["events"]} >= set(ids)
        assert client.invoke("hello", {"name": "again"}).json()["message"] == "Hello, again!"
    wait_until(lambda: [replica(region, n).applied for n in nodes], 30, ignoring=(FlintError,),
               until=lambda applied: len(set(applied)) == 1 and applied[0] >= caught_up[0],
               what="every replica to have the state it had before the restart")
