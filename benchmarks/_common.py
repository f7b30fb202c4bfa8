"""What the benchmark scripts share: the repository on sys.path, percentiles, the command line, a local region for
the length of a run, the echo function, and the one JSON line each ends with.

A script imports this before anything of Flint's: it puts the repository first on sys.path and takes this folder
off it, so that this folder's counting.py does not shadow the `counting` package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from nodes.local import Region

CORES = os.cpu_count()
ECHO_HANDLER = "def handle(event, context):\n    return event\n"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def p50(values: list[float], digits: int) -> float:
    return round(pct(values, 50), digits)


def p99(values: list[float], digits: int) -> float:
    return round(pct(values, 99), digits)


def parser(doc: str | None, quick_help: str, *, base_ip: str | None = None) -> argparse.ArgumentParser:
    """The script's docstring as its help, `--quick` for a short run, and `--base-ip` if it starts a region."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if base_ip is not None:
        ap.add_argument("--base-ip", default=base_ip)
    return ap


@contextlib.contextmanager
def local_region(name: str, base_ip: str, *, nodes: int = 3, azs: int = 3, settings: dict[str, Any] | None = None,
                 tenant: bool = True) -> Iterator[Region]:
    """A new local region in a temporary directory, healthy (with the default tenant if `tenant`); stopped and
    removed at the end. If the run fails, the nodes' warnings and errors go to stderr before their logs do."""
    from nodes.local import Region

    root = Path(tempfile.mkdtemp(prefix=f"flint-bench-{name}-"))
    region = Region.create(root / "region", nodes=nodes, azs=azs, base_ip=base_ip, settings=settings)
    region.start()
    try:
        region.wait_healthy(60)
        if tenant:
            region.ensure_tenant()
        yield region
    except Exception:
        _print_node_problems(region)
        raise
    finally:
        region.down(remove=True)


def _print_node_problems(region: Region, lines: int = 400) -> None:
    for n in region.nodes():
        log = region.root / "nodes" / n["node_id"] / "node.log"
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines()[-lines:]:
            if '"warning"' in line or '"error"' in line:
                print(n["node_id"], line[:300], file=sys.stderr)


def echo_code(directory: Path) -> Path:
    """`directory`, made, holding handler.py whose `handle` returns the event it is given."""
    directory.mkdir()
    (directory / "handler.py").write_text(ECHO_HANDLER)
    return directory


def print_result(out: dict[str, Any]) -> None:
    """A benchmark's last line: one JSON object."""
    print(json.dumps(out))
