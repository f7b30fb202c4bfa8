"""The Python runtime inside a sandbox. Normally run by a fork of the zygote (worker/zygote.py) after isolation;
it can also be started on its own as `python -I bootstrap.py HANDLER` with the channel on fds 0 and 1.

This file runs inside the sandbox, never in the worker. Contract with the worker (its end: worker/sandbox.py;
documented in the README):
- the control channel carries messages of a 4-byte big-endian length and one msgpack map; the handler's
  stdout and stderr both go to the sandbox log.
- First message out: {"t": "ready"} or {"t": "init_error", "error": {errorType, errorMessage, stackTrace}}.
- Then per invoke, in: {"t": "invoke", "id", "deadline_ms", "payload", "log_tail"};
  out: {"t": "result", "payload"} or {"t": "error", "error": {...}}, plus "log" (the last 4 KB) if asked.

Imports only the standard library and msgpack: nothing of the node is loaded into a tenant's process.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import resource
import signal
import struct
import sys
import time
import traceback

import msgpack

LOG_TAIL_BYTES = 4096
LOG_ROTATE_BYTES = 1024 * 1024
RESPONSE_MAX_BYTES = 6 * 1024 * 1024
PR_SET_PDEATHSIG = 1
# The worker kills a sandbox at its invoke's deadline. Should the worker be unable to (its process frozen), the
# sandbox ends itself this long after: the region's concurrency limits count on no execution outliving it.
OVERRUN_GRACE_S = 0.2


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(1)


class Channel:
    """The control channel: a socket (from the zygote) or the two pipe ends given at fds 0 and 1."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd = rfd
        self.wfd = wfd

    @classmethod
    def from_stdio(cls) -> Channel:
        channel = cls(os.dup(0), os.dup(1))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)  # the handler's stdout joins stderr in the sandbox log
        return channel

    def read(self) -> dict | None:
        head = self._read_exact(4)
        if head is None:
            return None
        (n,) = struct.unpack(">I", head)
        body = self._read_exact(n)
        if body is None:
            return None
        return msgpack.unpackb(body, raw=False)

    def write(self, msg: dict) -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def _read_exact(self, n: int) -> bytes | None:
        chunks = []
        while n:
            chunk = os.read(self.rfd, n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


class Context:
    """What Lambda's Python runtime passes as `context`."""

    def __init__(self, request_id: str, deadline_ms: int):
        env = os.environ
        self.aws_request_id = request_id
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        self.invoked_function_arn = f"flint:function:{self.function_name}"
        self.log_group_name = f"/flint/{self.function_name}"
        self.log_stream_name = env.get("FLINT_SANDBOX_ID", "")
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def error_map(exc: BaseException, error_type: str | None = None, message: str | None = None) -> dict:
    stack = traceback.format_list(traceback.extract_tb(exc.__traceback__)[1:])
    return {
        "errorMessage": message if message is not None else str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": stack,
    }


def load_handler(spec: str):
    module_name, _, func_name = spec.rpartition(".")
    if not module_name or not func_name:
        raise _InitError("Runtime.MalformedHandlerName", f"Bad handler '{spec}': expected module.function")
    try:
        module = importlib.import_module(module_name.replace("/", "."))
    except ModuleNotFoundError as exc:
        raise _InitError("Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}") from exc
    except SyntaxError as exc:
        raise _InitError("Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}") from exc
    except Exception as exc:
        raise _InitError("Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise _InitError("Runtime.HandlerNotFound", f"Handler '{func_name}' missing on module '{module_name}'")
    return func


class _InitError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def log_size() -> int:
    try:
        return os.fstat(2).st_size
    except OSError:
        return 0


def log_tail(start: int) -> str:
    end = log_size()
    begin = max(start, end - LOG_TAIL_BYTES)
    if end <= begin:
        return ""
    try:
        return os.pread(2, end - begin, begin).decode("utf-8", errors="replace")
    except OSError:
        return ""


def main() -> None:
    """Started on its own (`python -I bootstrap.py HANDLER`): a sandbox without a zygote."""
    parent = int(os.environ.pop("FLINT_WORKER_PID", "0")) or os.getppid()
    _die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    serve(Channel.from_stdio(), sys.argv[1])


def serve(channel: Channel, handler_spec: str) -> None:
    """Load the handler, say ready (or why not), then run invokes until the worker closes the channel.
    stdout and stderr (fds 1 and 2) are the sandbox log by now."""
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="[%(levelname)s]\t%(asctime)s\t%(message)s", force=True
    )
    sys.path.insert(0, os.getcwd())
    try:
        handler = load_handler(handler_spec)
    except _InitError as exc:
        traceback.print_exc()
        channel.write({"t": "init_error", "error": error_map(exc, exc.error_type, str(exc))})
        return
    channel.write({"t": "ready"})
    signal.signal(signal.SIGALRM, _overran)
    while True:
        msg = channel.read()
        if msg is None:
            return  # the worker closed the channel: the sandbox is being retired
        request_id = msg["id"]
        signal.setitimer(signal.ITIMER_REAL, max(0.001, msg["deadline_ms"] / 1000 - time.time() + OVERRUN_GRACE_S))
        start = log_size()
        print(f"START RequestId: {request_id} Version: {os.environ.get('AWS_LAMBDA_FUNCTION_VERSION', '$LATEST')}")
        began = time.perf_counter()
        reply = invoke(handler, msg)
        signal.setitimer(signal.ITIMER_REAL, 0)
        duration_ms = (time.perf_counter() - began) * 1000
        sys.stderr.flush()
        print(f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms")
        if msg.get("log_tail"):
            reply["log"] = log_tail(start)
        channel.write(reply)
        if log_size() > LOG_ROTATE_BYTES:
            os.ftruncate(2, 0)


def _overran(signum, frame) -> None:
    os.write(2, b"the invoke ran past its deadline and the worker did not stop it: the sandbox ends itself\n")
    os._exit(124)


def invoke(handler, msg: dict) -> dict:
    request_id = msg["id"]
    payload = msg.get("payload") or b""
    try:
        event = json.loads(payload) if payload else {}
    except ValueError as exc:
        return {"t": "error", "error": error_map(exc, "Runtime.UnmarshalError", f"Unable to parse event: {exc}")}
    context = Context(request_id, msg["deadline_ms"])
    try:
        result = handler(event, context)
    except MemoryError as exc:  # the address-space cap of a sandbox without cgroups: out of memory, retire
        return {"t": "error", "retire": True, "error": error_map(
            exc, "Runtime.OutOfMemory",
            f"RequestId: {request_id} Error: Runtime exited with error: out of memory (the function used all of "
            f"its {os.environ.get('AWS_LAMBDA_FUNCTION_MEMORY_SIZE', '?')} MB)")}
    except Exception as exc:
        traceback.print_exc()
        return {"t": "error", "error": error_map(exc)}
    try:
        body = json.dumps(result).encode()
    except (TypeError, ValueError) as exc:
        return {
            "t": "error",
            "error": error_map(exc, "Runtime.MarshalError", f"Unable to marshal response: {exc}"),
        }
    if len(body) > RESPONSE_MAX_BYTES:
        return {
            "t": "error",
            "error": {
                "errorType": "Function.ResponseSizeTooLarge",
                "errorMessage": f"Response payload size ({len(body)} bytes) exceeded maximum allowed payload "
                f"size ({RESPONSE_MAX_BYTES} bytes).",
            },
        }
    return {"t": "result", "payload": body}


if __name__ == "__main__":
    main()
