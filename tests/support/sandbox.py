"""Real sandboxes without a region: a zygote and a slot pool on their own event loop thread, as a worker runs
them (tests/integration/test_sandbox.py, tests/integration/test_sandbox_attacks.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from pathlib import Path

import pytest
import uvloop

from wire import messages as m
from worker import isolation as iso
from worker.cgroups import host_cgroups
from worker.sandbox import SandboxProcess
from worker.slots import SlotPool
from worker.zygote_client import Zygote

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="full isolation (namespaces, cgroups, uid) needs root")
_harnesses = itertools.count()


class Harness:
    """A zygote and slot pool on their own event loop thread, as a worker runs them."""

    def __init__(self, base: Path, caps: iso.Capabilities | None = None, cgroups: bool = True):
        self.base = base
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # a parent per harness (its start clears what is under it), removed by close()
        self.cgroups = (host_cgroups(f"flint-test-{os.getpid()}-{next(_harnesses)}")
                        if os.geteuid() == 0 and cgroups else None)
        self.caps = caps or iso.probe(self.cgroups)
        self.run(self._start())

    async def _start(self):
        self.zygote = Zygote(self.caps, os.cpu_count() or 1)
        await self.zygote.start()
        self.pool = SlotPool(self.zygote, self.cgroups, self.base / "run", size=2, pids_max=32, tmp_mb=16)
        self.pool.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sandbox(self, code: Path, handler: str, runtime: str = "python3", **config) -> SandboxProcess:
        cfg = m.FunctionConfig(tenant="t", name="fn", handler=handler, runtime=runtime, code_sha256="0" * 64,
                               **config)
        return self.run(SandboxProcess.start(f"sb-{handler}-{os.urandom(3).hex()}", cfg, code, pool=self.pool))

    def invoke(self, sb: SandboxProcess, payload: bytes = b"{}", log_tail: bool = False):
        return self.run(sb.invoke(os.urandom(4).hex(), payload, log_tail))

    def close(self):
        try:
            self.run(self.pool.close())
            self.zygote.close()
        finally:
            if self.cgroups is not None:
                self.cgroups.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
