"""How fast a worker makes an isolated sandbox, what a warm invoke costs it, and what an idle sandbox weighs.

    python benchmarks/sandbox.py [--quick]

Measured in one run, with the worker's own code (zygote, slot pool, SandboxProcess), on this machine:
- cold start: create -> first result, p50/p99, with full isolation (cgroups, namespaces, pivot_root, uid, caps,
  no_new_privs, seccomp, rlimits; as root) - or whatever this machine allows, which the JSON says - from a
  prepared slot, as a worker keeps `sandbox_pool` of them; and with no slot prepared (a burst bigger than the
  pool: the fork, namespaces, cgroups and root are built in the measured time too);
- cold start of a function with network (root only): no slot is kept prepared for one, so the fork, namespaces,
  cgroups and root are in the time, plus its veth, address and routes (worker/network.py) - compare with the
  unprepared cold start;
- the same for a fresh `python3` with the runtime's imports (the bootstrap started on its own, no isolation),
  and for bubblewrap (Debian's `bubblewrap`) launching the same handler with --unshare-all;
- warm invoke overhead, worker side: a no-op handler's round trip through the sandbox's channel, p50/p99
  (a 1769 MB function, so its CPU share is a full core and does not throttle the loop); back to back, and after
  an idle spell long enough for the sandbox to be frozen (the invoke thaws it; where there is no freezer the
  sandbox just idled);
- sandboxes created per second, sustained (create, first result, retire), slot preparation included;
- memory per idle sandbox: proportional set size (PSS) of the sandbox's processes.

Targets: cold p50 <= 10 ms and p99 <= 25 ms with full isolation; warm overhead p50 <= 200 us; idle sandbox
<= 5 MiB PSS (Firecracker's VMM overhead); Firecracker itself needs ~125 ms to reach init. The last line is
one JSON object.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop
from _common import CORES, ROOT, echo_code, p50, p99, parser, print_result  # first: the repository's path

from wire import messages as m
from wire.config import Settings
from worker import isolation as iso
from worker.cgroups import host_cgroups
from worker.network import SandboxNetwork
from worker.sandbox import SandboxProcess
from worker.slots import SlotPool
from worker.zygote_client import Zygote

BOOTSTRAP = ROOT / "worker" / "bootstrap.py"
TARGETS = {"cold_p50_ms": 10.0, "cold_p99_ms": 25.0, "warm_overhead_p50_us": 200.0, "idle_pss_mib": 5.0}


def config(name: str = "bench", memory_mb: int = 128, network: bool = False) -> m.FunctionConfig:
    return m.FunctionConfig(tenant="bench", name=name, handler="handler.handle", code_sha256="0" * 64,
                            memory_mb=memory_mb, network=network)


async def flint(code: Path, run_root: Path, n_cold: int, n_warm: int, n_idle: int, rate_s: float) -> dict:
    cgroups = host_cgroups(f"flint-bench-{os.getpid()}") if os.geteuid() == 0 else None
    caps = iso.probe(cgroups)
    zygote = Zygote(caps, CORES or 1)
    await zygote.start()
    network = SandboxNetwork(f"bench-{os.getpid()}", "127.0.0.1", ["127.0.0.1"], Settings(), caps)
    await network.start()
    pool = SlotPool(zygote, cgroups, run_root, size=4, network=network)
    pool.start()
    try:
        async def ready_slots(n: int) -> None:
            while len(pool.ready) < n:
                await asyncio.sleep(0.002)

        async def cold_starts(name: str, n: int, slots: SlotPool, prepared: int, net: bool = False) -> list[float]:
            """create -> first result, ms, n times; `prepared` slots made ready before each (outside the time)"""
            times = []
            for i in range(n):
                await ready_slots(prepared)
                began = time.perf_counter()
                sb = await SandboxProcess.start(f"{name}-{i}", config(network=net), code, pool=slots)
                out = await sb.invoke(f"{name}{i}", b'{"n": 1}', False)
                times.append((time.perf_counter() - began) * 1000)
                assert out.function_error is None and sb.init_error is None, out.payload
                await sb.close()
            return times

        # cold starts, each from a prepared slot as a worker would have one
        cold = await cold_starts("cold", n_cold, pool, prepared=2)
        # with no prepared slot (a burst bigger than the pool): fork, namespaces, cgroups and root too
        unprepared = await cold_starts("bare", max(20, n_cold // 5), SlotPool(zygote, cgroups, run_root / "bare", size=0),
                                       prepared=0)
        # with network: prepared on demand, veth and all (only where a safe network can be had: root, nft)
        networked = (await cold_starts("net", max(20, n_cold // 5), pool, prepared=2, net=True)
                     if network.available else [])

        # warm: the same sandbox, invoke after invoke. 1769 MB buys a full core: at 128 MB the function's CPU
        # share (7% of a core) would throttle thousands of back-to-back invokes, and that is the limit, not overhead
        await ready_slots(1)
        sb = await SandboxProcess.start("warm", config(memory_mb=1769), code, pool=pool)
        for i in range(200):
            await sb.invoke(f"w{i}", b"{}", False)
        warm = []
        for i in range(n_warm):
            began = time.perf_counter()
            await sb.invoke(f"w{i}", b"{}", False)
            warm.append((time.perf_counter() - began) * 1e6)
        after_idle = []
        for i in range(n_idle):
            await asyncio.sleep(pool.freeze_after_s + 0.02)  # frozen by now, where there is a freezer
            began = time.perf_counter()
            await sb.invoke(f"i{i}", b"{}", False)
            after_idle.append((time.perf_counter() - began) * 1e6)

        # idle sandboxes: PSS of every process of each (the one outside its pid namespace included)
        idle = []
        for i in range(8):
            await ready_slots(1)
            s = await SandboxProcess.start(f"idle-{i}", config(), code, pool=pool)
            await s.invoke("x", b"{}", False)
            idle.append(s)
        await asyncio.sleep(0.2)
        pss = []
        for s in idle:
            procs = [psutil.Process(s.pid)] + psutil.Process(s.pid).children(recursive=True)
            pss.append(sum(p.memory_full_info().pss for p in procs) / (1024 * 1024))
        for s in idle:
            await s.close()
        await sb.close()

        # sustained: create, first result, retire, for rate_s seconds (slot preparation counts)
        made = 0
        end = time.perf_counter() + rate_s
        began = time.perf_counter()
        while time.perf_counter() < end:
            s = await SandboxProcess.start(f"rate-{made}", config(), code, pool=pool)
            await s.invoke("r", b"{}", False)
            await s.close()
            made += 1
        rate = made / (time.perf_counter() - began)
        return {"cold": cold, "unprepared": unprepared, "networked": networked, "warm": warm,
                "after_idle": after_idle, "pss": pss, "rate": rate, "caps": caps,
                "network": network.details()["with_network"]}
    finally:
        await pool.close()
        zygote.close()
        network.close()
        if cgroups is not None:
            cgroups.close()  # the flint-bench-<pid> parents too


def fresh_python(code: Path, n: int) -> list[float]:
    """The runtime started the usual way: a new interpreter, its imports, the handler, one invoke."""
    import msgpack

    out = []
    frame = msgpack.packb({"t": "invoke", "id": "r", "deadline_ms": int(time.time() * 1000) + 3000,
                           "payload": b'{"n": 1}', "log_tail": False}, use_bin_type=True)
    for _ in range(n):
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", str(BOOTSTRAP), "handler.handle"], cwd=code,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _read_frame(proc.stdout)  # ready
        proc.stdin.write(len(frame).to_bytes(4, "big") + frame)
        proc.stdin.flush()
        _read_frame(proc.stdout)
        out.append((time.perf_counter() - began) * 1000)
        proc.stdin.close()
        proc.wait()
    return out


def bwrap(code: Path, n: int) -> list[float] | None:
    """bubblewrap launching the same handler in new namespaces, the host root read-only (the code goes under its
    /tmp tmpfs: bwrap cannot make /var/task on a read-only root)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    script = "import sys, json; sys.path.insert(0, '/tmp/task'); import handler; " \
             "print(json.dumps(handler.handle({'n': 1}, None)))"
    out = []
    for _ in range(n):
        began = time.perf_counter()
        result = subprocess.run(
            [exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--tmpfs", "/tmp", "--ro-bind", str(code), "/tmp/task", "--chdir", "/tmp/task",
             sys.executable, "-I", "-c", script],
            capture_output=True, text=True,
        )
        out.append((time.perf_counter() - began) * 1000)
        if result.returncode != 0:
            return None
    return out


