"""Prepared slots: sandboxes forked and isolated ahead of need, so a cold start only assigns a function.

A slot is a fork of the zygote (worker/zygote_client.py) in its own cgroups (worker/cgroups.py), namespaces and
root filesystem, waiting on its channel; `SandboxProcess` (worker/sandbox.py) takes one and gives it a function.
`SlotPool.discard` is how every slot and sandbox ends: process, cgroups and run directory all go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
import signal
import site
import socket
import sys
from pathlib import Path

import structlog

from wire.messages import SYNC_PAYLOAD_MAX_BYTES
from worker.cgroups import Cgroups, SandboxCgroup
from worker.network import SandboxLink, SandboxNetwork, no_safe_network
from worker.zygote_client import Zygote

log = structlog.get_logger("worker.slots")

SYSTEM_BINDS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin")
# Of the host's /etc, only this: the loader's map of system libraries, the alternatives' links (/usr/bin/awk and
# the like point there), and with network what TLS needs (the CA certificates, OpenSSL's settings). The rest of a
# sandbox's /etc is its own (sandbox_etc).
ETC_BINDS = ("/etc/ld.so.cache", "/etc/alternatives")
NETWORK_ETC_BINDS = ("/etc/ssl/certs", "/etc/ssl/openssl.cnf")
UID_BASE = 100_000  # sandboxes run as uids UID_BASE.. UID_BASE+UID_SPAN, one per live sandbox
UID_SPAN = 50_000
LINE_MAX_BYTES = SYNC_PAYLOAD_MAX_BYTES + 64 * 1024  # RESULT, the request id, and the response itself


def runtime_binds() -> list[str]:
    """The system and this interpreter's install (stdlib, site-packages), bound read-only into every sandbox."""
    paths = list(SYSTEM_BINDS)
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}:
        p = os.path.realpath(p)
        if not any(p == b or p.startswith(b + "/") for b in paths):
            paths.append(p)
    return paths


def sandbox_etc(uid: int, network: bool, resolv_conf: str | None) -> dict[str, str]:
    """The files of a sandbox's own /etc: a user and a group for its uid alone, localhost, the name service
    switch Python's pwd, grp and socket modules read; the host's resolver settings only with network. Nothing
    of the host's users, groups or hosts."""
    user = f"sbx_user{uid}"
    files = {
        "/etc/passwd": f"{user}:x:{uid}:{uid}::/tmp:/sbin/nologin\n",
        "/etc/group": f"{user}:x:{uid}:\n",
        "/etc/hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "/etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    }
    if network and resolv_conf is not None:
        files["/etc/resolv.conf"] = resolv_conf
    return files


@dataclasses.dataclass
class Slot:
    """A sandbox prepared ahead of need: cgroups joined, namespaces entered, root filesystem built; waiting on
    its channel for a function."""

    slot_id: str
    run_dir: Path
    network: bool
    cgroup: SandboxCgroup | None
    pid: int = 0
    link: SandboxLink | None = None  # its veth and address, with network (worker/network.py)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None


class SlotPool:
    """Keeps `size` slots without network ready, so a cold start only binds code, pivots and drops privileges;
    a slot with network (rare) is prepared when asked for, and wired by `network` (none: refused)."""

    _seq = itertools.count()

    def __init__(self, zygote: Zygote, cgroups: Cgroups | None, run_root: Path, *, size: int = 4,
                 pids_max: int = 64, tmp_mb: int = 64, freeze_after_s: float = 0.05,
                 network: SandboxNetwork | None = None):
        self.zygote = zygote
        self.network = network
        self.cgroups = cgroups if (cgroups is not None and cgroups.available and zygote.caps.root) else None
        self.run_root = run_root
        self.size = size
        self.pids_max = pids_max
        self.tmp_mb = tmp_mb
        self.freeze_after_s = freeze_after_s  # an idle sandbox is frozen this long after its last invoke
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
                if not self.zygote.alive:
                    return  # the worker replaces the zygote and this pool with it (WorkerService._restart_zygote)
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
            if self.zygote.running(slot.slot_id):
                return slot
            await self.discard(slot)  # died while waiting (zygote restart)
        self._wanted.set()
        return await self.prepare(network=network)

    async def prepare(self, network: bool) -> Slot:
        if network and (self.network is None or not self.network.available):
            raise no_safe_network(self.network.why if self.network else "no sandbox network on this pool")
        slot_id = f"slot-{os.getpid()}-{next(self._seq)}"
        run_dir = self.run_root / slot_id
        run_dir.mkdir(parents=True, exist_ok=True)
        cgroup = (self.cgroups.create(slot_id, 128, self.pids_max, self.zygote.cores, quota_now=False)
                  if self.cgroups else None)
        slot = Slot(slot_id, run_dir, network, cgroup)
        log_fd = os.open(run_dir / "log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)  # RDWR: the runtime reads its tail
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        uid = UID_BASE + next(self._seq) % UID_SPAN
        request = {
            "id": slot_id,
            "root_dir": str(run_dir / "root"),
            "binds": runtime_binds() + list(ETC_BINDS) + (list(NETWORK_ETC_BINDS) if network else []),
            "files": sandbox_etc(uid, network, self.network.resolv_conf if network and self.network else None),
            "network": network,
            "uid": uid,
            "tmp_mb": self.tmp_mb,
            "pids_max": self.pids_max,
            "cgroup_procs": cgroup.procs_files if cgroup else [],
        }
        try:
            slot.pid = await self.zygote.spawn(request, [theirs.fileno(), log_fd])
        except BaseException:
            ours.close()
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
            os.close(log_fd)
        # a custom runtime's result is one line: the reader's limit must hold the largest response
        slot.reader, slot.writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_MAX_BYTES)
        if network:
            try:
                slot.link = await self.network.attach(slot.pid)
            except BaseException:
                await self.discard(slot)
                raise
        return slot

    def kill(self, slot: Slot) -> bool:
        """SIGKILL the slot's process if it still runs; True if it did. It is pid 1 of its pid namespace, so all
        inside die with it."""
        if not (slot.pid and self.zygote.running(slot.slot_id)):
            return False
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if slot.cgroup is not None:
            slot.cgroup.thaw()  # a frozen process dies only once thawed
        return True

    async def discard(self, slot: Slot) -> None:
        if slot.writer is not None:
            slot.writer.close()  # an unassigned slot exits when its channel closes
        if self.kill(slot):
            try:
                await asyncio.wait_for(asyncio.shield(self.zygote.exits[slot.slot_id]), 2.0)
            except asyncio.TimeoutError:
                pass
        self.zygote.forget(slot.slot_id)
        if slot.link is not None and self.network is not None:
            await self.network.detach(slot.link)
            slot.link = None
        if slot.cgroup is not None:
            slot.cgroup.kill_all()
            await _remove_cgroup(slot.cgroup)
        shutil.rmtree(slot.run_dir, ignore_errors=True)

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
        slots, self.ready = self.ready, []
        await asyncio.gather(*(self.discard(s) for s in slots), return_exceptions=True)


async def _remove_cgroup(cgroup: SandboxCgroup) -> None:
    for _ in range(50):  # the kernel frees a cgroup once its last task is reaped
        cgroup.remove()
        if not any(d.exists() for d in cgroup.dirs):
            return
        await asyncio.sleep(0.01)
