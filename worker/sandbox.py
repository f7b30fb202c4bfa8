"""Sandboxes as the worker sees them: forks of a zygote, isolated before tenant code runs, one invoke at a time.

`Zygote` starts and talks to the zygote process (worker/zygote.py). `SandboxProcess` is one sandbox: it asks
the zygote for a fork, holds the control channel, enforces the timeout, and turns every way a sandbox can end
(exception, timeout, exit, out of memory, stray processes) into the Lambda error a tenant expects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import site
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog

from wire import messages as m
from worker import isolation as iso
from worker.cgroups import Cgroups, SandboxCgroup

log = structlog.get_logger("worker.sandbox")

ZYGOTE = str(Path(__file__).with_name("zygote.py"))
INIT_TIMEOUT_S = 10.0  # Lambda allows 10 s of init
LOG_TAIL_BYTES = 4096
SYSTEM_BINDS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/etc")
UID_BASE = 100_000  # sandboxes run as uids UID_BASE.. UID_BASE+UID_SPAN, one per live sandbox
UID_SPAN = 50_000


def runtime_binds() -> list[str]:
    """The system and this interpreter's install (stdlib, site-packages), bound read-only into every sandbox."""
    paths = list(SYSTEM_BINDS)
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}:
        p = os.path.realpath(p)
        if not any(p == b or p.startswith(b + "/") for b in paths):
            paths.append(p)
    return paths


@dataclasses.dataclass
class Outcome:
    payload: bytes
    function_error: str | None = None  # "Unhandled" when the handler, the runtime or the sandbox failed
    log: str | None = None
    alive: bool = True  # False: the sandbox is gone and must not be reused


