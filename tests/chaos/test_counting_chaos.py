"""Counting under fire, on real processes: three frontends admit and release under load while the counting
leader and a frontend are SIGKILLed and SIGSTOPped. The workers record each execution's start and end on the
machine's monotonic clock. Checked: at no instant more executions than the limit; after the storm every credit
is back within the ledger's bound; the counting replicas agree on the ledger."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
import uvloop

from flint.client import AsyncClient, ClientConfig
from tests.conftest import dump_logs, start_region
from tests.support.cluster import executions, leader_of
from wire import messages as m
from wire.errors import FlintError, TooManyRequestsException
from wire.keys import KeyPair

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

LIMIT = 6
LEASE_S = 2.0
TIMEOUT_S = 1.0
ALLOWANCE_S = 3.0
SETTINGS = {"record_executions": True, "credit_lease_s": LEASE_S, "cold_start_allowance_s": ALLOWANCE_S}
SLEEPER = "import time\n\ndef handle(event, context):\n    time.sleep(event['ms'] / 1000)\n    return event['ms']\n"
CONTROL = ["n1", "n2", "n3"]
FRONTENDS = ["n4", "n5", "n6"]


class Load:
    """Callers pinned to each frontend, invoking without client retries, until stopped."""

    def __init__(self, region, callers_per_frontend: int = 5):
        self.region = region
        self.callers = callers_per_frontend
        self.outcomes: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: uvloop.run(self._main()), daemon=True)

    async def _main(self):
        cfg = ClientConfig.load(self.region.root)
        key = KeyPair.load(cfg.key_file)
        clients = {
            fe: AsyncClient([ep], server_key=cfg.server_key, key=key, timeout_s=4.0, retries=0)
            for fe, ep in zip(FRONTENDS, cfg.endpoints)
        }

        async def caller(fe: str, client: AsyncClient) -> None:
            rnd = random.Random(f"{fe}{id(client)}")
            while not self.stop.is_set():
                try:
                    await client.invoke("sleeper", {"ms": rnd.randint(50, 300)})
                    self.outcomes[(fe, "ok")] += 1
                except TooManyRequestsException:
                    self.outcomes[(fe, "throttled")] += 1
                    await asyncio.sleep(0.02)
                except FlintError as err:
                    self.outcomes[(fe, f"{err.type_name}:{err.reason}")] += 1
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(caller(fe, c) for fe, c in clients.items() for _ in range(self.callers)))
        for c in clients.values():
            c.close()


def concurrency_changes(region, killed_at: dict[str, float]) -> list[tuple[float, int]]:
    """(time, +1/-1) for every execution in the workers' journals; one with no end ended when its node was killed."""
    changes = []
    for e in executions(region, nodes=FRONTENDS):
        changes.append((e.started, 1))
        changes.append((e.ended if e.ended is not None else killed_at.get(e.node, float("inf")), -1))
    return sorted(changes)


def test_the_limit_holds_through_leader_and_frontend_failures(tmp_path, report):
    region = start_region(tmp_path, nodes=6, azs=3, settings=SETTINGS, layout="dedicated")
    load = Load(region)
    killed_at: dict[str, float] = {}
    try:
        region.call("counting", m.SetLimit(tenant="default", limit=LIMIT))
        code = tmp_path / "sleeper"
        code.mkdir()
        (code / "handler.py").write_text(SLEEPER)
        from flint import Client

        with Client.from_region(region.root) as client:
            client.create_function("sleeper", code=code, handler="handler.handle", timeout_s=TIMEOUT_S)

        load.thread.start()
        time.sleep(2.5)

        victim = leader_of(region, "counting", nodes=CONTROL)
        assert victim is not None
        region.kill_node(victim)  # the counting leader, SIGKILL
        time.sleep(2.5)

        os.kill(region.pid("n4"), signal.SIGSTOP)  # a frontend (and its worker) frozen past its lease
        time.sleep(2.5)
        os.kill(region.pid("n4"), signal.SIGCONT)
        time.sleep(1.5)

        paused_leader = leader_of(region, "counting", nodes=CONTROL)
        if paused_leader is not None:
            os.kill(region.pid(paused_leader), signal.SIGSTOP)  # the new leader, frozen
            time.sleep(1.5)
            os.kill(region.pid(paused_leader), signal.SIGCONT)
        time.sleep(1.5)

        killed_at["n5"] = time.monotonic()
        region.kill_node("n5")  # a frontend, SIGKILL, with executions in flight
        time.sleep(2.5)
        load.stop.set()
        load.thread.join(15)
        storm_over = time.monotonic()

        # 1. at no instant more executions than the limit
        running = peak = 0
        for _, delta in concurrency_changes(region, killed_at):
            running += delta
            peak = max(peak, running)
        report(f"peak concurrency {peak} (limit {LIMIT}); outcomes {dict(load.outcomes)}")
        assert peak <= LIMIT, f"{peak} executions ran at once under a limit of {LIMIT}"
        ok = {fe: load.outcomes[(fe, "ok")] for fe in FRONTENDS}
        total = sum(ok.values())
        assert total > 50, load.outcomes
        # fair sharing: no frontend starves while another holds the limit (n5 dies early, so it is not counted)
        assert min(ok["n4"], ok["n6"]) >= 0.15 * total, load.outcomes
        assert peak >= LIMIT - 1, "the load should have pressed against the limit"

        # 2. every credit back within the bound: lease + longest timeout + cold-start allowance (+ idle return)
        region.start_node(victim)
        bound = LEASE_S + TIMEOUT_S + ALLOWANCE_S + 2.0
        held = None
        while time.monotonic() < storm_over + bound + 5.0:
            status = region.call("counting", m.CountingStatus(tenant="default"), timeout_s=2.0)
            held = sum(p.held for p in status.tenants["default"].pools.values())
            if held == 0:
                break
            time.sleep(0.25)
        assert held == 0, f"{held} credits still held {time.monotonic() - storm_over:.1f}s after the storm"
        assert time.monotonic() - storm_over <= bound + 5.0

        # 3. the replicas, the restarted one included, agree on the ledger
        digests: dict[str, str] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            digests = {}
            for node in CONTROL:
                try:
                    s = region.call("counting", m.CountingStatus(tenant="default"), node=node, timeout_s=1.0)
                    digests[node] = (s.digest, s.raft.commit_idx)
                except FlintError:
                    pass
            if len(digests) == 3 and len(set(digests.values())) == 1:
                break
            time.sleep(0.3)
        assert len(digests) == 3 and len(set(digests.values())) == 1, digests
    except Exception:
        dump_logs(region, 15)
        raise
    finally:
        load.stop.set()
        for node in FRONTENDS + CONTROL:
            pid = region.pid(node)
            if pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        region.down()
