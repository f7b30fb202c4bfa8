"""The node daemon as an operator meets it: clean SIGTERM, crashed roles restarted, never half alive."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import zmq.asyncio

from flint import Client
from tests.conftest import ROOT, start_region
from tests.support.cluster import executions
from tests.support.wait import wait_until
from wire import messages as m
from wire.client import ClientPool

pytestmark = pytest.mark.slow


def inject(region, node_id: str, role: str) -> None:
    async def go():
        keys = region.cluster_keys()
        ctx = zmq.asyncio.Context()
        pool = ClientPool(ctx, keys, keys.public)
        try:
            await pool.call(region.config(node_id).endpoint("admin"), m.InjectFault(role=role, fault="crash"))
        finally:
            pool.close()
            ctx.destroy(linger=0)

    asyncio.run(go())


def wait_restarted(region, node_id: str, role: str, restarts: int) -> None:
    """Until the node has noticed `role`'s crashes (`restarts` of them in its window) and runs it again."""
    wait_until(lambda: region.call("admin", m.NodeStatus(), node=node_id, timeout_s=1.0).role_states[role], 10,
               until=lambda state: state == m.RoleState(state="running", restarts=restarts),
               what=f"{node_id} to run {role} again after crash {restarts}")


def wait_exit(pid: int, timeout_s: float) -> int | None:
    proc = psutil.Process(pid)
    try:
        return proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        return None


def test_sigterm_stops_the_node_cleanly_with_its_sandboxes(tmp_path):
    region = start_region(tmp_path, nodes=1, azs=1)
    try:
        with Client.from_region(region.root) as client:
            client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
            assert client.invoke("hello", {}).function_error is None
        pid = region.pid("n1")
        sandboxes = psutil.Process(pid).children(recursive=True)  # the zygote, prepared slots, the warm sandbox
        assert any("zygote.py" in " ".join(p.cmdline()) for p in sandboxes)
        assert len(sandboxes) >= 3, "the invoke should have left a warm sandbox beside the zygote"
        os.kill(pid, signal.SIGTERM)
        assert wait_exit(pid, 15) == 0
        wait_until(lambda: [p for p in sandboxes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 0.2,
                   until=lambda alive: not alive, ignoring=(psutil.NoSuchProcess,),
                   what="the node's sandboxes to be gone with it")
        log = (region.root / "nodes" / "n1" / "node.log").read_text().splitlines()
        events = [json.loads(line) for line in log if line.startswith("{")]
        assert events[-1]["event"] == "node.stopped" and events[-1]["exit_code"] == 0
        assert all(e.get("node") == "n1" and e.get("az") == "az1" for e in events)
    finally:
        region.down()


SLOW = "import time\n\ndef handle(event, context):\n    time.sleep(event['s'])\n    return {'slept': event['s']}\n"


def test_sigterm_lets_a_running_invoke_finish_within_the_grace_then_exits_0(tmp_path):
    region = start_region(tmp_path, nodes=1, azs=1, settings={"shutdown_grace_s": 10.0, "record_executions": True})
    code = tmp_path / "slow"
    code.mkdir()
    (code / "handler.py").write_text(SLOW)
    outcome: dict = {}

    def invoke() -> None:
        with Client.from_region(region.root, timeout_s=30, retries=0) as client:
            try:
                outcome["result"] = client.invoke("slow", {"s": 2.0})
            except Exception as exc:  # what the test reports if the stop cut the invoke off
                outcome["error"] = exc

    try:
        with Client.from_region(region.root) as client:
            client.create_function("slow", code=code, handler="handler.handle", timeout_s=10)
        caller = threading.Thread(target=invoke)
        caller.start()
        wait_until(lambda: executions(region), 15, until=lambda ex: any(e.function == "slow" for e in ex),
                   what="the slow invoke to start")
        pid = region.pid("n1")
        os.kill(pid, signal.SIGTERM)
        caller.join(30)
        assert "error" not in outcome, f"the stop cut a running invoke off: {outcome.get('error')}"
        assert outcome["result"].function_error is None and outcome["result"].json() == {"slept": 2.0}
        assert wait_exit(pid, 15) == 0
    finally:
        region.down()


def test_a_crashed_role_is_restarted_and_repeated_crashes_end_the_node(tmp_path):
    region = start_region(tmp_path, nodes=1, azs=1, settings={"role_restarts": 2, "role_restart_window_s": 60})
    try:
        inject(region, "n1", "frontend")
        wait_restarted(region, "n1", "frontend", 1)
        region.wait_healthy(20)
        with Client.from_region(region.root) as client:
            client.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
            assert client.invoke("hello", {"name": "after restart"}).json()["message"] == "Hello, after restart!"
        status = {r["node"]: r for r in region.status()}
        assert status["n1"]["health"] == "healthy"
        pid = region.pid("n1")
        inject(region, "n1", "frontend")  # second restart: still within budget
        wait_restarted(region, "n1", "frontend", 2)
        inject(region, "n1", "frontend")  # third crash within the window: over budget, the node must exit
        code = wait_exit(pid, 15)
        assert code == 3, "a node whose role keeps crashing exits non-zero instead of running half alive"
        log = (region.root / "nodes" / "n1" / "node.log").read_text()
        assert '"role.giving_up"' in log and '"role": "frontend"' in log
    finally:
        region.down()


def test_cli_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "flint", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for command in ("node", "cluster", "function", "invoke", "demo"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "flint", "cluster", "up", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert "--nodes" in out.stdout and "--azs" in out.stdout and "--dir" in out.stdout


def test_node_with_a_bad_config_says_what_is_wrong(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('node_id = "n1"\nroles = ["chef"]\n')
    out = subprocess.run([sys.executable, "-m", "flint", "node", "--config", str(cfg)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and "unknown role 'chef'" in out.stderr


def test_a_stale_pid_file_never_gets_another_process_signalled(tmp_path, base_ip):
    """A node that died leaves its pid behind; by the time `cluster down` runs, that pid may be someone else's."""
    from nodes.local import Region

    region = Region.create(tmp_path / "region", nodes=1, azs=1, base_ip=base_ip)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (region.root / "nodes" / "n1" / "node.pid").write_text(str(stranger.pid))
        assert region.pid("n1") is None  # not a node: its pid file is stale
        region.down()
        assert stranger.poll() is None, "cluster down signalled a process that was not the node"
    finally:
        stranger.kill()
        stranger.wait()
