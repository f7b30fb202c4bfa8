"""The zygote: one single-threaded process per runtime with the runtime already imported. A sandbox is a fork.

Started by the worker as `python -I zygote.py CONFIG_JSON`, with a SOCK_SEQPACKET socket at config["fd"]. Each
request on it is one msgpack map with two file descriptors attached (SCM_RIGHTS): the sandbox's end of its
control channel and its log file. The zygote forks a slot; the slot isolates itself (worker/isolation.py) as far
as it can without knowing its function, then waits. When the worker assigns a function on the slot's channel,
the slot finishes isolating and becomes the runtime: the Python bootstrap loop, or `exec` of a custom runtime's
/var/task/bootstrap. The zygote answers {"t": "spawned", "id", "pid"} and later {"t": "exited", "id", "status"}
(exit code, or -signal).

Nothing of the node is imported here: no keys, no sockets but this one, which every sandbox closes first,
with every other descriptor and signal handler of the zygote's (`fresh_process`).
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bootstrap  # noqa: E402  (the Python runtime, imported once here so every fork has it)
import isolation as iso  # noqa: E402
import msgpack  # noqa: E402

sys.path.remove(HERE)
iso.seccomp_filter()  # load pyseccomp and libseccomp now, so no fork has to
gc.collect()
gc.freeze()  # forks share these pages: keep the collector from touching (and so copying) them

MAX_REQUEST = 64 * 1024
RUNTIME_ARGV = ["python3", "bootstrap.py"]  # what a sandbox's pid 1 says it runs
CHANNEL_FD = 3  # in a sandbox: 0 is /dev/null, 1 and 2 the log, 3 the channel, and nothing else
FD_LIMIT = 1 << 20  # the kernel's most (fs.nr_open's default): every descriptor above the channel is closed
# The handlers a fresh interpreter has (this module runs first in one): a sandbox gets these back, not ours.
FRESH_SIGNALS = {sig: signal.getsignal(sig) for sig in signal.valid_signals()
                 if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) is not None}


class Zygote:
    def __init__(self, config: dict):
        self.config = config
        self.sock = socket.socket(fileno=config["fd"])
        self.isolate = bool(config.get("isolate"))
        self.filter = iso.seccomp_filter() if config.get("seccomp") else None
        gc.freeze()
        self.children: dict[int, str] = {}
        self.pid = os.getpid()

    def serve(self) -> None:
        iso.die_with_parent(self.config["worker_pid"])
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready, _, _ = select.select([self.sock, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                self._reap()
            if self.sock in ready:
                try:
                    data, fds, _, _ = socket.recv_fds(self.sock, MAX_REQUEST, 4)
                except InterruptedError:
                    continue
                except OSError:
                    return  # the worker is gone; our children die with us (parent-death signal)
                if not data:
                    return  # the worker is gone; our children die with us (parent-death signal)
                self._spawn(msgpack.unpackb(data, raw=False), fds)

    def _spawn(self, req: dict, fds: list[int]) -> None:
        if self.isolate:
            # a network namespace of its own always: with network, the worker wires a veth into it
            flags = iso.CLONE_NEWNS | iso.CLONE_NEWIPC | iso.CLONE_NEWUTS | iso.CLONE_NEWPID | iso.CLONE_NEWNET
            pid = iso.fork_into_namespaces(flags)  # the child is pid 1 of its own pid namespace
        else:
            pid = os.fork()
        if pid == 0:
            try:
                self.sock.close()
                chan_fd = fresh_process(*fds[:2])
                sandbox(req, chan_fd, self.isolate, self.filter, self.pid)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        self.children[pid] = req["id"]
        self._send({"t": "spawned", "id": req["id"], "pid": pid})

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sandbox_id = self.children.pop(pid, None)
            if sandbox_id is not None:
                self._send({"t": "exited", "id": sandbox_id, "status": os.waitstatus_to_exitcode(status)})

    def _send(self, msg: dict) -> None:
        self.sock.send(msgpack.packb(msg, use_bin_type=True))


def fresh_process(chan_fd: int, log_fd: int) -> int:
    """In the forked child, first: nothing of the zygote's reaches tenant code. Only /dev/null (0), the log (1
    and 2) and the channel (3, returned) stay open; every signal handler is as a fresh interpreter has it, none
    is blocked, and no wake-up fd is set. (The zygote's wake-up pipe was fds 3 and 4: a sandbox that kept its
    write end could make it blocking, fill it, and so block the zygote in its next SIGCHLD handler for good.)"""
    signal.set_wakeup_fd(-1)
    for sig, handler in FRESH_SIGNALS.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    if chan_fd != CHANNEL_FD:
        os.dup2(chan_fd, CHANNEL_FD, inheritable=False)
    else:
        os.set_inheritable(CHANNEL_FD, False)
    os.closerange(CHANNEL_FD + 1, FD_LIMIT)  # the original channel and log, devnull, the zygote's pipe, any other
    return CHANNEL_FD


def sandbox(req: dict, chan_fd: int, isolate: bool, filt, zygote_pid: int) -> None:
    """In the forked child, once fresh_process has left it only its own descriptors. Phase one, ahead of need:
    join the slot's cgroups, enter new namespaces, build the root filesystem. Phase two, when the worker assigns
    a function on the channel: bind its code, pivot into the new root, drop every privilege, load the seccomp
    filter, and become the runtime. Never returns."""
    channel = bootstrap.Channel(chan_fd, chan_fd)
    runtime = "python3"
    try:
        iso.set_command_line(RUNTIME_ARGV)  # not the zygote's command line, in /proc or in sys
        sys.argv[:] = RUNTIME_ARGV[1:]
        sys.orig_argv[:] = RUNTIME_ARGV
        os.setsid()
        iso.prctl(iso.PR_SET_PDEATHSIG, 9)
        if not isolate and os.getppid() != zygote_pid:
            os._exit(1)  # the zygote died before the parent-death signal was armed
        for procs in req.get("cgroup_procs") or ():
            with open(procs, "w") as f:
                f.write("0")  # ourselves, in whatever pid namespace we are
        if isolate:
            _build_root(req)
            iso.sethostname("sandbox")
        job = channel.read()  # a prepared slot waits here for its function
        if job is None or job.get("t") != "assign":
            os._exit(0)  # the worker retired the slot unused
        runtime = job["runtime"]
        if isolate:
            _enter_root(req, job["code_dir"])
        iso.set_rlimits(req.get("tmp_mb", 64))
        if not req.get("cgroup_procs"):  # no cgroup to hold memory and processes: rlimits do what they can
            iso.set_fallback_limits(job.get("memory_mb", 128), req.get("pids_max", 64))
        if isolate:
            iso.drop_capabilities()
            iso.become(req["uid"], req["uid"])
            iso.prctl(iso.PR_SET_PDEATHSIG, 9)  # a uid change clears it
        iso.no_new_privs()
        if filt is not None:
            filt.load()
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir("/var/task" if isolate else job["code_dir"])
    except BaseException as exc:
        _report_init_failure(channel, runtime, exc)
        os._exit(71)
    if runtime == "provided":
        _exec_custom(chan_fd)
    bootstrap.serve(channel, job["handler"])
    os._exit(0)


def _build_root(req: dict) -> None:
    """A fresh root, prepared ahead: a small tmpfs holding read-only binds of the system and the runtime, an /etc
    of the sandbox's own, /dev with four devices, and a size-limited /tmp. The host's files - the node's keys,
    other functions' code, its users and hosts - are not in it."""
    iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
    root = req["root_dir"]
    os.makedirs(root, exist_ok=True)
    iso.mount("tmpfs", root, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, "size=4m,mode=755")
    # /tmp first: an interpreter installed under /tmp (a venv, say) is bound inside it, not hidden by it
    os.makedirs(root + "/tmp")
    iso.mount("tmpfs", root + "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV,
              f"size={req.get('tmp_mb', 64)}m,mode=1777")
    for src in req["binds"]:
        dst = root + src
        if os.path.islink(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.lexists(dst):
                os.symlink(os.readlink(src), dst)
            continue
        if not os.path.exists(src):
            continue
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:  # a file is bound onto an empty file
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _bind_ro(src, dst)
    for path, content in req.get("files", {}).items():  # the sandbox's own /etc (worker/slots.py sandbox_etc)
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        with open(root + path, "w") as f:
            f.write(content)
        os.chmod(root + path, 0o644)
    for d in ("/var/task", "/dev", "/proc", "/.old"):
        os.makedirs(root + d, exist_ok=True)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        iso.mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, iso.MS_BIND)


