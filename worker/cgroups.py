"""Per-sandbox cgroups (memory = the function's memory, pids, CPU in proportion to memory; the freezer, which
holds an idle sandbox still between invokes), on cgroup v1 or v2.

Runs in the worker: it makes a slot's cgroups before the zygote forks the slot, which joins them itself
(worker/zygote.py only writes its pid to the `procs_files` it is given). `host_cgroups()` picks the version this
host has; `CgroupsV1` and `CgroupsV2` make the groups, `SandboxCgroupV1` and `SandboxCgroupV2` are one sandbox's.

A worker's groups go under a parent of its own (`parent_name`), its paths recorded in the node's data dir: a start
clears all an earlier process of the node left (a v1 path can differ between starts), `close()` leaves nothing,
and `clear_recorded` clears a node killed and never restarted (nodes/local.py, on `down`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar

CONTROLLERS = ("memory", "pids", "cpu")
FREEZER = "freezer"  # v1: its own hierarchy, used when mounted; v2: cgroup.freeze in every group (Linux 5.2+)
# v1: the kernel switches its freezer on (a static key: about 100 us of code patching) when a first group
# freezes and off when the last thaws; this empty group stays frozen so a sandbox's freeze or thaw costs ~5 us.
FREEZER_KEEPER = "keep-frozen"
CPU_PERIOD_US = 100_000
MB_PER_CORE = 1769  # as Lambda: a function with 1769 MB gets one full core
SLOT_GROUP = re.compile(r"slot-\d+-\d+")  # a sandbox's group: slot-<worker pid>-<n> (worker/slots.py)
EMPTY_WAIT_S = 5.0  # a killed sandbox's group can go only once its last process is reaped (slow on a loaded host)
RECORD = "sandbox-cgroups"  # in a node's data dir: the parents its worker made, for `clear_recorded`


def parent_name(node_id: str, data_dir: Path) -> str:
    """The parent of a node's sandboxes' groups: two local regions on one host both have an n1, never one data dir."""
    return f"flint-{node_id}-{hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]}"


def cpu_quota_us(memory_mb: int, cores: int) -> int:
    return max(1000, min(cores * CPU_PERIOD_US, CPU_PERIOD_US * memory_mb // MB_PER_CORE))


# --- one sandbox's cgroups -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class SandboxCgroup:
    """The cgroup directories of one sandbox: where its processes go, and what to read after it dies."""

    version: ClassVar[int] = 0
    procs_files: list[str]  # a pid written to each joins the sandbox's cgroups
    dirs: list[Path]
    freezer: Path | None = None  # the file freeze() and thaw() write; None where there is no freezer

    def freeze(self) -> None:
        """Stop every process of the sandbox where it is (an idle sandbox burns no CPU); thaw() resumes them. A
        no-op where there is no freezer."""

    def thaw(self) -> None:
        """Resume what freeze() stopped."""

    def configure(self, memory_mb: int) -> None:
        """Set the function's memory on a prepared slot's cgroup (no process has to move)."""
        raise NotImplementedError

    def limit_cpu(self, memory_mb: int, cores: int) -> None:
        """The function's CPU share, applied once its runtime is ready: init runs unthrottled, as on Lambda."""
        raise NotImplementedError

    def oom_killed(self) -> bool:
        raise NotImplementedError

    def pids(self) -> list[int]:
        try:  # os-level: this runs after every warm invoke
            fd = os.open(self.procs_files[0], os.O_RDONLY)
            try:
                return [int(p) for p in os.read(fd, 1 << 16).split()]
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError):
            return []

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.thaw()  # a frozen process dies only once thawed (v1)

    def _set_freezer(self, value: bytes) -> None:
        if self.freezer is None:
            return
        try:  # os-level: this runs twice per warm invoke
            fd = os.open(self.freezer, os.O_WRONLY)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass  # the group is gone already

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


