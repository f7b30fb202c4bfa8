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

import asyncio
import tempfile
import time
from pathlib import Path

from _common import CORES, echo_code, local_region, p50, p99, parser, print_result  # first: the repository's path

import uvloop

from flint.client import AsyncClient
from nodes.local import Region

TARGETS = {"accepted_per_s_min": 500.0, "accept_to_exec_p50_ms_max": 50.0}


async def run(region: Region, n_events: int, n_sync: int, callers: int) -> dict:
    client = AsyncClient.from_region(region.root, retries=0)
    try:
        code = echo_code(Path(tempfile.mkdtemp()) / "echo")
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
    args = parser(__doc__, "2,000 events instead of 10,000", base_ip="127.81.0.1").parse_args()
    n_events, n_sync = (2000, 300) if args.quick else (10000, 1000)

    with local_region("async", args.base_ip, settings={"record_executions": True}) as region:
        res = uvloop.run(run(region, n_events, n_sync, callers=16))
        started = starts(region)
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
        "accept_to_exec_p50_ms": p50(lag, 2),
        "accept_to_exec_p99_ms": p99(lag, 2),
        "sync_p50_ms": p50(res["sync"], 3),
        "sync_p99_ms": p99(res["sync"], 3),
        "targets": TARGETS,
        "cores": CORES,
    }
    out["meets_targets"] = (
        out["accepted_per_s"] >= TARGETS["accepted_per_s_min"]
        and out["accept_to_exec_p50_ms"] <= TARGETS["accept_to_exec_p50_ms_max"]
        and out["executed"] == out["accepted"]
    )
    print_result(out)


if __name__ == "__main__":
    main()
