"""A sandbox as the worker sees it: a process holding one imported handler, one invoke at a time.

This first version isolates by process (own session, parent-death signal, core dumps off, a clean environment
holding only the function's variables). Namespaces, cgroups and seccomp come with the zygote (issue 4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from wire import messages as m

BOOTSTRAP = str(Path(__file__).with_name("bootstrap.py"))
INIT_TIMEOUT_S = 10.0  # Lambda allows 10 s of init
LOG_TAIL_BYTES = 4096
ISOLATION = "process"


@dataclasses.dataclass
class Outcome:
    payload: bytes
    function_error: str | None = None  # "Unhandled" when the handler, the runtime or the sandbox failed
    log: str | None = None
    alive: bool = True  # False: the sandbox is gone and must not be reused


class SandboxProcess:
    def __init__(self, sandbox_id: str, config: m.FunctionConfig, proc: asyncio.subprocess.Process, run_dir: Path):
        self.sandbox_id = sandbox_id
        self.config = config
        self.proc = proc
        self.run_dir = run_dir
        self.log_path = run_dir / "log"
        self.init_error: dict[str, Any] | None = None
        self.init_ms = 0.0

    @classmethod
    async def start(cls, sandbox_id: str, config: m.FunctionConfig, code_dir: Path, run_dir: Path) -> SandboxProcess:
        began = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        log_fd = os.open(run_dir / "log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)  # RDWR: the runtime reads its own tail
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                BOOTSTRAP,
                config.handler,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                cwd=str(code_dir),
                env=sandbox_environment(sandbox_id, config, tmp),
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        sandbox = cls(sandbox_id, config, proc, run_dir)
        try:
            first = await asyncio.wait_for(sandbox._read(), INIT_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            sandbox.kill()
            first = {
                "t": "init_error",
                "error": {
                    "errorType": "Runtime.ExitError" if proc.returncode is not None else "Sandbox.Timedout",
                    "errorMessage": "the runtime exited or hung during init; see the log tail",
                },
            }
        if first.get("t") != "ready":
            sandbox.init_error = first.get("error") or {"errorType": "Runtime.Unknown", "errorMessage": repr(first)}
        sandbox.init_ms = (time.perf_counter() - began) * 1000
        return sandbox

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def invoke(self, request_id: str, payload: bytes, log_tail: bool, max_s: float | None = None) -> Outcome:
        """Run one invoke; killed at the function's timeout, or sooner at `max_s` (the admission bound)."""
        timeout_s = self.config.timeout_s if max_s is None else min(self.config.timeout_s, max_s)
        deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
        if self.init_error is not None:
            self.kill()
            return self._failure(dict(self.init_error), log_tail)
        try:
            self._write({"t": "invoke", "id": request_id, "deadline_ms": deadline_ms, "payload": payload,
                         "log_tail": log_tail})
            reply = await asyncio.wait_for(self._read(), timeout_s)
        except asyncio.TimeoutError:
            self.kill()
            return self._failure(
                {
                    "errorType": "Sandbox.Timedout",
                    "errorMessage": f"RequestId: {request_id} Error: Task timed out after {timeout_s:.2f} seconds",
                },
                log_tail,
            )
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError, ValueError):
            status = await self._exit_status()
            return self._failure(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: {status}",
                },
                log_tail,
            )
        log = reply.get("log") if log_tail else None
        if reply.get("t") == "result":
            return Outcome(reply.get("payload") or b"null", None, log)
        return Outcome(_json(reply.get("error") or {}), "Unhandled", log)

    def _failure(self, error: dict[str, Any], log_tail: bool) -> Outcome:
        return Outcome(_json(error), "Unhandled", self.read_log_tail() if log_tail else None, alive=False)

    async def _exit_status(self) -> str:
        try:
            code = await asyncio.wait_for(self.proc.wait(), 2.0)
        except asyncio.TimeoutError:
            self.kill()
            return "the runtime stopped answering"
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
        assert self.proc.stdin is not None
        body = msgpack.packb(msg, use_bin_type=True)
        self.proc.stdin.write(struct.pack(">I", len(body)) + body)

    async def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        head = await self.proc.stdout.readexactly(4)
        (n,) = struct.unpack(">I", head)
        if n > 16 * 1024 * 1024:
            raise ValueError("sandbox sent an oversized frame")
        body = await self.proc.stdout.readexactly(n)
        msg = msgpack.unpackb(body, raw=False)
        if not isinstance(msg, dict):
            raise ValueError("sandbox sent a malformed frame")
        return msg

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def close(self) -> None:
        self.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except asyncio.TimeoutError:
            pass


def sandbox_environment(sandbox_id: str, config: m.FunctionConfig, tmp: Path) -> dict[str, str]:
    """Only what a Lambda function would see: nothing of the node's own environment leaks in."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "AWS_LAMBDA_FUNCTION_NAME": config.name,
        "AWS_LAMBDA_FUNCTION_VERSION": config.version,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.memory_mb),
        "FLINT_SANDBOX_ID": sandbox_id,
        "FLINT_WORKER_PID": str(os.getpid()),
    }
    for key, value in config.environment.items():
        env.setdefault(key, value)
    return env


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode()
