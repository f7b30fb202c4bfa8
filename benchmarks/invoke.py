"""Warm sync invoke through the whole path of a local 3-node, 3-AZ region, beside a bare ZeroMQ round trip.

    python benchmarks/invoke.py [--quick]

Path measured: client -> frontend (CURVE, ZAP) -> counting acquire (one Raft commit) -> worker manager reserve
-> worker run in a warm sandbox -> reply; the release of the slot and the sandbox happen after the reply.
Baseline, same run, same machine: a DEALER -> ROUTER echo between two processes, plain and with CURVE.

Targets (Flint's own, for a 2-core box): warm p50 <= 5 ms and p99 <= 15 ms with 1 caller; >= 300 invokes/s with
16 callers. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from _common import CORES, echo_code, local_region, p50, p99, parser, print_result  # first: the repository's path

import uvloop
import zmq
import zmq.asyncio

from flint.client import AsyncClient
from nodes.local import Region

TARGETS = {"warm_p50_ms": 5.0, "warm_p99_ms": 15.0, "invokes_per_s": 300.0}


# --- baseline: a bare ZeroMQ round trip between two processes -------------------------------------------------------


def _echo_server(endpoint: str, curve: tuple[bytes, bytes] | None, ready) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if curve:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = curve
    sock.bind(endpoint)
    ready.set()
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            sock.send_multipart(frames)
            break
        sock.send_multipart(frames)
    sock.close(0)
    ctx.term()


def zmq_rtt(n: int, *, curve: bool) -> list[float]:
    endpoint = "tcp://127.0.0.1:%d" % (17900 + curve)
    server_keys = zmq.curve_keypair() if curve else None
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=_echo_server, args=(endpoint, server_keys, ready), daemon=True)
    proc.start()
    ready.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        pub, sec = zmq.curve_keypair()
        sock.curve_serverkey = server_keys[0]
        sock.curve_publickey, sock.curve_secretkey = pub, sec
    sock.connect(endpoint)
    payload = json.dumps({"name": "bench"}).encode()
    for _ in range(200):
        sock.send_multipart([b"h", payload])
        sock.recv_multipart()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send_multipart([b"h", payload])
        sock.recv_multipart()
        out.append((time.perf_counter() - t) * 1000)
    sock.send_multipart([b"stop"])
    sock.recv_multipart()
    sock.close(0)
    ctx.term()
    proc.join(5)
    return out


# --- the region ----------------------------------------------------------------------------------------------------


async def measure(region: Region, n_single: int, n_multi: int, callers: int) -> dict:
    client = AsyncClient.from_region(region.root, retries=0)
    try:
        code = echo_code(Path(tempfile.mkdtemp()) / "echo")
        await client.create_function("echo", code=code, handler="handler.handle")
        cold_t = time.perf_counter()
        first = await client.invoke("echo", {"warm": "up"})
        cold_ms = (time.perf_counter() - cold_t) * 1000
        assert first.function_error is None, first.payload
        for _ in range(100):
            await client.invoke("echo", {"warm": "up"})

        single = []
        for i in range(n_single):
            t = time.perf_counter()
            r = await client.invoke("echo", {"i": i})
            single.append((time.perf_counter() - t) * 1000)
            assert r.function_error is None

        multi: list[float] = []
        errors = 0
        error_kinds: dict[str, int] = {}

        async def caller(k: int, count: int) -> None:
            nonlocal errors
            for i in range(count):
                t = time.perf_counter()
                try:
                    await client.invoke("echo", {"c": k, "i": i})
                except Exception as exc:
                    errors += 1
                    error_kinds[f"{type(exc).__name__}: {exc}"[:160]] = error_kinds.get(f"{type(exc).__name__}: {exc}"[:160], 0) + 1
                    continue
                multi.append((time.perf_counter() - t) * 1000)

        per_caller = max(1, n_multi // callers)
        began = time.perf_counter()
        await asyncio.gather(*(caller(k, per_caller) for k in range(callers)))
        elapsed = time.perf_counter() - began
        return {
            "cold_first_invoke_ms": round(cold_ms, 2),
            "single": single,
            "multi": multi,
            "multi_elapsed_s": elapsed,
            "multi_errors": errors,
            "error_kinds": error_kinds,
        }
    finally:
        client.close()


def main() -> None:
    args = parser(__doc__, "fewer invokes; finishes in well under a minute", base_ip="127.78.0.1").parse_args()
    n_single, n_multi, n_rtt = (300, 1600, 2000) if args.quick else (2000, 8000, 10000)
    callers = 16

    plain = zmq_rtt(n_rtt, curve=False)
    curve = zmq_rtt(n_rtt, curve=True)
    with local_region("invoke", args.base_ip) as region:
        res = uvloop.run(measure(region, n_single, n_multi, callers))

    single, multi = res["single"], res["multi"]
    out = {
        "benchmark": "invoke",
        "quick": args.quick,
        "region": "3 nodes, 3 AZs, loopback, one process per node",
        "warm_p50_ms": p50(single, 3),
        "warm_p99_ms": p99(single, 3),
        "warm_mean_ms": round(statistics.fmean(single), 3),
        "invokes_per_s_1_caller": round(len(single) / (sum(single) / 1000), 1),
        "invokes_per_s": round(len(multi) / res["multi_elapsed_s"], 1),
        "p50_ms_16_callers": p50(multi, 3),
        "p99_ms_16_callers": p99(multi, 3),
        "errors_16_callers": res["multi_errors"],
        "error_kinds": res["error_kinds"],
        "cold_first_invoke_ms": res["cold_first_invoke_ms"],
        "zmq_rtt_p50_ms": p50(plain, 4),
        "zmq_rtt_p99_ms": p99(plain, 4),
        "zmq_curve_rtt_p50_ms": p50(curve, 4),
        "targets": TARGETS,
        "cores": CORES,
    }
    out["meets_targets"] = (
        out["warm_p50_ms"] <= TARGETS["warm_p50_ms"]
        and out["warm_p99_ms"] <= TARGETS["warm_p99_ms"]
        and out["invokes_per_s"] >= TARGETS["invokes_per_s"]
    )
    print_result(out)


if __name__ == "__main__":
    main()
