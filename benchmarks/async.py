"""Async invokes: how many events a region accepts per second, and how soon an accepted event runs.

    python benchmarks/async.py [--quick]

A local region of 3 nodes (3 AZs); a trivial function. Accepting an event commits it to the replicated queue
in the `control` group before the 202 goes back; pollers on the frontends then take it and run it through the
sync path. Measured in one run: accepted events/s with 16 concurrent callers; the time from a 202 to the
event's execution starting on a worker (both on this machine's monotonic clock; the start from the workers'
execution records), p50/p99; and, beside it, the sync invoke path's p50/p99. Targets (Flint's own, 2 cores):
>= 500 accepted/s; accept-to-execution p50 <= 50 ms. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from flint.client import AsyncClient  # noqa: E402
from nodes.local import Region  # noqa: E402

HANDLER = "def handle(event, context):\n    return event\n"
TARGETS = {"accepted_per_s_min": 500.0, "accept_to_exec_p50_ms_max": 50.0}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run(region: Region, n_events: int, n_sync: int, callers: int) -> dict:
    client = AsyncClient.from_region(region.root, retries=0)
    try:
        code = Path(tempfile.mkdtemp()) / "echo"
        code.mkdir()
        (code / "handler.py").write_text(HANDLER)
        await client.create_function("echo", code=code, handler="handler.handle")
        for _ in range(50):
            await client.invoke("echo", {"warm": True})

        sync = []
        for i in range(n_sync):
            began = time.perf_counter()
            await client.invoke("echo", {"i": i})
            sync.append((time.perf_counter() - began) * 1000)

        accepted: dict[str, float] = {}
        errors = 0
        per_caller = n_events // callers

        async def caller(k: int) -> None:
            nonlocal errors
            for i in range(per_caller):
                try:
                    result = await client.invoke("echo", {"k": k, "i": i}, invocation_type="Event")
                    accepted[result.request_id] = time.monotonic()
                except Exception:  # noqa: BLE001 - counted, and the JSON says so
                    errors += 1

        began = time.monotonic()
        await asyncio.gather(*(caller(k) for k in range(callers)))
        accept_s = time.monotonic() - began
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = (await client.list_events(limit=1))["counts"]
            if counts["queued"] == 0 and counts["inflight"] == 0:
                break
            await asyncio.sleep(0.2)
        return {"sync": sync, "accepted": accepted, "accept_s": accept_s, "errors": errors}
    finally:
        client.close()


def starts(region: Region) -> dict[str, float]:
    first: dict[str, float] = {}
    for n in region.nodes():
        path = Path(region.root) / "nodes" / n["node_id"] / "executions.log"
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "S" and parts[2] not in first:
                    first[parts[2]] = float(parts[1])
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 events instead of 10,000")
    ap.add_argument("--base-ip", default="127.81.0.1")
    args = ap.parse_args()
    n_events, n_sync = (2000, 300) if args.quick else (10000, 1000)

    root = Path(tempfile.mkdtemp(prefix="flint-bench-async-"))
    region = Region.create(root / "region", nodes=3, azs=3, base_ip=args.base_ip,
                           settings={"record_executions": True})
    region.start()
    try:
        region.wait_healthy(60)
        region.ensure_tenant()
        res = uvloop.run(run(region, n_events, n_sync, callers=16))
        started = starts(region)
    except Exception:
        for n in region.nodes():  # say why before the region and its logs go
            for line in (region.root / "nodes" / n["node_id"] / "node.log").read_text().splitlines()[-400:]:
                if '"warning"' in line or '"error"' in line:
                    print(n["node_id"], line[:300], file=sys.stderr)
        raise
    finally:
        region.down(remove=True)
    lag = [(started[e] - t) * 1000 for e, t in res["accepted"].items() if e in started]
    out = {
        "benchmark": "async",
        "quick": args.quick,
        "region": "3 nodes, 3 AZs, 16 callers",
        "events": n_events,
        "accepted": len(res["accepted"]),
        "accept_errors": res["errors"],
        "accepted_per_s": round(len(res["accepted"]) / res["accept_s"], 1),
        "executed": len(lag),
        "accept_to_exec_p50_ms": round(pct(lag, 50), 2),
        "accept_to_exec_p99_ms": round(pct(lag, 99), 2),
        "sync_p50_ms": round(pct(res["sync"], 50), 3),
        "sync_p99_ms": round(pct(res["sync"], 99), 3),
        "targets": TARGETS,
        "cores": os.cpu_count(),
    }
    out["meets_targets"] = (
        out["accepted_per_s"] >= TARGETS["accepted_per_s_min"]
        and out["accept_to_exec_p50_ms"] <= TARGETS["accept_to_exec_p50_ms_max"]
        and out["executed"] == out["accepted"]
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
