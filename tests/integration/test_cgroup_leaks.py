"""Sandbox cgroups on real node processes: a node's sandbox groups live under a parent of its own (two regions
on one host with the same node ids never share one); a start clears what an earlier process of the node left (it
was SIGKILLed), so the groups never pile up; a clean stop leaves nothing, the parent included. Counted in every
v1 hierarchy the node uses, the parents found from where its sandboxes' processes actually are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from flint import Client
from tests.conftest import ROOT, start_region
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="sandbox cgroups need root")]

MOUNT = Path("/sys/fs/cgroup")
POOL = 2


def sandbox_parents(region, node_id: str) -> dict[str, Path]:
    """controller -> the group the node's sandbox groups are made under, read from its sandboxes' processes (a
    prepared slot is one) once there is one in each hierarchy the node uses."""
    def probe() -> dict[str, Path]:
        parents: dict[str, Path] = {}
        for proc in psutil.Process(region.pid(node_id)).children(recursive=True):
            try:
                lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                _, controllers, path = line.split(":", 2)
                if "/slot-" in path:  # the process is in a sandbox group: its parent is the one wanted
                    for c in controllers.split(","):
                        parents[c] = MOUNT / c / path.lstrip("/").rsplit("/", 1)[0]
        return parents
    return wait_until(probe, 20, what=f"{node_id}'s sandboxes in their cgroups",
                      until=lambda p: {"memory", "pids", "cpu"} <= set(p), ignoring=(psutil.Error, TypeError))


def groups(parents: dict[str, Path]) -> dict[str, list[str]]:
    """controller -> the directories under the node's parent there (sandboxes' groups, the freezer's keeper)."""
    return {c: sorted(d.name for d in p.iterdir() if d.is_dir()) if p.exists() else [] for c, p in parents.items()}


def invoke(region, n: int = 3) -> None:
    with Client.from_region(region.root) as client:
        if "hello" not in [f["name"] for f in client.list_functions()]:
            client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
        for _ in range(n):
            assert client.invoke("hello", {}).function_error is None


def test_a_node_clears_its_sandbox_cgroups_across_stops_and_kills(tmp_path, report):
    region = start_region(tmp_path, nodes=1, azs=1, settings={"sandbox_pool": POOL})
    parents = {}
    try:
        invoke(region)  # a warm sandbox too, frozen once idle
        parents = sandbox_parents(region, "n1")
        most = {c: len(g) for c, g in groups(parents).items()}  # prepared slots, the warm one, the keeper
        seen = []
        for round_ in range(4):
            pid = region.pid("n1")
            if round_ % 2:  # a node SIGKILLed: what it left is cleared by the next start
                region.kill_node("n1")
            else:
                assert region.stop_node("n1"), "the node should stop cleanly"
                left = groups(parents)
                assert not any(left.values()), f"a clean stop left sandbox cgroups: {left}"
                assert not any(p.exists() for p in parents.values()), "a clean stop left the node's parent"
            assert region.start_node("n1") != pid
            region.wait_healthy(30)
            assert sandbox_parents(region, "n1") == parents  # its new worker has started (and cleared) by now
            count = {c: len(g) for c, g in groups(parents).items()}
            seen.append(count)
            assert all(count[c] <= most[c] for c in most), f"the groups grew: {count}, at most {most} expected"
            invoke(region)
        report(f"groups per controller after each restart {seen} (at most {most})")
    finally:
        region.down()
    left = groups(parents)
    assert not any(left.values()) and not any(p.exists() for p in parents.values()), left


def start_elsewhere(region, node_id: str, memory_group: Path) -> None:
    """Start the node from another memory cgroup, as a restart from another session or unit would: its
    sandboxes' parent there is another path than before."""
    go = ("import os, sys; from pathlib import Path; from nodes.local import Region; "
          "Path(sys.argv[1], 'cgroup.procs').write_text(str(os.getpid())); Region(sys.argv[2]).start_node(sys.argv[3])")
    subprocess.run([sys.executable, "-c", go, str(memory_group), str(region.root), node_id], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)


def test_a_killed_node_leaves_nothing_once_restarted_elsewhere_or_its_region_is_down(tmp_path):
    ours = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "memory")
    session = MOUNT / "memory" / ours.lstrip("/") / f"flint-test-{os.getpid()}-{tmp_path.name}"
    session.mkdir()
    region = start_region(tmp_path, nodes=1, azs=1, settings={"sandbox_pool": POOL})
    before: dict[str, Path] = {}
    after: dict[str, Path] = {}
    try:
        invoke(region)  # a warm sandbox, frozen once idle: it outlives its node's death until thawed
        before = sandbox_parents(region, "n1")
        most = sum(len(g) for g in groups(before).values())
        region.kill_node("n1")
        start_elsewhere(region, "n1", session)
        region.wait_healthy(30)
        after = sandbox_parents(region, "n1")
        assert after["memory"] != before["memory"] and after["memory"].parent == session
        left = {c: g for c, g in groups(before).items() if before[c] != after[c]}
        assert not any(left.values()), f"the restart left its earlier process's groups: {left}"
        assert sum(len(g) for g in groups(after).values()) <= most, groups(after)
        invoke(region)
        region.kill_node("n1")  # and never started again: the region's down clears what it left
    finally:
        region.down()
        left = {**groups(before), **{f"{c} (after)": g for c, g in groups(after).items()}}
        gone = not any(p.exists() for p in [*before.values(), *after.values()])
        remove_group(session)
    assert not any(left.values()), f"a killed node's groups outlived its region: {left}"
    assert gone, "a killed node's parents outlived its region"


def remove_group(group: Path) -> None:
    """Remove a memory group this test made, and what is left under it after a failure, once the kernel lets go
    (the processes of a node killed in it are reaped by init, in its own time)."""
    def removed() -> bool:
        try:
            for d in sorted((d for d in group.rglob("*") if d.is_dir()), reverse=True):
                d.rmdir()
            group.rmdir()
        except FileNotFoundError:
            pass
        return not group.exists()
    wait_until(removed, 30, what=f"{group} to be removable", ignoring=(OSError,))


def test_two_regions_with_the_same_node_ids_use_different_parents(tmp_path):
    a = start_region(tmp_path / "a", nodes=1, azs=1, settings={"sandbox_pool": POOL})
    try:
        b = start_region(tmp_path / "b", nodes=1, azs=1, settings={"sandbox_pool": POOL})
        try:
            in_a, in_b = sandbox_parents(a, "n1"), sandbox_parents(b, "n1")
            assert not set(in_a.values()) & set(in_b.values()), (in_a, in_b)
            assert all("n1" in p.name for p in in_a.values()), in_a  # readable: names the node
        finally:
            b.down()
        assert groups(in_a) and all(groups(in_a).values()), "region b's stop touched region a's groups"
    finally:
        a.down()
