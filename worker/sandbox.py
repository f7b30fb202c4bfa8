"""One sandbox as the worker sees it: a prepared slot given a function, running one invoke at a time.

`SandboxProcess` holds the sandbox's control channel (frames documented in worker/bootstrap.py, which runs at
its other end), enforces the timeout, and turns every way a sandbox can end (exception, timeout, exit, out of
memory, stray processes) into the Lambda error a tenant expects. Where it comes from: worker/slots.py (the
prepared slots) and worker/zygote_client.py (the zygote they are forked from).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import msgpack

from wire import messages as m
from worker.replies import InvalidResponse, error_json, frame_length, init_reply, invalid_response, invoke_reply
from worker.slots import Slot, SlotPool

INIT_TIMEOUT_S = 10.0  # Lambda allows 10 s of init
LOG_TAIL_BYTES = 4096


@dataclasses.dataclass
class Outcome:
    payload: bytes
    function_error: str | None = None  # "Unhandled" when the handler, the runtime or the sandbox failed
    log: str | None = None
    alive: bool = True  # False: the sandbox is gone and must not be reused


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
        self.frozen = False
        self._freezing: asyncio.TimerHandle | None = None
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
                sandbox.init_error = init_reply(await asyncio.wait_for(sandbox._read(), INIT_TIMEOUT_S))
            except InvalidResponse as exc:  # the function's init code wrote on the channel
                sandbox.kill()
                sandbox.init_error = invalid_response("init", str(exc))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                timed_out = sandbox.alive
                sandbox.kill()
                sandbox.init_error = {
                    "errorType": "Sandbox.Timedout" if timed_out else "Runtime.ExitError",
                    "errorMessage": "the runtime hung during init (10 s)" if timed_out
                    else "the runtime exited during init; see the log tail",
                }
        if slot.cgroup is not None:
            slot.cgroup.limit_cpu(config.memory_mb, pool.zygote.cores)
        sandbox._idle()  # until its first invoke: threads its init started stand still too
        sandbox.init_ms = (time.perf_counter() - began) * 1000
        return sandbox

    @property
    def alive(self) -> bool:
        return self.zygote.running(self.slot.slot_id)

    # --- invoke --------------------------------------------------------------------------------------------------

    async def invoke(self, request_id: str, payload: bytes, log_tail: bool, max_s: float | None = None) -> Outcome:
        """Run one invoke; killed at the function's timeout, or sooner at `max_s` (the admission bound)."""
        timeout_s = self.config.timeout_s if max_s is None else min(self.config.timeout_s, max_s)
        deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
        if self.init_error is not None:
            self.kill()
            return self._failure(dict(self.init_error), log_tail)
        self._stay_awake()
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per invoke, unlike wait_for
                if self.config.runtime == "provided":
                    reply = invoke_reply(await self._custom(request_id, deadline_ms, payload))
                else:
                    self._write({"t": "invoke", "id": request_id, "deadline_ms": deadline_ms, "payload": payload,
                                 "log_tail": log_tail})
                    reply = invoke_reply(await self._read())
        except TimeoutError:
            self.kill()
            return self._timed_out(request_id, timeout_s, log_tail)
        except InvalidResponse as exc:  # the handler wrote on the channel itself: its own reply may follow
            self.kill()
            return self._failure(invalid_response(request_id, str(exc)), log_tail)
        except (asyncio.IncompleteReadError, ConnectionError):
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
        tail = reply.log if log_tail else None
        if self.config.runtime == "provided" and log_tail:
            tail = self.read_log_tail()
        stray = self.cgroup is not None and len(self.cgroup.pids()) > self.baseline_pids
        if reply.retire:
            self.kill()
        else:
            self._idle()
        return Outcome(reply.payload, "Unhandled" if reply.function_error else None, tail,
                       alive=not stray and not reply.retire)

    async def _custom(self, request_id: str, deadline_ms: int, payload: bytes) -> dict[str, Any]:
        """The custom runtime protocol: one line in, one line out (README, Custom runtimes)."""
        assert self.writer is not None and self.reader is not None
        event = (payload or b"{}").decode(errors="replace").replace("\n", " ")
        self._send(f"{request_id} {deadline_ms} {event}\n".encode())
        try:
            line = (await self.reader.readline()).decode(errors="replace").rstrip("\n")
        except ValueError as exc:  # a line past the reader's limit (worker/slots.py: a response's size, and more)
            raise InvalidResponse(f"it wrote a line longer than a response may be ({exc})") from None
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
        return Outcome(error_json(error), "Unhandled", self.read_log_tail() if log_tail else None, alive=False)

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
        self._send(struct.pack(">I", len(body)) + body)

    def _send(self, data: bytes) -> None:
        """Write to the sandbox, then thaw it if it was frozen: it wakes once, to its message waiting."""
        assert self.writer is not None
        self.writer.write(data)
        if self.frozen and self.cgroup is not None:
            self.cgroup.thaw()
            self.frozen = False

    async def _read(self) -> Any:
        """One message as the sandbox sent it: anything msgpack can hold. worker/replies.py judges it."""
        assert self.reader is not None
        head = await self.reader.readexactly(4)
        body = await self.reader.readexactly(frame_length(struct.unpack(">I", head)[0]))
        try:
            return msgpack.unpackb(body, raw=False)
        except Exception as exc:  # msgpack's errors, bad UTF-8, unhashable keys: all the sender's
            raise InvalidResponse(f"it sent a frame that is not msgpack ({type(exc).__name__}: {exc})"[:300]) from None

    # --- idle: frozen ---------------------------------------------------------------------------------------------

    def _idle(self) -> None:
        """Between invokes the sandbox is frozen (the cgroup freezer, where this host has one), once it has been
        idle for the pool's freeze_after_s: threads a handler leaves running burn nothing, and invokes that come
        back to back pay for no freeze and thaw."""
        if self.cgroup is not None and self.cgroup.freezer is not None:
            self._freezing = asyncio.get_running_loop().call_later(self.pool.freeze_after_s, self._freeze)

    def _freeze(self) -> None:
        self._freezing = None
        if self.cgroup is not None:
            self.cgroup.freeze()
            self.frozen = True

    def _stay_awake(self) -> None:
        """An invoke begins (the write that starts it thaws the sandbox, _send), or the sandbox ends: no freeze
        to come."""
        if self._freezing is not None:
            self._freezing.cancel()
            self._freezing = None

    # --- ending --------------------------------------------------------------------------------------------------

    def kill(self) -> None:
        self._stay_awake()
        self.pool.kill(self.slot)
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def close(self) -> None:
        self._stay_awake()
        await self.pool.discard(self.slot)


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
