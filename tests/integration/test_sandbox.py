"""Real sandboxes (zygote forks, isolated as a worker isolates them): what a handler gets back when it
succeeds, fails, hangs, exits, eats memory or forks without end, and what it cannot reach from inside."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.sandbox import ROOT_ONLY, Harness
from worker import isolation as iso


HANDLERS = textwrap.dedent(
    """
    import ctypes, errno, json, os, socket, sys, time, logging
    count = 0
    libc = ctypes.CDLL(None, use_errno=True)

    def ok(event, context):
        global count
        count += 1
        print("hello from the handler")
        logging.getLogger().info("a log record")
        return {"event": event, "count": count, "request_id": context.aws_request_id,
                "remaining": context.get_remaining_time_in_millis(), "name": context.function_name,
                "memory": context.memory_limit_in_mb}

    def boom(event, context):
        raise ValueError("bad input: " + str(event.get("x")))

    def hang(event, context):
        time.sleep(60)

    def leave(event, context):
        sys.exit(7)

    def unserialisable(event, context):
        return {1, 2}

    def env(event, context):
        return dict(os.environ)

    def identity(event, context):
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        return {"uid": os.getuid(), "pid": os.getpid(), "hostname": os.uname().nodename,
                "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
                "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
                "cwd": os.getcwd(), "root": sorted(os.listdir("/")), "procs": sorted(p for p in os.listdir("/proc") if p.isdigit())}

    def attempt(fn):
        try:
            return "allowed: " + repr(fn())
        except OSError as exc:
            return f"refused: {errno.errorcode.get(exc.errno, exc.errno)}"

    def syscall_errno(result):
        if result == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result

    def escapes(event, context):
        out = {}
        def connect():
            s = socket.socket(); s.settimeout(1); s.connect(("127.0.0.1", event["port"])); return "connected"
        out["connect_host_port"] = attempt(connect)
        out["read_other_code"] = attempt(lambda: open(event["other_code"]).read())
        out["read_node_key"] = attempt(lambda: open(event["node_key"]).read())
        out["signal_host_process"] = attempt(lambda: os.kill(event["host_pid"], 0))
        out["mount"] = attempt(lambda: syscall_errno(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
        out["ptrace"] = attempt(lambda: syscall_errno(libc.ptrace(16, 1, 0, 0)))  # PTRACE_ATTACH
        out["unshare"] = attempt(lambda: syscall_errno(libc.unshare(0x10000000)))  # CLONE_NEWUSER
        if not event.get("writes", True):  # run with no root (no sandbox of its own): never touch the host's files
            return out
        out["write_task"] = attempt(lambda: open("/var/task/evil.py", "w").write("x"))
        out["write_etc"] = attempt(lambda: open("/etc/evil", "w").write("x"))
        out["write_tmp"] = attempt(lambda: open("/tmp/fine", "w").write("x"))
        def fill():
            with open("/tmp/big", "wb") as f:
                for _ in range(200):
                    f.write(b"\\0" * (1 << 20))
        out["fill_tmp"] = attempt(fill)
        return out

    def hog(event, context):
        blocks = []
        while True:
            blocks.append(bytearray(16 * 1024 * 1024))

    def background(event, context):
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        return "left a process behind"

    def forkbomb(event, context):
        made = 0
        while made < 10000:
            try:
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
                made += 1
            except OSError as exc:
                return {"stopped_at": made, "error": errno.errorcode[exc.errno]}
        return {"stopped_at": made, "error": None}
    """
)

CUSTOM = """#!/bin/sh
# A custom runtime: one line in (request id, deadline, event), one line out (RESULT or ERROR).
while read -r request_id deadline event; do
  echo "handling $request_id" >&2
  case "$event" in
    *fail*) echo "ERROR Custom.Failure the event asked to fail" ;;
    *) echo "RESULT {\\"echo\\": $event, \\"request_id\\": \\"$request_id\\"}" ;;
  esac
