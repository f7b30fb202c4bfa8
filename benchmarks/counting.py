"""How fast Flint admits an invoke against a region-wide limit, and what a counting leader's death costs.

    python benchmarks/counting.py [--quick]

All in one run, on this machine:
- admissions/s and admission latency p50/p99 through the frontend's admission path (frontend/admission.py, the
  same code a frontend runs) against a real 3-replica counting group of node processes, at 1, 8 and 64
  concurrent callers; an admission is admit + release of one credit;
- the same path without credit leases (every admission one Raft commit, every release another), for contrast;
- one Raft commit p50/p99 sent to the leader's counting service and to a follower's (one ZeroMQ round trip +
  one commit; the follower forwards to the leader);
- leader failover gap: the longest time without any admission while the counting leader is SIGKILLed, with
  and without credit leases;
- the same admission workload against etcd: three members on loopback, data on tmpfs, a counter guarded by a
  transaction (benchmarks/etcd_baseline.py), and the ratio.

Targets: admission p99 <= 1.5 ms; admissions/s >= 20x etcd's at every caller count; no admission gap while
credits last during a leader failover (we count a gap under 100 ms as none). The last line is one JSON object.
"""

from __future__ import annotations

import asyncio
import os
import time

from _common import CORES, HERE, local_region, p50, p99, parser, print_result  # first: the repository's path

import uvloop
import zmq.asyncio

from counting.client import CountingClient
from frontend.admission import Admission
from nodes.local import Region
from wire import messages as m
from wire.errors import FlintError
from wire.client import ClientPool, Failover
from wire.ids import new_request_id

TENANT = "bench"
CALLER_COUNTS = (1, 8, 64)
TARGETS = {"admission_p99_ms": 1.5, "ratio_vs_etcd_min": 20.0, "failover_gap_ms_max": 100.0}


class Harness:
    """The frontend's admission path, in this process, against the region's counting service."""

    def __init__(self, region: Region):
        self.region = region
        keys = region.cluster_keys()
        self.ctx = zmq.asyncio.Context()
        self.pool = ClientPool(self.ctx, keys, keys.public)
        config = region.config(region.nodes()[0]["node_id"])
        self.counting = CountingClient(Failover(self.pool, config.control_endpoints("counting")))

    def admission(self) -> Admission:
        # nobody pushes revisions here: one holder never has to give credits back to another
        return Admission(self.counting, f"bench-{os.getpid()}-{new_request_id()}", "tcp://127.0.0.1:9")

    async def run(self, callers: int, duration_s: float, *, leases: bool, stamps: list[float] | None = None) -> dict:
        adm = self.admission() if leases else None
        renewals = asyncio.get_running_loop().create_task(adm.run()) if adm else None
        latencies: list[float] = []
        errors = 0
        end = time.monotonic() + duration_s

        async def caller() -> None:
            nonlocal errors
            while time.monotonic() < end:
                began = time.perf_counter()
                try:
                    if adm is not None:
                        ticket = await adm.admit(TENANT, "fn", 1.0)
                        latencies.append((time.perf_counter() - began) * 1000)
                        adm.release(ticket)
                    else:
                        lease_id = new_request_id()
                        await self.counting.lease(m.LeaseCredits(
                            lease_id=lease_id, holder="bench", endpoint="tcp://127.0.0.1:9", tenant=TENANT,
                            function="fn", want=1, in_use=0, max_timeout_s=1.0, duration_s=3.0))
                        latencies.append((time.perf_counter() - began) * 1000)
                        await self.counting.release_lease(lease_id, 0)
                except FlintError:
                    errors += 1
                    await asyncio.sleep(0.005)
                    continue
                if stamps is not None:
                    stamps.append(time.monotonic())
                await asyncio.sleep(0)  # the execution itself, here empty: let the other callers run

        began = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.monotonic() - began
        if renewals is not None:
            renewals.cancel()
        return {
            "callers": callers,
            "admissions_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": p50(latencies, 4),
            "p99_ms": p99(latencies, 4),
            "errors": errors,
        }

    async def commit_latency(self, node_id: str, n: int) -> dict:
        endpoint = self.region.config(node_id).endpoint("counting")
        out = []
        for _ in range(n):
            began = time.perf_counter()
            await self.pool.call(endpoint, m.ReleaseCreditLease(lease_id="no-such-lease", in_use=0), timeout_s=3.0)
            out.append((time.perf_counter() - began) * 1000)
        return {"p50_ms": p50(out, 3), "p99_ms": p99(out, 3)}

    async def failover_gap(self, *, leases: bool) -> float:
        """Longest stretch without an admission from 0.5 s before the leader's SIGKILL to 4 s after it."""
        leader = await asyncio.to_thread(counting_leader, self.region)
        stamps: list[float] = []
        work = asyncio.get_running_loop().create_task(self.run(8, 7.0, leases=leases, stamps=stamps))
        await asyncio.sleep(2.0)
        killed_at = time.monotonic()
        await asyncio.to_thread(self.region.kill_node, leader)
        await work
        window = [killed_at - 0.5] + [t for t in stamps if killed_at - 0.5 <= t <= killed_at + 4.0] + [
            killed_at + 4.0]
        gap = max(b - a for a, b in zip(window, window[1:]))
        await asyncio.to_thread(self._restart, leader)
        return round(gap * 1000, 1)

    def _restart(self, node_id: str) -> None:
        self.region.start_node(node_id)
        self.region.wait_healthy(60)

    def close(self) -> None:
        self.pool.close()
        self.ctx.destroy(linger=0)


