"""A local region's node processes: start, signal, stop and kill them, by the pid each leaves in nodes/<id>/node.pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nodes.layout import RegionDir, RegionError
from wire.config import Ports


class NodeProcesses:
    def __init__(self, files: RegionDir):
        self.files = files

    def pid(self, node_id: str) -> int | None:
        """The node's process, if it runs. A pid file left by a node that died may name another process by now:
        only a live process whose command line runs this node's config counts, so no stranger is signalled."""
        try:
            pid = int((self.files.node_dir(node_id) / "node.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and _runs(pid, self._config_path(node_id)) else None

    def _config_path(self, node_id: str) -> str:
        return str(self.files.node_dir(node_id) / "node.toml")

    def start_node(self, node_id: str) -> int:
        self.files.node(node_id)
        if self.pid(node_id) is not None:
            return self.pid(node_id)  # type: ignore[return-value]
        data_dir = self.files.node_dir(node_id)
        log = open(data_dir / "node.log", "ab")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parent.parent)  # nodes run the same code as this command
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flint", "node", "--config", self._config_path(node_id)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        (data_dir / "node.pid").write_text(str(proc.pid))
        return proc.pid

    def start(self) -> None:
        for n in self.files.nodes():
            self.start_node(n["node_id"])

    def signal_node(self, node_id: str, sig: int) -> int | None:
        pid = self.pid(node_id)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
        return pid

    def kill_node(self, node_id: str) -> int | None:
        """SIGKILL the node; its sandboxes die with it (parent-death signal)."""
        pid = self.signal_node(node_id, signal.SIGKILL)
        if pid is not None:
            _wait_gone(pid, 5.0)
        return pid

    def kill_az(self, az: str) -> dict[str, int | None]:
        """SIGKILL every node tagged with `az`."""
        nodes = [n["node_id"] for n in self.files.nodes() if n["az"] == az]
        if not nodes:
            azs = sorted({n["az"] for n in self.files.nodes()})
            raise RegionError(f"no node is in {az}; AZs are {', '.join(azs)}")
        return {node_id: self.kill_node(node_id) for node_id in nodes}

    def pause_node(self, node_id: str) -> int | None:
        """SIGSTOP: the node freezes (its sandboxes run on) - a hung host, not a dead one."""
        return self.signal_node(node_id, signal.SIGSTOP)

    def resume_node(self, node_id: str) -> int | None:
        return self.signal_node(node_id, signal.SIGCONT)

    def stop_node(self, node_id: str, timeout_s: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL if it has not stopped within `timeout_s`. True if it stopped cleanly."""
        pid = self.signal_node(node_id, signal.SIGTERM)
        if pid is None:
            return True
        if _wait_gone(pid, timeout_s):
            return True
        self.kill_node(node_id)
        return False

    def stop(self) -> dict[str, bool]:
        """Stop every node, all told at once; per node, True if it stopped cleanly."""
        result = {}
        nodes = self.files.nodes()
        for n in nodes:
            self.signal_node(n["node_id"], signal.SIGTERM)
        for n in nodes:
            result[n["node_id"]] = self.stop_node(n["node_id"])
        return result


def check_free(address: str, ports: Ports) -> None:
    """Refuse an address whose ports a node could not bind (another region, or anything else, holds one)."""
    for name, port in ports.as_dict().items():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services bind: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as exc:
            raise RegionError(
                f"{address}:{port} ({name}) is taken ({exc.strerror}); is another region running? "
                "Pick other addresses with --base-ip"
            ) from None
        finally:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _runs(pid: int, config_path: str) -> bool:
    """Whether process `pid` is a Flint node started with `config_path`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return "node" in args and config_path in args


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False
