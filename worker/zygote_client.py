"""The worker's end of the zygote: starts the zygote process, asks it for forks, hears when they exit.

This is the client, running in the worker. The zygote itself, the process it talks to, is worker/zygote.py;
what a fork becomes is in worker/zygote.py (isolation) and worker/bootstrap.py (the Python runtime).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import structlog

from worker import isolation as iso

log = structlog.get_logger("worker.zygote")

ZYGOTE = str(Path(__file__).with_name("zygote.py"))
SPAWN_TIMEOUT_S = 10.0  # wire.config.Settings.zygote_spawn_timeout_s


class ZygoteLost(RuntimeError):
    """The zygote died, or stopped answering: the worker replaces it (and its slots)."""


class Zygote:
    """The worker's end of one zygote process."""

    def __init__(self, caps: iso.Capabilities, cores: int, spawn_timeout_s: float = SPAWN_TIMEOUT_S):
        self.caps = caps
        self.cores = cores
        self.spawn_timeout_s = spawn_timeout_s
        self.lost: str | None = None  # why this zygote is no use any more, once it is not
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._spawned: dict[str, asyncio.Future] = {}
        self.exits: dict[str, asyncio.Future] = {}  # child id -> its exit status (None: the zygote died)
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"fd": theirs.fileno(), "worker_pid": os.getpid(), "isolate": self.caps.root and self.caps.namespaces,
                  "seccomp": self.caps.seccomp}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", ZYGOTE, json.dumps(config)], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="zygote-read")

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                returncode = self.proc.poll() if self.proc else None
                log.error("zygote.exited", returncode=returncode)
                self.lost = self.lost or f"it exited ({returncode})"
                self._forget_children()
                return
            msg = msgpack.unpackb(data, raw=False)
            if msg["t"] == "spawned":
                fut = self._spawned.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["pid"])
            elif msg["t"] == "exited":
                fut = self.exits.get(msg["id"])
                if fut is not None and not fut.done():
                    fut.set_result(msg["status"])

    def _forget_children(self) -> None:
        """The zygote is gone: no fork will be answered, no exit reported; whoever waits hears None."""
        for fut in [*self._spawned.values(), *self.exits.values()]:
            if not fut.done():
                fut.set_result(None)

    @property
    def alive(self) -> bool:
        """Running and answering: a zygote that let a spawn go unanswered is as good as dead."""
        return self.lost is None and self.proc is not None and self.proc.poll() is None

    def running(self, child_id: str) -> bool:
        """Forked and not yet reported exited: until then its pid is still its own, and safe to signal."""
        fut = self.exits.get(child_id)
        return fut is not None and not fut.done()

    async def spawn(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork a slot; its pid. Raises ZygoteLost if the zygote is gone or does not answer in time (it is then
        killed, and `alive` is False)."""
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        if self.lost is not None:
            raise ZygoteLost(self.lost)
        child_id = request["id"]
        spawned = self._spawned[child_id] = loop.create_future()
        self.exits[child_id] = loop.create_future()
        data = msgpack.packb(request, use_bin_type=True)
        try:
            async with asyncio.timeout(self.spawn_timeout_s):
                async with self._lock:
                    while True:
                        try:
                            socket.send_fds(self.sock, [data], fds)
                            break
                        except BlockingIOError:
                            await asyncio.sleep(0.001)
                pid = await spawned
        except TimeoutError:
            self._give_up(f"it did not answer a spawn within {self.spawn_timeout_s:g} s")
            pid = None
        except OSError as exc:  # its end of the socket is gone
            self._give_up(f"its socket failed ({exc.strerror})")
            pid = None
        if pid is None:
            self._spawned.pop(child_id, None)
            self.exits.pop(child_id, None)
            raise ZygoteLost(self.lost or "it exited")
        return pid

    def _give_up(self, why: str) -> None:
        """Alive but stuck (a hung signal handler, a stopped process): kill it; the worker starts another."""
        if self.lost is None:
            self.lost = why
            log.error("zygote.unresponsive", why=why, pid=self.proc.pid if self.proc else None)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def forget(self, child_id: str) -> None:
        self.exits.pop(child_id, None)

    def close(self) -> None:
        self.lost = self.lost or "it was closed"
        if self._reader is not None:
            self._reader.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.sock is not None:
            self.sock.close()
        self._forget_children()  # they die with it (parent-death signal): nobody waits for their exit reports
