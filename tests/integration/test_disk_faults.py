"""Disk faults on a control node, on real node processes: its data dir on a small tmpfs that fills up (space, then
inodes) ends the node at once with one log line saying which file and why, never a SIGBUS, while the rest of the
region serves on; and a control node that missed code blob pushes copies them back from its peers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from flint import Client
from nodes.daemon import EXIT_PERSISTENCE_FAILED
from tests.conftest import ROOT, dump_logs, start_region
from tests.support.cluster import leader_of
from tests.support.disk import fill_inodes, fill_space, free, move_data_dir, tmpfs
from tests.support.wait import wait_until
from wire.config import DEFAULTS
from wire.errors import FlintError

pytestmark = pytest.mark.slow

NODE = "n2"  # a control node (every node of a combined region of three is one)
PAYLOAD = {"name": "x" * 200_000}  # an async event's payload goes into every control replica's Raft journal


def persistence_failures(region, node: str) -> list[dict]:
    log = (region.files.node_dir(node) / "node.log").read_text(errors="replace").splitlines()
    events = [json.loads(line) for line in log if line.startswith("{")]
    return [e for e in events if e.get("event") == "node.persistence_failed"]


def row(region, node: str) -> dict:
    return {r["node"]: r for r in region.status()}[node]


def exit_code(proc: psutil.Process, timeout_s: float) -> int | None:
    """The node's exit code (negative: the signal that killed it), or None if it still runs after `timeout_s`."""
    try:
        return proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        return None


def serves_invokes(region, times: int = 5) -> None:
    with Client.from_region(region.root, timeout_s=10) as client:
        for i in range(times):
            assert client.invoke("hello", {"name": f"after {i}"}).json()["message"] == f"Hello, after {i}!"


def test_a_control_node_whose_disk_fills_exits_with_one_line_not_a_sigbus(tmp_path, report):
    with tmpfs(tmp_path / f"disk-{NODE}", size_mb=192) as disk:
        region = start_region(tmp_path, prepare=lambda r: move_data_dir(r, NODE, disk))
        try:
            with Client.from_region(region.root, timeout_s=10) as client:
                client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
                proc = psutil.Process(region.pid(NODE))
                fill_space(disk / "other", leave_mb=6)  # another process on the host takes the disk
                filled = time.monotonic()
                sent = 0
                while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and sent < 400:
                    try:  # each accept goes into the node's control journal, which must grow
                        client.invoke("hello", PAYLOAD, invocation_type="Event")
                    except FlintError:
                        pass  # the node on its way out may have been the frontend asked
                    sent += 1
                code = exit_code(proc, 15)
                took_s = time.monotonic() - filled
            lines = persistence_failures(region, NODE)
            report(f"{NODE}'s disk filled: exit code {code} {took_s:.1f}s later after {sent} events; {lines}")
            assert code == EXIT_PERSISTENCE_FAILED, f"{NODE} ended with {code} (-7 is SIGBUS), not a clear exit"
            assert len(lines) == 1, lines
            assert lines[0]["path"].startswith(str(disk)) and "No space left on device" in lines[0]["error"], lines
            assert "free" in lines[0]["action"]
            serves_invokes(region)
        except Exception:
            dump_logs(region)
            raise
        finally:
            region.down()


def test_a_control_node_out_of_inodes_reports_unhealthy_then_exits(tmp_path, report):
    with tmpfs(tmp_path / f"disk-{NODE}", size_mb=256, inodes=4000) as disk:
        region = start_region(tmp_path, prepare=lambda r: move_data_dir(r, NODE, disk))
        try:
            proc = psutil.Process(region.pid(NODE))
            with Client.from_region(region.root, timeout_s=10) as client:
                client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
            fill_inodes(disk / "other", leave=DEFAULTS.persist_min_free_inodes // 2)
            started = time.monotonic()
            seen = wait_until(lambda: row(region, NODE), 5, until=lambda r: r["health"] == "unhealthy",
                              what=f"{NODE}, short of inodes, to report unhealthy")
            unhealthy_s = time.monotonic() - started
            assert seen["can_persist"] is False and "inodes" in seen["persist_problem"], seen

            fill_inodes(disk / "other", leave=0)
            started = time.monotonic()
            code = exit_code(proc, 10)
            took_s = time.monotonic() - started
            lines = persistence_failures(region, NODE)
            report(f"{NODE} under the inode margin: unhealthy after {unhealthy_s:.1f}s ({seen['persist_problem']}); "
                   f"out of inodes: exit code {code} after {took_s:.1f}s; {lines}")
            assert code == EXIT_PERSISTENCE_FAILED, f"{NODE} out of inodes: exit code {code}"
            assert len(lines) == 1 and "No space left on device" in lines[0]["error"], lines
            serves_invokes(region)
        except Exception:
            dump_logs(region)
            raise
        finally:
            region.down()


def blobs(region, node: str) -> set[str]:
    root = region.config(node).data_dir / "blobs"
    return {p.name for p in root.glob("??/*") if len(p.name) == 64}


FUNCTIONS = 6


def test_a_control_node_that_missed_blob_pushes_copies_them_from_its_peers(tmp_path, report):
    region = start_region(tmp_path)
    try:
        nodes = [n["node_id"] for n in region.nodes()]
        away = next(n for n in reversed(nodes) if n != leader_of(region, "control"))
        region.stop_node(away)
        with Client.from_region(region.root, timeout_s=10) as client:
            for i in range(FUNCTIONS):
                code = tmp_path / f"fn{i}"
                code.mkdir()
                (code / "handler.py").write_text(f"def handle(event, context):\n    return {i}\n")
                client.create_function(f"fn{i}", code=code, handler="handler.handle")
        peers = set().union(*(blobs(region, n) for n in nodes if n != away))
        assert len(peers) == FUNCTIONS and not blobs(region, away) & peers

        region.start_node(away)
        started = time.monotonic()
        bound_s = 3 * DEFAULTS.code_blob_repair_interval_s + 15  # start, catch up, a round or two
        wait_until(lambda: blobs(region, away), bound_s, interval_s=0.2, until=lambda have: have == peers,
                   what=f"{away} to hold every blob its peers hold")
        report(f"{away} had {len(peers)} missing blobs again {time.monotonic() - started:.1f}s after its start")
        log = (region.files.node_dir(away) / "node.log").read_text()
        assert log.count('"code.recopied"') == FUNCTIONS
    except Exception:
        dump_logs(region)
        raise
    finally:
        region.down()


def test_free_reports_the_tmpfs_it_measures(tmp_path):
    with tmpfs(tmp_path / "disk", size_mb=8, inodes=100) as disk:
        space, inodes = free(disk)
        assert 7 * 1024 * 1024 <= space <= 8 * 1024 * 1024 and 90 <= inodes <= 100
    assert not Path(disk).is_mount()