done
"""


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("code")
    (d / "fn.py").write_text(HANDLERS)
    (d / "broken.py").write_text("import nonexistent_module_xyz\n")
    d.chmod(0o755)  # as the worker unpacks code: readable by the sandbox's uid
    return d


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("sandboxes"))
    yield harness
    harness.close()


def test_handler_result_context_warm_state_and_log_tail(h, code):
    sb = h.sandbox(code, "fn.ok")
    try:
        assert sb.init_error is None
        first = h.invoke(sb, b'{"a": 1}', log_tail=True)
        second = h.invoke(sb)
    finally:
        h.run(sb.close())
    body = json.loads(first.payload)
    assert first.function_error is None and first.alive
    assert body["event"] == {"a": 1} and body["count"] == 1
    assert 2000 < body["remaining"] <= 3000 and body["name"] == "fn" and body["memory"] == "128"
    assert "hello from the handler" in first.log and "a log record" in first.log
    assert "START RequestId:" in first.log and "REPORT RequestId:" in first.log
    assert json.loads(second.payload)["count"] == 2  # the same process kept its module state: warm
    assert second.log is None


def test_handler_exception_is_unhandled_and_the_sandbox_keeps_serving(h, code):
    sb = h.sandbox(code, "fn.boom")
    try:
        out = h.invoke(sb, b'{"x": 5}', log_tail=True)
        again = h.invoke(sb, b'{"x": 6}')
    finally:
        h.run(sb.close())
    err = json.loads(out.payload)
    assert out.function_error == "Unhandled" and out.alive
    assert err["errorType"] == "ValueError" and err["errorMessage"] == "bad input: 5"
    assert any("boom" in frame for frame in err["stackTrace"]) and "Traceback" in out.log
    assert json.loads(again.payload)["errorMessage"] == "bad input: 6"


def test_timeout_kills_the_sandbox_with_lambdas_message(h, code):
    sb = h.sandbox(code, "fn.hang", timeout_s=0.5)
    out = h.invoke(sb)
    h.run(sb.close())
    err = json.loads(out.payload)
    assert err["errorType"] == "Sandbox.Timedout" and "Task timed out after 0.50 seconds" in err["errorMessage"]
    assert not out.alive and not sb.alive


def test_a_sandbox_past_its_deadline_ends_itself_when_the_worker_cannot_stop_it(h, code):
    sb = h.sandbox(code, "fn.hang", timeout_s=0.5)
    async def send_only():  # as a frozen worker would: send the invoke, then neither read the answer nor kill
        sb._stay_awake()  # as invoke() does first: no freeze while it runs
        sb._write({"t": "invoke", "id": "overrun", "deadline_ms": int(time.time() * 1000) + 500, "payload": b"{}",
                   "log_tail": False})

    h.run(send_only())
    began = time.monotonic()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        h.run(asyncio.wait_for(sb._read(), 5.0))  # the channel closes: the sandbox has ended
    assert time.monotonic() - began < 2.0  # at its deadline plus a short grace, not the handler's 60 s sleep
    assert "ran past its deadline" in sb.read_log_tail()
    h.run(sb.close())


def test_exit_is_runtime_exit_error(h, code):
    sb = h.sandbox(code, "fn.leave")
    out = h.invoke(sb)
    h.run(sb.close())
    err = json.loads(out.payload)
    assert err["errorType"] == "Runtime.ExitError" and "exit status 7" in err["errorMessage"]
    assert not out.alive


def test_unserialisable_result_is_a_marshal_error(h, code):
    sb = h.sandbox(code, "fn.unserialisable")
    out = h.invoke(sb)
    h.run(sb.close())
    assert json.loads(out.payload)["errorType"] == "Runtime.MarshalError"


@pytest.mark.parametrize(
    "handler, error_type",
    [("broken.handle", "Runtime.ImportModuleError"), ("fn.missing", "Runtime.HandlerNotFound"),
     ("nodots", "Runtime.MalformedHandlerName")],
)
def test_init_errors_are_reported_on_invoke(h, code, handler, error_type):
    sb = h.sandbox(code, handler)
    out = h.invoke(sb)
    h.run(sb.close())
    assert sb.init_error["errorType"] == error_type
    assert json.loads(out.payload)["errorType"] == error_type and out.function_error == "Unhandled"
    assert not out.alive


def test_environment_holds_the_functions_variables_and_no_node_secrets(h, code, monkeypatch):
    monkeypatch.setenv("FLINT_NODE_SECRET", "do-not-leak")
    sb = h.sandbox(code, "fn.env", environment={"GREETING": "hi"})
    env = json.loads(h.invoke(sb).payload)
    h.run(sb.close())
    assert env["GREETING"] == "hi" and env["AWS_LAMBDA_FUNCTION_NAME"] == "fn"
    assert "FLINT_NODE_SECRET" not in env and "do-not-leak" not in env.values()


def test_custom_runtime_speaks_the_line_protocol(h, tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "bootstrap").write_text(CUSTOM)
    (tmp_path / "bootstrap").chmod(0o755)
    sb = h.sandbox(tmp_path, "unused", runtime="provided")
    try:
        ok = h.invoke(sb, b'{"n": 1}', log_tail=True)
        failed = h.invoke(sb, b'{"please": "fail"}')
    finally:
        h.run(sb.close())
    body = json.loads(ok.payload)
    assert ok.function_error is None and body["echo"] == {"n": 1} and body["request_id"]
    assert "handling" in ok.log
    assert failed.function_error == "Unhandled"
    assert json.loads(failed.payload) == {"errorType": "Custom.Failure", "errorMessage": "the event asked to fail"}


def test_custom_runtime_without_an_executable_bootstrap_is_an_init_error(h, tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "bootstrap").write_text("#!/bin/sh\n")  # not executable
    sb = h.sandbox(tmp_path, "unused", runtime="provided")
    out = h.invoke(sb)
    h.run(sb.close())
    assert json.loads(out.payload)["errorType"] == "Runtime.InvalidEntrypoint"


# --- isolation: what a tenant cannot do ------------------------------------------------------------------------------


@ROOT_ONLY
def test_the_sandbox_is_an_unprivileged_process_alone_in_its_own_world(h, code):
    sb = h.sandbox(code, "fn.identity")
    me = json.loads(h.invoke(sb).payload)
    h.run(sb.close())
    assert me["uid"] >= 100_000 and me["pid"] == 1 and me["hostname"] == "sandbox"
    assert int(me["cap_eff"], 16) == 0 and int(me["cap_bnd"], 16) == 0
    assert me["no_new_privs"] == "1" and me["seccomp"] == "2"
    assert me["cwd"] == "/var/task" and me["procs"] == ["1"]
    assert set(me["root"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "sbin", "tmp",
                               "usr", "var", "home", "opt"}


@ROOT_ONLY
def test_escapes_from_inside_a_sandbox_all_fail(h, code, tmp_path):
    other = tmp_path / "other-function" / "secret.py"
    other.parent.mkdir()
    other.write_text("TOKEN = 'another tenant'\n")
    key = tmp_path / "keys" / "cluster.key_secret"
    key.parent.mkdir()
    key.write_text("secret = nope\n")
    key.chmod(stat.S_IRUSR)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    event = {"port": listener.getsockname()[1], "other_code": str(other), "node_key": str(key),
             "host_pid": os.getpid()}
    sb = h.sandbox(code, "fn.escapes", memory_mb=256)
    try:
        out = json.loads(h.invoke(sb, json.dumps(event).encode()).payload)
    finally:
        h.run(sb.close())
        listener.close()
    assert out["write_tmp"].startswith("allowed")
    refused = {k: v for k, v in out.items() if k != "write_tmp"}
    assert all(v.startswith("refused") for v in refused.values()), refused
    assert out["fill_tmp"] == "refused: ENOSPC"  # /tmp is full at its size; nothing else fills
    assert out["mount"] == "refused: EPERM" and out["unshare"] == "refused: EPERM"
    assert out["read_other_code"] == "refused: ENOENT" and out["read_node_key"] == "refused: ENOENT"


@ROOT_ONLY
def test_memory_over_the_limit_is_an_out_of_memory_error_and_nothing_else_dies(h, code):
    sb = h.sandbox(code, "fn.hog", memory_mb=128, timeout_s=20)
    out = h.invoke(sb)
    h.run(sb.close())
    err = json.loads(out.payload)
    assert err["errorType"] == "Runtime.OutOfMemory" and "128 MB" in err["errorMessage"]
    assert not out.alive
    fresh = h.sandbox(code, "fn.ok")
    assert json.loads(h.invoke(fresh).payload)["count"] == 1
    h.run(fresh.close())


@ROOT_ONLY
def test_a_fork_bomb_stops_at_the_pids_limit_and_the_sandbox_is_retired(h, code):
    sb = h.sandbox(code, "fn.forkbomb", timeout_s=10)
    out = h.invoke(sb)
    result = json.loads(out.payload)
    h.run(sb.close())
    assert result["error"] == "EAGAIN" and result["stopped_at"] < 32
    assert not out.alive  # stray processes: the next invoke gets a fresh sandbox


@ROOT_ONLY
def test_a_process_left_running_after_the_invoke_retires_the_sandbox(h, code):
    sb = h.sandbox(code, "fn.background")
    out = h.invoke(sb)
    h.run(sb.close())
    assert out.function_error is None and not out.alive


@ROOT_ONLY
def test_cgroup_limits_follow_the_functions_memory(h, code):
    sb = h.sandbox(code, "fn.ok", memory_mb=1769)
    try:
        assert sb.cgroup is not None
        mem, pids, cpu = sb.cgroup.dirs[:3] if sb.cgroup.version == 1 else (sb.cgroup.dirs[0],) * 3
        if sb.cgroup.version == 1:
            assert int((mem / "memory.limit_in_bytes").read_text()) == 1769 * 1024 * 1024
            assert int((pids / "pids.max").read_text()) == 32
            assert int((cpu / "cpu.cfs_quota_us").read_text()) == 100_000  # 1769 MB is one core
    finally:
        h.run(sb.close())


def test_without_root_the_worker_does_what_it_can_and_says_so(tmp_path, code):
    partial = iso.Capabilities(root=False, namespaces=False, cgroups=0, seccomp=True,
                               reasons=["not root: no namespaces, cgroups, uid switch or capability drop"])
    harness = Harness(tmp_path, caps=partial, cgroups=False)  # as a worker without root runs: no cgroups
    try:
        assert partial.label() == "partial:process+rlimits+no_new_privs+seccomp"
        sb = harness.sandbox(code, "fn.ok")
        out = harness.invoke(sb)
        assert json.loads(out.payload)["count"] == 1
        denied = harness.sandbox(code, "fn.escapes")
        result = json.loads(harness.invoke(denied, json.dumps(
            {"port": 1, "other_code": "/nonexistent", "node_key": "/nonexistent", "host_pid": 1,
             "writes": False}).encode()).payload)
        assert result["mount"] == "refused: EPERM" and result["unshare"] == "refused: EPERM"  # seccomp holds
        harness.run(sb.close())
        harness.run(denied.close())
        # no cgroup to hold its memory: the address-space cap stops a hog, which gets the same error
        hog = harness.sandbox(code, "fn.hog", memory_mb=128, timeout_s=20)
        out = harness.invoke(hog)
        err = json.loads(out.payload)
        assert err["errorType"] == "Runtime.OutOfMemory" and "128 MB" in err["errorMessage"] and not out.alive
        harness.run(hog.close())
        fresh = harness.sandbox(code, "fn.ok")
        assert json.loads(harness.invoke(fresh).payload)["count"] == 1
        harness.run(fresh.close())
        if os.geteuid() != 0:  # RLIMIT_NPROC binds only an unprivileged uid
            bomb = harness.sandbox(code, "fn.forkbomb", timeout_s=10)
            result = json.loads(harness.invoke(bomb).payload)
            assert result["error"] == "EAGAIN" and result["stopped_at"] <= 64
            harness.run(bomb.close())
    finally:
        harness.close()