def _enter_root(req: dict, code_dir: str) -> None:
    """At assignment: the function's code at /var/task (read-only), then pivot into the new root, a private
    /proc for the new pid namespace, and the root itself made read-only."""
    root = req["root_dir"]
    _bind_ro(code_dir, root + "/var/task")
    iso.pivot_root(root, root + "/.old")
    os.chdir("/")
    iso.umount2("/.old", iso.MNT_DETACH)
    os.rmdir("/.old")
    iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
    iso.mount(None, "/", None, iso.MS_REMOUNT | iso.MS_BIND | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV)


def _bind_ro(src: str, dst: str) -> None:
    iso.mount(src, dst, None, iso.MS_BIND | iso.MS_REC)
    iso.mount(None, dst, None, iso.MS_REMOUNT | iso.MS_BIND | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV)


def _exec_custom(chan_fd: int) -> None:
    """A custom runtime: its executable gets the channel as stdin and stdout (see README, Custom runtimes)."""
    os.dup2(chan_fd, 0)
    os.dup2(chan_fd, 1)
    os.close(chan_fd)
    try:
        os.execve("./bootstrap", ["bootstrap"], dict(os.environ))
    except OSError as exc:
        os.write(1, f"INIT_ERROR Runtime.InvalidEntrypoint cannot run ./bootstrap: {exc.strerror}\n".encode())
        os._exit(72)


def _report_init_failure(channel, runtime: str, exc: BaseException) -> None:
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    try:
        if runtime == "provided":
            os.write(channel.wfd, f"INIT_ERROR Runtime.SandboxSetupFailed {detail}\n".encode())
        else:
            channel.write({"t": "init_error", "error": {
                "errorType": "Runtime.SandboxSetupFailed",
                "errorMessage": f"the sandbox could not be isolated: {detail}",
            }})
    except OSError:
        pass


if __name__ == "__main__":
    Zygote(json.loads(sys.argv[1])).serve()
