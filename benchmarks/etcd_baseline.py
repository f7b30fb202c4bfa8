"""Baseline for Flint's concurrency admission: a shared counter in a local 3-member etcd cluster.

    python benchmarks/etcd_baseline.py

ADMIT increments one counter key under optimistic concurrency (range, then a txn that compares the key's
mod_revision and puts value+1 if value < limit, retrying on a failed compare); RELEASE decrements it the same way.
The members listen on their own loopback addresses and keep their data on tmpfs (/dev/shm). Requires etcd >= 3.4
(the v3 JSON gateway on the client port) and aiohttp. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import uvloop

from _common import p99, print_result

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
MEMBERS = 3


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


class EtcdCluster:
    """Three etcd members on base_ip, base_ip+1, base_ip+2, data and logs in a fresh tmpfs dir."""

    def __init__(self, base_ip: str = "127.88.0.1", data_root: str | None = None, startup_timeout_s: float = 30.0):
        base = ipaddress.IPv4Address(base_ip)
        self.ips = [str(base + i) for i in range(MEMBERS)]
        for ip in self.ips:
            if not ipaddress.IPv4Address(ip).is_loopback:
                raise ValueError(f"{ip} is not a loopback address")
        self.names = [f"m{i}" for i in range(MEMBERS)]
        self.endpoints = [f"http://{ip}:{CLIENT_PORT}" for ip in self.ips]
        self.peer_urls = [f"http://{ip}:{PEER_PORT}" for ip in self.ips]
        self.data_root = data_root
        self.startup_timeout_s = startup_timeout_s
        self.root: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def __enter__(self) -> EtcdCluster:
        parent = self.data_root or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.root = Path(tempfile.mkdtemp(prefix="flint-etcd-", dir=parent))
        try:
            self._check_ports_free()
            self._start()
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for f in self._logs:
            f.close()
        self._logs = []
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _check_ports_free(self) -> None:
        # Otherwise a leftover etcd on these addresses would answer health checks for members that failed to bind.
        for ip in self.ips:
            for port in (CLIENT_PORT, PEER_PORT):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    # As etcd does: TIME_WAIT leftovers from an earlier run are fine, a live listener is not.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((ip, port))
                    except OSError as e:
                        raise RuntimeError(f"cannot start etcd: {ip}:{port} is in use ({e}); another etcd?") from e

    def _start(self) -> None:
        assert self.root is not None
        initial_cluster = ",".join(f"{n}={u}" for n, u in zip(self.names, self.peer_urls))
        token = f"flint-bench-{uuid.uuid4().hex}"
        # ETCD_* variables from the caller's environment would silently override the flags below.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        for name, client, peer in zip(self.names, self.endpoints, self.peer_urls):
            log = open(self.root / f"{name}.log", "wb")
            self._logs.append(log)
            cmd = [
                ETCD,
                "--name", name,
                "--data-dir", str(self.root / name),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial_cluster,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--logger", "zap",
                "--log-level", "warn",
            ]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            self.procs.append(proc)

    def _log_tail(self, i: int, lines: int = 10) -> str:
        assert self.root is not None
        try:
            text = (self.root / f"{self.names[i]}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "not yet polled"
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {self.names[i]} ({self.ips[i]}) exited with code {p.returncode}:\n"
                        f"{self._log_tail(i)}"
                    )
            try:
                for ep in self.endpoints:
                    with urllib.request.urlopen(f"{ep}/health", timeout=2) as r:
                        body = json.loads(r.read())
                    if body.get("health") != "true":
                        raise RuntimeError(f"{ep}/health: {body}")
                put = json.dumps({"key": b64("flint-bench/health"), "value": b64("ok")}).encode()
                req = urllib.request.Request(f"{self.endpoints[0]}/v3/kv/put", data=put, method="POST")
                with urllib.request.urlopen(req, timeout=2) as r:
                    json.loads(r.read())
                if all(p.poll() is None for p in self.procs):
                    return
            except (OSError, RuntimeError, ValueError) as e:  # URLError and HTTPError are OSErrors
                last_error = str(e)
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self._log_tail(i)}" for i, n in enumerate(self.names))
        raise RuntimeError(
            f"etcd cluster at {self.endpoints} not healthy after {self.startup_timeout_s:.0f} s "
            f"(last error: {last_error})\n{logs}"
        )


class _Counter:
    """Optimistic-concurrency increments/decrements of one key through the v3 JSON gateway of one member."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, key: str):
        self.session = session
        self.range_url = f"{endpoint}/v3/kv/range"
        self.txn_url = f"{endpoint}/v3/kv/txn"
        self.key = b64(key)

    async def _post(self, url: str, body: dict) -> dict:
        async with self.session.post(url, json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"{url}: HTTP {r.status}: {data}")
            return data

    @staticmethod
    def _state(range_response: dict) -> tuple[int, int]:
        """(value, mod_revision) from a range response; (0, 0) when the key is absent."""
        kvs = range_response.get("kvs")
        if not kvs:
            return 0, 0
        kv = kvs[0]
        value = int(base64.b64decode(kv.get("value", "")) or b"0")
        return value, int(kv.get("mod_revision", 0))

    async def add(self, delta: int, limit: int) -> tuple[bool, int]:
        """Apply delta unless the new value would exceed limit; returns (applied, compare failures)."""
        value, mod = self._state(await self._post(self.range_url, {"key": self.key}))
        retries = 0
        while True:
            if delta > 0 and value + delta > limit:
                return False, retries
            if mod == 0:
                compare = {"key": self.key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            else:
                compare = {"key": self.key, "target": "MOD", "result": "EQUAL", "mod_revision": str(mod)}
            txn = {
                "compare": [compare],
                "success": [{"request_put": {"key": self.key, "value": b64(str(value + delta))}}],
                # The failure branch returns the current value, so a retry costs one round trip, not two.
                "failure": [{"request_range": {"key": self.key}}],
            }
            resp = await self._post(self.txn_url, txn)
            if resp.get("succeeded"):
                return True, retries
            retries += 1
            value, mod = self._state(resp["responses"][0]["response_range"])


async def etcd_admissions(
    endpoints: list[str],
    callers: int,
    duration_s: float,
    limit: int = 1000_000,
    key: str = "flint-bench/counter",
) -> dict:
    """callers tasks, round-robin over endpoints, each repeating ADMIT then RELEASE until duration_s has passed."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=callers, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        counters = [_Counter(session, endpoints[i % len(endpoints)], key) for i in range(callers)]
        async with session.post(f"{endpoints[0]}/v3/kv/put", json={"key": b64(key), "value": b64("0")}) as r:
            r.raise_for_status()

        latencies: list[float] = []
        retries = 0
        rejected = 0
        start = time.perf_counter()
        deadline = start + duration_s

        async def caller(counter: _Counter) -> None:
            nonlocal retries, rejected
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                admitted, n = await counter.add(+1, limit)
                retries += n
                if not admitted:
                    rejected += 1
                    await asyncio.sleep(0)
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                _, n = await counter.add(-1, limit)
                retries += n

        await asyncio.gather(*(caller(c) for c in counters))
        elapsed = time.perf_counter() - start

    n = len(latencies)
    return {
        "callers": callers,
        "admissions": n,
        "elapsed_s": round(elapsed, 3),
        "admissions_per_s": round(n / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 3) if latencies else None,
        "p99_ms": p99(latencies, 3) if latencies else None,
        "retries": retries,
        "rejected": rejected,
    }


async def _run_all(endpoints: list[str], caller_counts: list[int], duration_s: float) -> dict:
    results = {}
    for callers in caller_counts:
        res = await etcd_admissions(endpoints, callers, duration_s)
        print(
            f"etcd admit+release, {callers:>3} callers: {res['admissions_per_s']:>8.1f} admissions/s, "
            f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, {res['retries']} compare failures",
            flush=True,
        )
        results[f"callers_{callers}"] = res
    return results


def main() -> None:
    with EtcdCluster() as cluster:
        print(f"etcd {ETCD}: 3 members at {', '.join(cluster.endpoints)}, data in {cluster.root}", flush=True)
        results = uvloop.run(_run_all(cluster.endpoints, [1, 8, 64], 3.0))
    print_result({"benchmark": "etcd_admission_baseline", "endpoints": cluster.endpoints, "results": results})


if __name__ == "__main__":
    main()
