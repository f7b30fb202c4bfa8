"""The `flint` command as a newcomer types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, fresh_base_ip

pytestmark = pytest.mark.slow


def flint(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flint", *args], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=timeout
    )


def test_demo_brings_up_a_region_invokes_the_example_and_tears_it_down():
    out = flint("demo", "--base-ip", fresh_base_ip())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "region healthy" in out.stdout
    assert out.stdout.count("warm invoke") == 2 and "cold invoke" in out.stdout
    assert '"invocations": 3' in out.stdout
    assert "demo finished" in out.stdout


def test_cluster_function_and_invoke_commands(tmp_path):
    region = tmp_path / "region"
    up = flint("cluster", "up", "--dir", str(region), "--base-ip", fresh_base_ip())
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        header = next(line for line in up.stdout.splitlines() if line.startswith("NODE"))
        assert all(col in header for col in ("AZ", "ROLES", "HEALTH", "RAFT"))
        assert up.stdout.count("healthy") >= 3

        status = flint("cluster", "status", "--dir", str(region), "--json")
        rows = json.loads(status.stdout)
        assert status.returncode == 0 and {r["az"] for r in rows} == {"az1", "az2", "az3"}

        created = flint("function", "create", "hello", "--code", "examples/hello", "--handler", "handler.handle",
                        "--memory-mb", "256", "--env", "STAGE=test", "--region", str(region))
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["memory_mb"] == 256

        inv = flint("invoke", "hello", "--payload", '{"name": "CLI"}', "--log-tail", "--region", str(region))
        assert inv.returncode == 0, inv.stderr
        assert json.loads(inv.stdout)["message"] == "Hello, CLI!"
        assert "StatusCode: 200" in inv.stderr and "greeting CLI" in inv.stderr

        piped = flint("invoke", "hello", "--payload", "-", "--region", str(region), stdin='{"name": "stdin"}')
        assert json.loads(piped.stdout)["message"] == "Hello, stdin!"

        dry = flint("invoke", "hello", "--type", "DryRun", "--region", str(region))
        assert dry.returncode == 0 and "StatusCode: 204" in dry.stderr and dry.stdout == ""

        missing = flint("invoke", "nope", "--region", str(region))
        assert missing.returncode == 3
        assert "ResourceNotFoundException" in missing.stderr and "flint function list" in missing.stderr

        bad = flint("invoke", "hello", "--payload", "{oops", "--region", str(region))
        assert bad.returncode == 2 and "not valid JSON" in bad.stderr

        listed = flint("function", "list", "--region", str(region))
        assert "hello" in listed.stdout and "handler.handle" in listed.stdout

        shell = flint("function", "create", "shell", "--code", "examples/shell", "--runtime", "provided",
                      "--region", str(region))
        assert shell.returncode == 0, shell.stderr
        out = flint("invoke", "shell", "--payload", '{"x": 1}', "--log-tail", "--region", str(region))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["runtime"] == "sh" and json.loads(out.stdout)["event"] == {"x": 1}
        assert "request " in out.stderr  # the runtime's stderr, in the log tail
        failed = flint("invoke", "shell", "--payload", '{"please": "fail"}', "--region", str(region))
        assert failed.returncode == 1 and "FunctionError: Unhandled" in failed.stderr
        assert json.loads(failed.stdout)["errorType"] == "Example.Failure"

        rows = json.loads(flint("cluster", "status", "--dir", str(region), "--json").stdout)
        isolation = {r["isolation"] for r in rows}
        expected = "full(cgroup-v" if os.geteuid() == 0 else "partial:"
        assert all(level.startswith(expected) for level in isolation), isolation
        for row in rows:  # what was applied and what is missing, node by node
            details = row["isolation_details"]
            assert details["level"] == row["isolation"] and "seccomp" in details["applied"]
            assert (details["missing"] == []) == (os.geteuid() == 0)
    finally:
        down = flint("cluster", "down", "--dir", str(region), "--purge")
    assert down.returncode == 0 and down.stdout.count("stopped") == 3
    assert not region.exists()


def test_a_new_tenant_from_key_to_first_sync_and_async_invoke(tmp_path):
    region = tmp_path / "region"
    assert flint("cluster", "up", "--dir", str(region), "--base-ip", fresh_base_ip()).returncode == 0
    try:
        made = flint("tenant", "create", "acme", "--region", str(region))
        assert made.returncode == 0, made.stderr
        secret = region / "tenants" / "acme.key_secret"
        assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
        key = ["--region", str(region), "--key", str(secret)]
        assert flint("function", "create", "hello", "--code", "examples/hello", "--handler", "handler.handle",
                     *key).returncode == 0
        payload = tmp_path / "event.json"
        payload.write_text('{"name": "Acme"}')
        out = tmp_path / "out.json"
        sync = flint("invoke", "hello", str(out), "--payload", f"file://{payload}", *key)
        assert sync.returncode == 0 and "StatusCode: 200" in sync.stderr
        assert json.loads(out.read_text())["message"] == "Hello, Acme!"
        queued = flint("invoke", "hello", "--type", "Event", "--payload", '{"name": "later"}', *key)
        assert queued.returncode == 0 and "StatusCode: 202" in queued.stderr
        event_id = queued.stderr.split("RequestId: ")[1].split()[0]
        for _ in range(50):
            shown = flint("events", "show", event_id, *key)
            if json.loads(shown.stdout)["state"] == "done":
                break
            time.sleep(0.2)
        assert json.loads(shown.stdout)["state"] == "done"
        assert "done: 1" in flint("events", "list", *key).stdout
        # the default tenant does not see acme's function
        assert "hello" not in flint("function", "list", "--region", str(region)).stdout
    finally:
        flint("cluster", "down", "--dir", str(region), "--purge")


def test_commands_without_a_region_say_how_to_get_one(tmp_path):
    out = flint("invoke", "hello", "--region", str(tmp_path / "none"))
    assert out.returncode == 2 and "flint cluster up" in out.stderr