class SandboxCgroupV1(SandboxCgroup):
    """dirs: the sandbox's group in the memory, pids and cpu hierarchies, in that order, then the freezer's."""

    version = 1

    def freeze(self) -> None:
        self._set_freezer(b"FROZEN")

    def thaw(self) -> None:
        self._set_freezer(b"THAWED")

    def configure(self, memory_mb: int) -> None:
        limit = memory_mb * 1024 * 1024
        mem = self.dirs[0]
        if (mem / "memory.memsw.limit_in_bytes").exists():
            # memsw must stay >= the memory limit: order the two writes by direction
            current = int((mem / "memory.limit_in_bytes").read_text())
            first, second = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
            if limit > current:
                first, second = second, first
            _write(mem / first, limit)
            _write(mem / second, limit)
        else:
            _write(mem / "memory.limit_in_bytes", limit)

    def limit_cpu(self, memory_mb: int, cores: int) -> None:
        _write(self.dirs[2] / "cpu.cfs_quota_us", cpu_quota_us(memory_mb, cores))

    def oom_killed(self) -> bool:
        for d in self.dirs:
            if (d / "memory.oom_control").exists():
                m = re.search(r"oom_kill (\d+)", (d / "memory.oom_control").read_text())
                if m and int(m.group(1)) > 0:
                    return True
                if (d / "memory.failcnt").exists() and int((d / "memory.failcnt").read_text() or 0) > 0:
                    limit = int((d / "memory.limit_in_bytes").read_text())
                    peak = int((d / "memory.max_usage_in_bytes").read_text())
                    return peak >= limit - 4 * 1024 * 1024
        return False


class SandboxCgroupV2(SandboxCgroup):
    """dirs: the sandbox's one group in the unified hierarchy."""

    version = 2

    def freeze(self) -> None:
        self._set_freezer(b"1")

    def thaw(self) -> None:
        self._set_freezer(b"0")

    def configure(self, memory_mb: int) -> None:
        _write(self.dirs[0] / "memory.max", memory_mb * 1024 * 1024)

    def limit_cpu(self, memory_mb: int, cores: int) -> None:
        _write(self.dirs[0] / "cpu.max", f"{cpu_quota_us(memory_mb, cores)} {CPU_PERIOD_US}")

    def oom_killed(self) -> bool:
        for d in self.dirs:
            if (d / "memory.events").exists():
                m = re.search(r"oom_kill (\d+)", (d / "memory.events").read_text())
                return bool(m and int(m.group(1)) > 0)
        return False


# --- the host's cgroups --------------------------------------------------------------------------------------------


class Cgroups:
    """Makes per-sandbox cgroups under the worker's own cgroup; `version` 0 (and `reason`) when it cannot."""

    version = 0
    reason = ""  # why cgroups are not available here
    freezer = False  # whether idle sandboxes can be frozen here
    record: Path | None = None  # where the parents' paths are written down (the node's data dir)

    @property
    def available(self) -> bool:
        return self.version in (1, 2)

    parent_dirs: tuple[Path, ...] = ()  # the groups its sandboxes' groups go under

    def close(self) -> None:
        """On a clean stop, after the sandboxes' own clean-up: whatever is left is killed and removed, the
        parents too, so nothing of this worker stays on the host."""
        _sweep(self.parent_dirs)
        if self.record is not None:
            clear_recorded(self.record)  # and what an earlier process left too busy to go at this one's start

    def create(self, sandbox_id: str, memory_mb: int, pids_max: int, cores: int,
               quota_now: bool = True) -> SandboxCgroup:
        raise NotImplementedError


class NoCgroups(Cgroups):
    def __init__(self, reason: str):
        self.reason = reason

    def create(self, sandbox_id: str, memory_mb: int, pids_max: int, cores: int,
               quota_now: bool = True) -> SandboxCgroup:
        raise RuntimeError(f"no cgroups here: {self.reason}")


