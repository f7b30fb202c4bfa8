"""What a sandbox is isolated with, and the system calls that do it.

Applied in the sandbox process after the zygote forks it and before any tenant code runs (worker/zygote.py):
its cgroups (made by the worker, worker/cgroups.py; the sandbox joins them), new pid, mount, ipc, uts and network
namespaces, a fresh read-only root with the runtime, the code at /var/task, a private /proc and a size-limited
/tmp, an unprivileged uid with every capability dropped, no_new_privs, a seccomp filter, rlimits.

Without root only the last four can be had (rlimits, no_new_privs, seccomp, and the process boundary itself);
`probe()` says which apply here, and the worker reports it to placement and `flint cluster status`.

Imported by the worker (`probe`) and by the zygote process, which loads this file by path as `isolation`, not
as `worker.isolation`: it must import nothing of the node, and nothing of its own package at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.cgroups import (
        Cgroups,  # not at run time: the zygote imports this file outside the package
    )

# --- constants from the kernel headers -----------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# Refused inside every sandbox (EPERM), beyond what the dropped capabilities already forbid: no mounts, no
# tracing, no BPF, no new namespaces, no kernel keyrings, no perf, no kernel modules, no kexec, no io_uring, and
# the like.
DENIED_SYSCALLS = (
    "mount", "umount2", "pivot_root", "chroot", "ptrace", "process_vm_readv", "process_vm_writev", "bpf",
    "unshare", "setns", "keyctl", "add_key", "request_key", "perf_event_open", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "open_by_handle_at",
    "name_to_handle_at", "userfaultfd", "acct", "quotactl", "syslog", "iopl", "ioperm", "lookup_dcookie",
    "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree", "mount_setattr",
    # io_uring: a large attack surface of its own, and its requests bypass the filter; Docker and gVisor refuse it
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
# Socket families a function has no use for: AF_VSOCK (the hypervisor's side) and AF_NETLINK (the kernel's
# network, audit and device configuration). socket() and socketpair() in them are refused (EPERM).
AF_NETLINK = 16
AF_VSOCK = 40
DENIED_SOCKET_FAMILIES = (AF_NETLINK, AF_VSOCK)
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
                   CLONE_NEWCGROUP)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


_pyapi = ctypes.PyDLL(None)  # calls through it keep the GIL, as os.fork does
SIGCHLD = 17
SYS_clone = 56  # x86_64


def fork_into_namespaces(flags: int) -> int:
    """fork(), but the child starts in new namespaces (clone with namespace flags): in a new pid namespace the
    child itself is pid 1, with no helper process in between. CPython's own fork hooks run around it exactly as
    os.fork() runs them; the caller must be single-threaded (the zygote is)."""
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _pyapi.syscall(ctypes.c_long(SYS_clone), ctypes.c_ulong(flags | SIGCHLD), ctypes.c_void_p(0),
                         ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_ulong(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    SYS_pivot_root = 155  # x86_64
    _check(_libc.syscall(ctypes.c_long(SYS_pivot_root), new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), f"prctl {option}")


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, ctypes.c_size_t(len(data))), "sethostname")


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies; cleared by uid changes, so set again after dropping root."""
    prctl(PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent:
        os._exit(1)


def set_command_line(args: list[str]) -> None:
    """Overwrite this process's argument area, which /proc/PID/cmdline shows to anyone in its pid namespace: a
    fork of the zygote would show the zygote's command (its path on the host, the worker's pid)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state) on: comm may hold spaces
    start, end = int(fields[48 - 3]), int(fields[49 - 3])  # arg_start and arg_end (proc(5))
    data = b"\0".join(a.encode() for a in args)[:end - start - 1]
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, data, len(data))


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets; the switch to an unprivileged uid then empties the rest."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_rlimits(tmp_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    fsize = max(tmp_mb, 16) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def set_fallback_limits(memory_mb: int, pids_max: int) -> None:
    """Without cgroups (no root, or no cgroupfs): the address space capped at what the process maps already plus
    the function's memory (a handler past it gets MemoryError, which the runtime reports as out of memory), and
    processes capped at what this uid runs already plus the pids limit (a fork bomb stops there)."""
    mapped = 0
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    address_space = mapped + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    uid = os.getuid()
    running = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                running += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    nproc = running + pids_max
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard != resource.RLIM_INFINITY:
        nproc = min(nproc, hard)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def seccomp_filter() -> Any:
    """The filter every sandbox loads (pyseccomp over libseccomp). Built once in the zygote, loaded per sandbox."""
    import pyseccomp as seccomp

    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # a call this kernel/arch does not have
    for family in DENIED_SOCKET_FAMILIES:
        for call in ("socket", "socketpair"):
            f.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.EQ, family))
    for flag in NAMESPACE_FLAGS:  # clone() asking for any new namespace
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    try:
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags live in memory seccomp cannot read
    except (RuntimeError, ValueError, OSError):
        pass
    return f


# --- what applies here -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Capabilities:
    root: bool
    namespaces: bool
    cgroups: int  # 0, 1 or 2
    seccomp: bool
    reasons: list[str]
    freezer: bool = False  # idle sandboxes are frozen (cgroup freezer)

    @property
    def full(self) -> bool:
        return self.root and self.namespaces and self.cgroups > 0 and self.seccomp

    def label(self) -> str:
        """One word for status tables, the details for `flint cluster status --json`."""
        if self.full:
            return f"full(cgroup-v{self.cgroups})"
        parts = ["process", "rlimits", "no_new_privs"] + (["seccomp"] if self.seccomp else [])
        return "partial:" + "+".join(parts)

    def details(self) -> dict[str, Any]:
        applied = ["process", "rlimits", "no_new_privs"]
        if self.seccomp:
            applied.append("seccomp")
        if self.root and self.namespaces:
            applied += ["pid/mnt/net/ipc/uts namespaces", "pivot_root", "/proc", "own /etc", "/tmp tmpfs", "uid",
                        "caps dropped"]
        if self.cgroups:
            applied.append(f"cgroup-v{self.cgroups} memory/pids/cpu")
        else:
            applied.append("address-space and process-count rlimits in place of cgroups")
        missing = list(self.reasons)
        if self.freezer:
            applied.append("freezer (idle sandboxes frozen)")
        else:
            missing.append("no cgroup freezer here: idle sandboxes are not frozen (threads a handler leaves running "
                           "keep using CPU between invokes)")
        if not (self.root and self.namespaces):
            missing.append("the host's /etc and /proc are visible to sandboxes (no mount or pid namespace)")
        return {"level": self.label(), "applied": applied, "missing": missing}


def probe(cgroups: Cgroups | None) -> Capabilities:
    reasons: list[str] = []
    root = os.geteuid() == 0
    if not root:
        reasons.append("not root: no namespaces, cgroups, uid switch or capability drop")
    namespaces = False
    if root:
        pid = os.fork()
        if pid == 0:
            try:
                unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        namespaces = os.waitstatus_to_exitcode(status) == 0
        if not namespaces:
            reasons.append("unshare of namespaces refused here")
    version = cgroups.version if (root and cgroups is not None) else 0
    if root and cgroups is not None and not cgroups.available:
        reasons.append(cgroups.reason)
    try:
        seccomp_filter()
        has_seccomp = True
    except Exception as exc:  # pyseccomp missing or libseccomp unusable
        has_seccomp = False
        reasons.append(f"seccomp unavailable: {exc}")
    freezer = bool(version and cgroups is not None and cgroups.freezer)
    return Capabilities(root, namespaces, version, has_seccomp, reasons, freezer)