def _read_frame(stream) -> bytes:
    n = int.from_bytes(stream.read(4), "big")
    return stream.read(n)


def main() -> None:
    args = parser(__doc__, "fewer samples; finishes in under a minute").parse_args()
    n_cold, n_warm, n_idle, n_base, rate_s = (100, 2000, 30, 20, 3.0) if args.quick else (500, 20000, 200, 60, 10.0)

    base = Path(tempfile.mkdtemp(prefix="flint-bench-sandbox-"))
    code = echo_code(base / "code")
    for p in (base, code):
        p.chmod(0o755)
    try:
        res = uvloop.run(flint(code, base / "run", n_cold, n_warm, n_idle, rate_s))
        fresh = fresh_python(code, n_base)
        bw = bwrap(code, n_base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    caps: iso.Capabilities = res["caps"]
    out = {
        "benchmark": "sandbox",
        "quick": args.quick,
        "isolation": caps.label(),
        "isolation_applied": caps.details()["applied"],
        "cold_p50_ms": p50(res["cold"], 2),
        "cold_p99_ms": p99(res["cold"], 2),
        "cold_unprepared_p50_ms": p50(res["unprepared"], 2),
        "cold_unprepared_p99_ms": p99(res["unprepared"], 2),
        "network_cold_p50_ms": p50(res["networked"], 2) if res["networked"] else None,
        "network_cold_p99_ms": p99(res["networked"], 2) if res["networked"] else None,
        "network": res["network"],
        "fresh_python_cold_p50_ms": p50(fresh, 2),
        "fresh_python_cold_p99_ms": p99(fresh, 2),
        "bwrap_cold_p50_ms": p50(bw, 2) if bw else None,
        "bwrap_cold_p99_ms": p99(bw, 2) if bw else None,
        "warm_overhead_p50_us": p50(res["warm"], 1),
        "warm_overhead_p99_us": p99(res["warm"], 1),
        "warm_after_idle_p50_us": p50(res["after_idle"], 1),
        "warm_after_idle_p99_us": p99(res["after_idle"], 1),
        "idle_pss_mib": round(sum(res["pss"]) / len(res["pss"]), 2),
        "sandboxes_per_s": round(res["rate"], 1),
        "targets": TARGETS,
        "cores": CORES,
    }
    out["meets_targets"] = (
        caps.full
        and out["cold_p50_ms"] <= TARGETS["cold_p50_ms"] and out["cold_p99_ms"] <= TARGETS["cold_p99_ms"]
        and out["warm_overhead_p50_us"] <= TARGETS["warm_overhead_p50_us"]
        and out["idle_pss_mib"] <= TARGETS["idle_pss_mib"]
    )
    print_result(out)


if __name__ == "__main__":
    main()