class Zygote:
    """The worker's end of one zygote process."""

    def __init__(self, caps: iso.Capabilities, cores: int):
        self.caps = caps
        self.cores = cores
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._spawned: dict[str, asyncio.Future] = {}
        self.exits: dict[str, asyncio.Future] = {}
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
                log.error("zygote.exited", returncode=self.proc.poll() if self.proc else None)
                for fut in [*self._spawned.values(), *self.exits.values()]:
                    if not fut.done():
                        fut.set_result(None)
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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def spawn(self, request: dict[str, Any], fds: list[int]) -> int:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        sandbox_id = request["id"]
        self._spawned[sandbox_id] = loop.create_future()
        self.exits[sandbox_id] = loop.create_future()
        data = msgpack.packb(request, use_bin_type=True)
        async with self._lock:
            while True:
                try:
                    socket.send_fds(self.sock, [data], fds)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        pid = await asyncio.wait_for(self._spawned[sandbox_id], 10.0)
        if pid is None:
            raise RuntimeError("the zygote died")
        return pid

    def forget(self, sandbox_id: str) -> None:
        self.exits.pop(sandbox_id, None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.sock is not None:
            self.sock.close()


@dataclasses.dataclass
class Slot:
    """A sandbox prepared ahead of need: cgroups joined, namespaces entered, root filesystem built; waiting on
    its channel for a function."""

    slot_id: str
    run_dir: Path
    network: bool
    cgroup: SandboxCgroup | None
    pid: int = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None


class SlotPool:
    """Keeps `size` slots without network ready, so a cold start only binds code, pivots and drops privileges;
    a slot with network (rare) is prepared when asked for."""

    _seq = itertools.count()

    def __init__(self, zygote: Zygote, cgroups: Cgroups | None, run_root: Path, *, size: int = 4,
                 pids_max: int = 64, tmp_mb: int = 64):
        self.zygote = zygote
        self.cgroups = cgroups if (cgroups is not None and cgroups.available and zygote.caps.root) else None
        self.run_root = run_root
        self.size = size
        self.pids_max = pids_max
        self.tmp_mb = tmp_mb
        self.ready: list[Slot] = []
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task | None = None

    @property
    def isolated(self) -> bool:
        return self.zygote.caps.root and self.zygote.caps.namespaces

    def start(self) -> None:
        self._filler = asyncio.get_running_loop().create_task(self._fill(), name="slot-pool")
        self._wanted.set()

    async def _fill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self.ready) < self.size:
                try:
                    self.ready.append(await self.prepare(network=False))
                except Exception:
                    log.exception("slot.prepare_failed")
                    await asyncio.sleep(1.0)
                    break

    async def take(self, network: bool) -> Slot:
        while not network and self.ready:
            slot = self.ready.pop()
            self._wanted.set()
            if self.zygote.exits.get(slot.slot_id) is not None and not self.zygote.exits[slot.slot_id].done():
                return slot
            await self.discard(slot)  # died while waiting (zygote restart)
        self._wanted.set()
        return await self.prepare(network=network)

    async def prepare(self, network: bool) -> Slot:
        slot_id = f"slot-{os.getpid()}-{next(self._seq)}"
        run_dir = self.run_root / slot_id
        run_dir.mkdir(parents=True, exist_ok=True)
        cgroup = (self.cgroups.create(slot_id, 128, self.pids_max, self.zygote.cores, quota_now=False)
                  if self.cgroups else None)
        slot = Slot(slot_id, run_dir, network, cgroup)
        log_fd = os.open(run_dir / "log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)  # RDWR: the runtime reads its tail
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = {
            "id": slot_id,
            "root_dir": str(run_dir / "root"),
            "binds": runtime_binds(),
            "network": network,
            "uid": UID_BASE + next(self._seq) % UID_SPAN,
            "tmp_mb": self.tmp_mb,
            "pids_max": self.pids_max,
            "cgroup_procs": cgroup.procs_files if cgroup else [],
        }
        try:
            slot.pid = await self.zygote.spawn(request, [theirs.fileno(), log_fd])
        finally:
            theirs.close()
            os.close(log_fd)
        slot.reader, slot.writer = await asyncio.open_unix_connection(sock=ours)
        return slot

    async def discard(self, slot: Slot) -> None:
        if slot.writer is not None:
            slot.writer.close()  # an unassigned slot exits when its channel closes
        fut = self.zygote.exits.get(slot.slot_id)
        if slot.pid and fut is not None and not fut.done():
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except asyncio.TimeoutError:
                pass
        self.zygote.forget(slot.slot_id)
        if slot.cgroup is not None:
            slot.cgroup.kill_all()
            await _remove_cgroup(slot.cgroup)
        shutil.rmtree(slot.run_dir, ignore_errors=True)

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
        slots, self.ready = self.ready, []
        await asyncio.gather(*(self.discard(s) for s in slots), return_exceptions=True)


class SandboxProcess:
    def __init__(self, sandbox_id: str, config: m.FunctionConfig, slot: Slot, pool: SlotPool):
        self.sandbox_id = sandbox_id
        self.config = config
        self.slot = slot
        self.pool = pool
        self.zygote = pool.zygote
        self.run_dir = slot.run_dir
        self.log_path = slot.run_dir / "log"
        self.cgroup = slot.cgroup
        self.pid = slot.pid
        self.reader = slot.reader
        self.writer = slot.writer
        self.init_error: dict[str, Any] | None = None
        self.init_ms = 0.0
        self.baseline_pids = 1  # the runtime itself: pid 1 of its namespace; anything more is a stray

    @classmethod
    async def start(cls, sandbox_id: str, config: m.FunctionConfig, code_dir: Path, *, pool: SlotPool) -> SandboxProcess:
        """A cold start: take a prepared slot, give it the function's limits and code, wait until it is ready."""
        began = time.perf_counter()
        slot = await pool.take(config.network)
        sandbox = cls(sandbox_id, config, slot, pool)
        if slot.cgroup is not None:
            slot.cgroup.configure(config.memory_mb)
        tmp = "/tmp" if pool.isolated else str(slot.run_dir / "tmp")
        if not pool.isolated:
            os.makedirs(tmp, exist_ok=True)
        sandbox._write({"t": "assign", "runtime": config.runtime, "handler": config.handler,
                        "code_dir": str(code_dir), "env": sandbox_environment(sandbox_id, config, tmp),
                        "memory_mb": config.memory_mb})
        if config.runtime == "python3":
            try:
                first = await asyncio.wait_for(sandbox._read(), INIT_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
                timed_out = sandbox.alive
                sandbox.kill()
                first = {"t": "init_error", "error": {
                    "errorType": "Sandbox.Timedout" if timed_out else "Runtime.ExitError",
                    "errorMessage": "the runtime hung during init (10 s)" if timed_out
                    else "the runtime exited during init; see the log tail",
                }}
            if first.get("t") != "ready":
                sandbox.init_error = first.get("error") or {"errorType": "Runtime.Unknown", "errorMessage": repr(first)}
        if slot.cgroup is not None:
            slot.cgroup.limit_cpu(config.memory_mb, pool.zygote.cores)
        sandbox.init_ms = (time.perf_counter() - began) * 1000
        return sandbox

    @property
    def alive(self) -> bool:
        fut = self.zygote.exits.get(self.slot.slot_id)
        return fut is not None and not fut.done()

    # --- invoke --------------------------------------------------------------------------------------------------

    async def invoke(self, request_id: str, payload: bytes, log_tail: bool, max_s: float | None = None) -> Outcome:
        """Run one invoke; killed at the function's timeout, or sooner at `max_s` (the admission bound)."""
        timeout_s = self.config.timeout_s if max_s is None else min(self.config.timeout_s, max_s)
        deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
        if self.init_error is not None:
            self.kill()
            return self._failure(dict(self.init_error), log_tail)
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per invoke, unlike wait_for
                if self.config.runtime == "provided":
                    reply = await self._custom(request_id, deadline_ms, payload)
                else:
                    self._write({"t": "invoke", "id": request_id, "deadline_ms": deadline_ms, "payload": payload,
                                 "log_tail": log_tail})
                    reply = await self._read()
        except TimeoutError:
            self.kill()
            return self._timed_out(request_id, timeout_s, log_tail)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            if time.time() * 1000 >= deadline_ms:  # it ended itself at its deadline (bootstrap OVERRUN_GRACE_S)
                self.kill()
                return self._timed_out(request_id, timeout_s, log_tail)
            status = await self._exit_status()
            oom = self.cgroup is not None and self.cgroup.oom_killed()
            return self._failure({
                "errorType": "Runtime.OutOfMemory" if oom else "Runtime.ExitError",
                "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: {status}"
                + (f" (out of memory: the function used all of its {self.config.memory_mb} MB)" if oom else ""),
            }, log_tail)
        tail = reply.get("log") if log_tail else None
        if self.config.runtime == "provided" and log_tail:
            tail = self.read_log_tail()
        stray = self.cgroup is not None and len(self.cgroup.pids()) > self.baseline_pids
        if reply.get("t") == "result":
            return Outcome(reply.get("payload") or b"null", None, tail, alive=not stray)
        if reply.get("retire"):
            self.kill()
        return Outcome(_json(reply.get("error") or {}), "Unhandled", tail, alive=not stray and not reply.get("retire"))

    async def _custom(self, request_id: str, deadline_ms: int, payload: bytes) -> dict[str, Any]:
        """The custom runtime protocol: one line in, one line out (README, Custom runtimes)."""
        assert self.writer is not None and self.reader is not None
        event = (payload or b"{}").decode().replace("\n", " ")
        self.writer.write(f"{request_id} {deadline_ms} {event}\n".encode())
        line = (await self.reader.readline()).decode(errors="replace").rstrip("\n")
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        kind, _, rest = line.partition(" ")
        if kind == "RESULT":
            return {"t": "result", "payload": (rest or "null").encode()}
        if kind == "ERROR":
            error_type, _, message = rest.partition(" ")
            return {"t": "error", "error": {"errorType": error_type or "Unhandled", "errorMessage": message}}
        if kind == "INIT_ERROR":
            error_type, _, message = rest.partition(" ")
            self.kill()
            raise_init = {"errorType": error_type, "errorMessage": message}
            return {"t": "error", "error": raise_init}
        return {"t": "error", "error": {"errorType": "Runtime.InvalidResponse",
                                        "errorMessage": f"the runtime answered {line[:200]!r}; expected RESULT or ERROR"}}

    def _timed_out(self, request_id: str, timeout_s: float, log_tail: bool) -> Outcome:
        return self._failure({
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"RequestId: {request_id} Error: Task timed out after {timeout_s:.2f} seconds",
        }, log_tail)

    def _failure(self, error: dict[str, Any], log_tail: bool) -> Outcome:
        return Outcome(_json(error), "Unhandled", self.read_log_tail() if log_tail else None, alive=False)

    async def _exit_status(self) -> str:
        fut = self.zygote.exits.get(self.slot.slot_id)
        code = None
        if fut is not None:
            try:
                code = await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except asyncio.TimeoutError:
                self.kill()
                return "the runtime stopped answering"
        if code is None:
            return "the runtime exited"
        if code < 0:
            return f"signal: {signal.Signals(-code).name.lower().removeprefix('sig')}"
        return f"exit status {code}"

    def read_log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _write(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        body = msgpack.packb(msg, use_bin_type=True)
        self.writer.write(struct.pack(">I", len(body)) + body)

    async def _read(self) -> dict[str, Any]:
        assert self.reader is not None
        head = await self.reader.readexactly(4)
        (n,) = struct.unpack(">I", head)
        if n > 16 * 1024 * 1024:
            raise ValueError("sandbox sent an oversized frame")
        msg = msgpack.unpackb(await self.reader.readexactly(n), raw=False)
        if not isinstance(msg, dict):
            raise ValueError("sandbox sent a malformed frame")
        return msg

    # --- ending --------------------------------------------------------------------------------------------------

    def kill(self) -> None:
        if self.pid and self.alive:
            try:
                os.kill(self.pid, signal.SIGKILL)  # the pid namespace's init dies with it, and so does all inside
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def close(self) -> None:
        await self.pool.discard(self.slot)


async def _remove_cgroup(cgroup: SandboxCgroup) -> None:
    for _ in range(50):  # the kernel frees a cgroup once its last task is reaped
        cgroup.remove()
        if not any(d.exists() for d in cgroup.dirs):
            return
        await asyncio.sleep(0.01)


def sandbox_environment(sandbox_id: str, config: m.FunctionConfig, tmp: str) -> dict[str, str]:
    """Only what a Lambda function would see: nothing of the node's own environment leaks in."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "HOME": tmp,
        "TMPDIR": tmp,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "LAMBDA_TASK_ROOT": "/var/task",
        "AWS_LAMBDA_FUNCTION_NAME": config.name,
        "AWS_LAMBDA_FUNCTION_VERSION": config.version,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.memory_mb),
        "FLINT_SANDBOX_ID": sandbox_id,
    }
    for key, value in config.environment.items():
        env.setdefault(key, value)
    return env


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()
