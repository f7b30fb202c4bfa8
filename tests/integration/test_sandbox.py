"""Real sandbox processes: what a tenant's handler gets back when it succeeds, fails, hangs or exits."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import uvloop

from wire import messages as m
from worker.sandbox import SandboxProcess

HANDLERS = textwrap.dedent(
    """
    import os, sys, time, logging
    count = 0

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
        return {k: v for k, v in os.environ.items()}
    """
)


@pytest.fixture
def code_dir(tmp_path):
    d = tmp_path / "code"
    d.mkdir()
    (d / "fn.py").write_text(HANDLERS)
    (d / "broken.py").write_text("import nonexistent_module_xyz\n")
    return d


def config(handler: str, timeout_s: float = 3.0, **env) -> m.FunctionConfig:
    return m.FunctionConfig(tenant="t", name="fn", handler=handler, code_sha256="0" * 64, timeout_s=timeout_s,
                            environment=env)


def run(coro):
    return uvloop.run(coro)


def test_handler_result_context_warm_state_and_log_tail(code_dir, tmp_path):
    async def go():
        sb = await SandboxProcess.start("s1", config("fn.ok"), code_dir, tmp_path / "s1")
        try:
            assert sb.init_error is None
            first = await sb.invoke("req-1", b'{"a": 1}', log_tail=True)
            second = await sb.invoke("req-2", b"", log_tail=False)
            return first, second
        finally:
            await sb.close()

    first, second = run(go())
    body = json.loads(first.payload)
    assert first.function_error is None and first.alive
    assert body["event"] == {"a": 1} and body["count"] == 1 and body["request_id"] == "req-1"
    assert 2000 < body["remaining"] <= 3000 and body["name"] == "fn" and body["memory"] == "128"
    assert "hello from the handler" in first.log and "a log record" in first.log
    assert "START RequestId: req-1" in first.log and "END RequestId: req-1" in first.log
    assert json.loads(second.payload)["count"] == 2  # same process, module state kept: warm
    assert second.log is None


def test_handler_exception_is_unhandled_with_type_message_and_stack(code_dir, tmp_path):
    async def go():
        sb = await SandboxProcess.start("s2", config("fn.boom"), code_dir, tmp_path / "s2")
        try:
            out = await sb.invoke("r", b'{"x": 5}', log_tail=True)
            again = await sb.invoke("r2", b'{"x": 6}', log_tail=False)
            return out, again
        finally:
            await sb.close()

    out, again = run(go())
    err = json.loads(out.payload)
    assert out.function_error == "Unhandled" and out.alive
    assert err["errorType"] == "ValueError" and err["errorMessage"] == "bad input: 5"
    assert any("boom" in frame for frame in err["stackTrace"])
    assert "Traceback" in out.log
    assert json.loads(again.payload)["errorMessage"] == "bad input: 6"  # the sandbox keeps serving


def test_timeout_kills_the_sandbox_with_lambdas_message(code_dir, tmp_path):
    async def go():
        sb = await SandboxProcess.start("s3", config("fn.hang", timeout_s=0.5), code_dir, tmp_path / "s3")
        out = await sb.invoke("r-hang", b"{}", log_tail=False)
        await sb.close()
        return out, sb.alive

    out, alive = run(go())
    err = json.loads(out.payload)
    assert err["errorType"] == "Sandbox.Timedout"
    assert err["errorMessage"] == "RequestId: r-hang Error: Task timed out after 0.50 seconds"
    assert not out.alive and not alive


def test_exit_is_runtime_exit_error(code_dir, tmp_path):
    async def go():
        sb = await SandboxProcess.start("s4", config("fn.leave"), code_dir, tmp_path / "s4")
        return await sb.invoke("r", b"{}", log_tail=False)

    out = run(go())
    err = json.loads(out.payload)
    assert err["errorType"] == "Runtime.ExitError" and "exit status 7" in err["errorMessage"]
    assert not out.alive


def test_unserialisable_result_is_a_marshal_error(code_dir, tmp_path):
    async def go():
        sb = await SandboxProcess.start("s5", config("fn.unserialisable"), code_dir, tmp_path / "s5")
        try:
            return await sb.invoke("r", b"{}", log_tail=False)
        finally:
            await sb.close()

    assert json.loads(run(go()).payload)["errorType"] == "Runtime.MarshalError"


@pytest.mark.parametrize(
    "handler, error_type",
    [("broken.handle", "Runtime.ImportModuleError"), ("fn.missing", "Runtime.HandlerNotFound"),
     ("nodots", "Runtime.MalformedHandlerName")],
)
def test_init_errors_are_reported_on_invoke(code_dir, tmp_path, handler, error_type):
    async def go():
        sb = await SandboxProcess.start("s6", config(handler), code_dir, tmp_path / "s6")
        return sb.init_error, await sb.invoke("r", b"{}", log_tail=False)

    init_error, out = run(go())
    assert init_error["errorType"] == error_type
    assert json.loads(out.payload)["errorType"] == error_type and out.function_error == "Unhandled"
    assert not out.alive


def test_environment_holds_the_functions_variables_and_no_node_secrets(code_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLINT_NODE_SECRET", "do-not-leak")

    async def go():
        sb = await SandboxProcess.start("s7", config("fn.env", GREETING="hi"), code_dir, tmp_path / "s7")
        try:
            return await sb.invoke("r", b"{}", log_tail=False)
        finally:
            await sb.close()

    env = json.loads(run(go()).payload)
    assert env["GREETING"] == "hi" and env["AWS_LAMBDA_FUNCTION_NAME"] == "fn"
    assert "FLINT_NODE_SECRET" not in env and "FLINT_WORKER_PID" not in env
    assert not any(v == "do-not-leak" for v in env.values())
    assert os.environ["FLINT_NODE_SECRET"] == "do-not-leak"