class CgroupsV1(Cgroups):
    """One hierarchy per controller: a sandbox gets a group in each of memory, pids and cpu, and in the freezer's
    when this host mounts it."""

    version = 1

    def __init__(self, parents: dict[str, Path], record: Path | None = None):
        self.parents = parents  # controller -> the worker's group for its sandboxes
        self.parent_dirs = tuple(parents.values())
        self.freezer = FREEZER in parents
        self.record = record

    @classmethod
    def setup(cls, parents: dict[str, Path], record: Path | None = None) -> Cgroups:
        reason = _start_clean(list(parents.values()), record)
        if reason:
            return NoCgroups(reason)
        if FREEZER in parents:
            try:
                (parents[FREEZER] / FREEZER_KEEPER).mkdir(exist_ok=True)
                _write(parents[FREEZER] / FREEZER_KEEPER / "freezer.state", "FROZEN")
            except OSError:
                parents = {c: p for c, p in parents.items() if c != FREEZER}  # no freezer, then
        return cls(parents, record)

    def create(self, sandbox_id: str, memory_mb: int, pids_max: int, cores: int,
               quota_now: bool = True) -> SandboxCgroup:
        limit = memory_mb * 1024 * 1024
        dirs = {c: self.parents[c] / sandbox_id for c in (*CONTROLLERS, FREEZER) if c in self.parents}
        for d in dirs.values():
            d.mkdir(exist_ok=True)
        _write(dirs["memory"] / "memory.limit_in_bytes", limit)
        if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
            _write(dirs["memory"] / "memory.memsw.limit_in_bytes", limit)  # no escape into swap
        _write(dirs["memory"] / "memory.swappiness", 0, optional=True)
        _write(dirs["pids"] / "pids.max", pids_max)
        _write(dirs["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(dirs["cpu"] / "cpu.cfs_quota_us", cpu_quota_us(memory_mb, cores) if quota_now else -1)
        return SandboxCgroupV1([str(d / "cgroup.procs") for d in dirs.values()], list(dirs.values()),
                               dirs[FREEZER] / "freezer.state" if FREEZER in dirs else None)


class CgroupsV2(Cgroups):
    """The unified hierarchy: a sandbox gets one group, with the controllers enabled down the subtree."""

    version = 2

    def __init__(self, parent: Path, record: Path | None = None):
        self.parent = parent  # the worker's group for its sandboxes
        self.parent_dirs = (parent,)
        self.freezer = (parent / "cgroup.freeze").exists()
        self.record = record

    @classmethod
    def setup(cls, mount: Path, parent: Path, record: Path | None = None) -> Cgroups:
        available = (mount / "cgroup.controllers").read_text().split()
        if not all(c in available for c in CONTROLLERS):
            return NoCgroups(f"cgroup v2 lacks controllers {set(CONTROLLERS) - set(available)}")
        reason = _start_clean([parent], record)
        if reason:
            return NoCgroups(reason)
        try:
            # a cgroup with processes cannot hand controllers to children: ours must be delegated to us
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
        except OSError as exc:
            return NoCgroups(f"cgroup v2 controllers not delegated here ({exc.strerror})")
        return cls(parent, record)

    def create(self, sandbox_id: str, memory_mb: int, pids_max: int, cores: int,
               quota_now: bool = True) -> SandboxCgroup:
        d = self.parent / sandbox_id
        d.mkdir(exist_ok=True)
        _write(d / "memory.max", memory_mb * 1024 * 1024)
        _write(d / "memory.swap.max", 0, optional=True)
        _write(d / "pids.max", pids_max)
        _write(d / "cpu.max", f"{cpu_quota_us(memory_mb, cores) if quota_now else 'max'} {CPU_PERIOD_US}")
        return SandboxCgroupV2([str(d / "cgroup.procs")], [d], d / "cgroup.freeze" if self.freezer else None)


def host_cgroups(name: str, mount: Path = Path("/sys/fs/cgroup"),
                 self_cgroup: Path = Path("/proc/self/cgroup"), record: Path | None = None) -> Cgroups:
    """The cgroups this host has, with a group `name` made under the worker's own for its sandboxes: v1 when
    memory, pids and cpu each have their hierarchy, else v2; `NoCgroups` saying why when neither can be used.
    `name` is this worker's alone (`parent_name`): what is under it, or under the parents `record` names, is cleared."""
    try:
        v1: dict[str, str] = {}  # controller -> our path in its hierarchy
        v2_path = None
        for line in self_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            if controllers == "":
                v2_path = path
            for c in controllers.split(","):
                v1[c] = path
        if all(c in v1 and (mount / c).is_dir() for c in CONTROLLERS):
            present = [c for c in (*CONTROLLERS, FREEZER) if c in v1 and (mount / c).is_dir()]
            return CgroupsV1.setup({c: mount / c / v1[c].lstrip("/") / name for c in present}, record)
        if v2_path is not None and (mount / "cgroup.controllers").exists():
            return CgroupsV2.setup(mount, mount / v2_path.lstrip("/") / name, record)
    except OSError as exc:
        return NoCgroups(f"cgroups unreadable: {exc.strerror}")
    return NoCgroups("no cgroup hierarchy with memory, pids and cpu")


def clear_recorded(record: Path) -> None:
    """Clears the parents a worker's start wrote to `record`, as its `close()` would have (the node was killed)."""
    if _sweep(_recorded(record)):
        record.unlink(missing_ok=True)  # else the next start, or the region's down, tries again


def _recorded(record: Path) -> list[Path]:
    try:  # only a worker's parents, never what a damaged file might name
        return [Path(p) for p in record.read_text().splitlines() if Path(p).name.startswith("flint-")]
    except OSError:
        return []  # nothing recorded: no worker ran there, or it stopped cleanly


def _start_clean(parents: list[Path], record: Path | None) -> str:
    """A worker's start: what an earlier process of this node left is cleared (the parents it recorded, and
    whatever is under these), the parents made and recorded. The reason they could not be made, or ''."""
    earlier = _recorded(record) if record is not None else []
    _sweep([*earlier, *parents])  # the parents' name is this node's alone: no live worker has a group under them
    reason = _make(parents)
    if not reason and record is not None:
        busy = [p for p in earlier if p.exists() and p not in parents]  # cleared when this worker stops
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text("".join(f"{p}\n" for p in [*parents, *busy]))
    return reason


def _sweep(parents) -> bool:
    """Kills what runs in the sandbox groups under `parents`, thawed (a frozen process dies only once thawed, and
    would outlive the parent-death signal meant to end it), removes them once the kernel has reaped it, the
    freezer's keeper too, then each parent unless something else is left under it. Whether all of them went."""
    groups: list[Path] = []
    for parent in parents:
        try:
            groups += [d for d in parent.iterdir() if SLOT_GROUP.fullmatch(d.name) or d.name == FREEZER_KEEPER]
        except OSError:
            pass  # no such parent: nothing to clear there
    for group in groups:
        freezer = next((group / f for f in ("freezer.state", "cgroup.freeze") if (group / f).exists()), None)
        kind = SandboxCgroupV1 if freezer is not None and freezer.name == "freezer.state" else SandboxCgroupV2
        kind([str(group / "cgroup.procs")], [group], freezer).kill_all()  # each killed, then thawed
    deadline = time.monotonic() + EMPTY_WAIT_S
    for group in groups:
        while not _rmdir(group) and time.monotonic() < deadline:
            time.sleep(0.01)
    for parent in parents:
        _rmdir(parent)  # unless a group is still busy, or something not ours is under it
    return not any(p.exists() for p in parents)


def _rmdir(group: Path) -> bool:
    """Removes an empty group; False only while the kernel still holds it (EBUSY: a process not yet reaped)."""
    try:
        group.rmdir()
    except OSError as exc:
        return exc.errno != errno.EBUSY
    return True


def _make(dirs) -> str:
    """Creates the directories; the reason it could not, or ''."""
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        return ""
    except OSError as exc:
        return f"cannot create cgroups ({exc.strerror})"


def _write(path: Path, value: Any, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError:
        if not optional:
            raise