def counting_leader(region: Region) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for n in region.nodes():
            try:
                status = region.call("admin", m.NodeStatus(), node=n["node_id"], timeout_s=1.0)
            except FlintError:
                continue
            if status.raft["counting"].state == "leader":
                return n["node_id"]
        time.sleep(0.2)
    raise RuntimeError("no counting leader")


async def measure_flint(region: Region, duration_s: float, commits: int) -> dict:
    h = Harness(region)
    try:
        await h.run(8, 1.0, leases=True)  # warm up sockets and the first leases
        with_leases = {c: await h.run(c, duration_s, leases=True) for c in CALLER_COUNTS}
        without = {c: await h.run(c, duration_s, leases=False) for c in CALLER_COUNTS}
        leader = await asyncio.to_thread(counting_leader, region)
        follower = next(n["node_id"] for n in region.nodes() if n["node_id"] != leader)
        commit_leader = await h.commit_latency(leader, commits)
        commit_follower = await h.commit_latency(follower, commits)
        gap_leases = await h.failover_gap(leases=True)
        gap_plain = await h.failover_gap(leases=False)
    finally:
        h.close()
    return {"leases": with_leases, "no_leases": without, "commit_leader": commit_leader,
            "commit_follower": commit_follower, "gap_leases": gap_leases, "gap_plain": gap_plain}


async def measure_etcd(duration_s: float) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("etcd_baseline", HERE / "etcd_baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    EtcdCluster, etcd_admissions = baseline.EtcdCluster, baseline.etcd_admissions

    with EtcdCluster(base_ip="127.88.0.1") as cluster:
        await etcd_admissions(cluster.endpoints, 4, 1.0)  # warm up
        return {c: await etcd_admissions(cluster.endpoints, c, duration_s) for c in CALLER_COUNTS}


def main() -> None:
    ap = parser(__doc__, "shorter runs; finishes in under two minutes", base_ip="127.79.0.1")
    ap.add_argument("--no-etcd", action="store_true", help="skip the etcd baseline (if etcd is not installed)")
    args = ap.parse_args()
    duration_s, commits = (2.0, 300) if args.quick else (8.0, 2000)

    with local_region("counting", args.base_ip, tenant=False) as region:
        flint = uvloop.run(measure_flint(region, duration_s, commits))
    etcd = None if args.no_etcd else uvloop.run(measure_etcd(duration_s))

    at64 = flint["leases"][64]
    out = {
        "benchmark": "counting",
        "quick": args.quick,
        "admission_p50_ms": at64["p50_ms"],
        "admission_p99_ms": at64["p99_ms"],
        "admissions_per_s": at64["admissions_per_s"],
        "etcd_admissions_per_s": etcd[64]["admissions_per_s"] if etcd else None,
        "raft_commit_p50_ms": flint["commit_leader"]["p50_ms"],
        "raft_commit_p99_ms": flint["commit_leader"]["p99_ms"],
        "raft_commit_via_follower_p50_ms": flint["commit_follower"]["p50_ms"],
        "raft_commit_via_follower_p99_ms": flint["commit_follower"]["p99_ms"],
        "failover_gap_ms": flint["gap_leases"],
        "failover_gap_no_leases_ms": flint["gap_plain"],
        "by_callers": {
            str(c): {
                "flint": flint["leases"][c],
                "flint_no_leases": flint["no_leases"][c],
                "etcd": ({k: etcd[c][k] for k in ("admissions_per_s", "p50_ms", "p99_ms", "retries")}
                         if etcd else None),
                "ratio_vs_etcd": (round(flint["leases"][c]["admissions_per_s"] / etcd[c]["admissions_per_s"], 1)
                                  if etcd else None),
            }
            for c in CALLER_COUNTS
        },
        "targets": TARGETS,
        "cores": CORES,
    }
    ratios = [v["ratio_vs_etcd"] for v in out["by_callers"].values() if v["ratio_vs_etcd"] is not None]
    out["meets_targets"] = (
        all(flint["leases"][c]["p99_ms"] <= TARGETS["admission_p99_ms"] for c in CALLER_COUNTS)
        and bool(ratios) and min(ratios) >= TARGETS["ratio_vs_etcd_min"]
        and out["failover_gap_ms"] <= TARGETS["failover_gap_ms_max"]
    )
    print_result(out)


if __name__ == "__main__":
    main()
