"""Shared fixtures: fresh loopback addresses per region, real regions of real node processes."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_blocks = itertools.count(1)


def fresh_base_ip() -> str:
    """A /24 of loopback addresses no other region of this run (or a parallel run) uses."""
    return f"127.{100 + os.getpid() % 100}.{next(_blocks) % 250}.1"


@pytest.fixture
def base_ip() -> str:
    return fresh_base_ip()


def start_region(tmp_path: Path, *, nodes: int = 3, azs: int = 3, settings: dict | None = None, layout: str = "combined",
                 prepare=None):
    """Create a region, start it and wait until it is healthy. `prepare(region)`, if given, runs between the two
    (e.g. to give a node its data dir on a filesystem of the test's own)."""
    from nodes.local import Region

    region = Region.create(tmp_path / "region", nodes=nodes, azs=azs, base_ip=fresh_base_ip(), settings=settings,
                           layout=layout)
    if prepare is not None:
        prepare(region)
    region.start()
    try:
        region.wait_healthy(60)
        region.ensure_tenant()
    except Exception:
        dump_logs(region)
        region.down()
        raise
    return region


def dump_logs(region, lines: int = 30) -> None:
    for n in region.nodes():
        path = region.root / "nodes" / n["node_id"] / "node.log"
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {n['node_id']} log tail ---", *tail, sep="\n")


@pytest.fixture
def example_code() -> Path:
    return ROOT / "examples" / "hello"


_REPORTS = pytest.StashKey[list]()


@pytest.fixture
def report(request):
    """What a test measured that a reader of the run should see even when it passes (printed at the end)."""
    lines = request.config.stash.setdefault(_REPORTS, [])
    return lambda text: lines.append(f"{request.node.nodeid}: {text}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_REPORTS, [])
    if lines:
        terminalreporter.section("flint: measured by the tests")
        for line in lines:
            terminalreporter.write_line(line)
