"""A hostile tenant's handler against its host and the other tenants: forged replies on its control channel,
what it inherits from the zygote, io_uring and odd socket families, what of the host it can read, and CPU burnt
while idle. On real worker pieces (zygote, slot pool, sandbox: tests/support/sandbox.py) and on a real one-node
region (so every cold start lands on the same worker). Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from flint import Client
from tests.conftest import start_region
from tests.support.sandbox import ROOT_ONLY, Harness
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import ServiceException
from worker import isolation as iso

ATTACKS = textwrap.dedent(
    '''
    import ctypes, errno, fcntl, os, signal, socket, stat, struct, sys, threading, time
    import msgpack

    libc = ctypes.CDLL(None, use_errno=True)

    def ok(event, context):
        return {"fine": True, "event": event}

    def descriptors(kind):
        out = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if kind(os.fstat(int(name)).st_mode):
                    out.append(int(name))
            except OSError:
                pass
        return sorted(out)

    FORGED = {
        "unencodable": lambda: {"t": "result", "payload": "text where the worker expects bytes"},
        "ext": lambda: {"t": "result", "payload": msgpack.ExtType(7, b"x")},
        "log": lambda: {"t": "result", "payload": b"1", "log": {"not": "text"}},
        "error": lambda: {"t": "error", "error": {"errorType": b"\\xff", "errorMessage": ["x"]}},
        "kind": lambda: {"t": "no such reply"},
        "oversized": lambda: {"t": "result", "payload": b"1" * (7 * 1024 * 1024)},
    }

    def forge(event, context):
        """Write a reply of our own on the control channel (the one socket we hold), then return normally."""
        kind = event["kind"]
        if kind == "garbage":
            frame = struct.pack(">I", 16) + b"\\xc1" * 16
        elif kind == "array":
            body = msgpack.packb([1, 2, 3])
            frame = struct.pack(">I", len(body)) + body
        elif kind == "claims_64_mb":
            frame = struct.pack(">I", 64 * 1024 * 1024) + b"x" * 100
        else:
            body = msgpack.packb(FORGED[kind](), use_bin_type=True)
            frame = struct.pack(">I", len(body)) + body
        os.write(descriptors(stat.S_ISSOCK)[0], frame)
        return {"honest": "a reply after the forged one"}

    def clog(event, context):
        """Keep every pipe we inherited full from a thread, in blocking mode: the zygote's signal wake-up pipe
        among them, if we got it. At its next SIGCHLD the zygote's handler then writes into a full pipe it
        believes non-blocking, and blocks for good."""
        def fill(fd):
            os.set_blocking(fd, True)
            while True:
                os.write(fd, b"x" * 65536)
        pipes = []
        for fd in descriptors(stat.S_ISFIFO):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                threading.Thread(target=fill, args=(fd,), daemon=True).start()
                pipes.append(fd)
        return {"clogging": pipes}

    def leave(event, context):
        os._exit(3)

    def is_open(fd):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
            return True
        except OSError:
            return False

    def inherited(event, context):
        handlers = {}
        for sig in signal.valid_signals():
            if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP):
                h = signal.getsignal(sig)
                if h not in (signal.SIG_DFL, None):
                    handlers[sig.name] = getattr(h, "__name__", repr(h))
        return {"fds": [fd for fd in range(1024) if is_open(fd)], "handlers": handlers,
                "wakeup_fd": signal.set_wakeup_fd(-1), "blocked": sorted(s.name for s in signal.pthread_sigmask(
                    signal.SIG_BLOCK, []))}

    def attempt(fn):
        try:
            return "allowed: " + repr(fn())
        except OSError as exc:
            return f"refused: {errno.errorcode.get(exc.errno, exc.errno)}"

    def syscall(number, *args):
        result = libc.syscall(ctypes.c_long(number), *args)
        if result == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.close(result) if number == 425 else None
        return result

    def refused(event, context):
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        return {
            "io_uring_setup": attempt(lambda: syscall(425, ctypes.c_uint(8), params)),
            "io_uring_enter": attempt(lambda: syscall(426, ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_uint(0),
                                                      ctypes.c_uint(0), None, ctypes.c_size_t(0))),
            "io_uring_register": attempt(lambda: syscall(427, ctypes.c_int(0), ctypes.c_uint(0), None,
                                                         ctypes.c_uint(0))),
            "vsock": attempt(lambda: socket.socket(40, socket.SOCK_STREAM).close()),  # AF_VSOCK
            "netlink_route": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()),
            "netlink_audit": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9).close()),
            "unix": attempt(lambda: socket.socketpair(socket.AF_UNIX)[0].close()),
            "inet": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
        }

    def name_of(uid):
        import pwd
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def host_view(event, context):
        read = lambda p: open(p, "rb").read().decode(errors="replace") if os.path.exists(p) else None
        return {
            "etc": sorted(os.listdir("/etc")), "passwd": read("/etc/passwd"), "group": read("/etc/group"),
            "resolv": read("/etc/resolv.conf"), "hosts": read("/etc/hosts"),
            "me": name_of(os.getuid()), "uid": os.getuid(),
            "pid1_cmdline": read("/proc/1/cmdline") + " ".join(sys.argv + sys.orig_argv),
            "procs": sorted(p for p in os.listdir("/proc") if p.isdigit()),
            "localhost": socket.gethostbyname("localhost"),
        }

    def spin(event, context):
        """Leave a thread burning CPU after the invoke returns."""
        def burn():
            while True:
                pass
        threading.Thread(target=burn, daemon=True).start()
        return {"spinning": True}
    '''
)


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("attacks")
    (d / "attacks.py").write_text(ATTACKS)
    d.chmod(0o755)  # as the worker unpacks code: readable by the sandbox's uid
    return d


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("sandboxes"))
    yield harness
    harness.close()


def error_of(out) -> dict:
    assert out.function_error == "Unhandled", out.payload[:300]
    return json.loads(out.payload)


# --- 1. forged replies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unencodable", "ext", "log", "error", "kind", "oversized", "garbage", "array",
                                  "claims_64_mb"])
def test_a_forged_reply_is_that_invokes_invalid_response_and_retires_the_sandbox(h, code, kind):
    sb = h.sandbox(code, "attacks.forge", timeout_s=10)
    began = time.monotonic()
    out = h.run(sb.invoke("forged", json.dumps({"kind": kind}).encode(), True), timeout=30)
    took = time.monotonic() - began
    h.run(sb.close())
    err = error_of(out)
    assert err["errorType"] == "Runtime.InvalidResponse", err
    assert took < 1.5, f"{kind}: answered after {took:.1f} s"
    assert not out.alive and not sb.alive  # retired: nothing it sends later is read as another invoke's reply
    # what the worker would answer the frontend carries over the wire and decodes as the frontend decodes it
    result = m.RunResult(executed_version="$LATEST", sandbox_alive=out.alive, function_error=out.function_error,
                         log_tail=out.log, payload=out.payload)
    assert m.RunResult.from_fields(result.to_fields(), raw=result.payload) == result
    fresh = h.sandbox(code, "attacks.ok")
    assert json.loads(h.invoke(fresh).payload)["fine"] is True
    h.run(fresh.close())


# --- 2. what a sandbox inherits from the zygote ----------------------------------------------------------------


def test_a_sandbox_holds_only_its_channel_and_log_and_fresh_signal_handlers(h, code):
    sb = h.sandbox(code, "attacks.inherited")
    got = json.loads(h.invoke(sb).payload)
    h.run(sb.close())
    assert got["fds"] == [0, 1, 2, 3], got  # /dev/null, the log twice, the channel: no pipe of the zygote's
    assert got["wakeup_fd"] == -1 and got["blocked"] == []
    # what a fresh interpreter sets (SIGINT, SIGPIPE, SIGXFSZ), and the runtime's own deadline alarm
    assert set(got["handlers"]) <= {"SIGINT", "SIGPIPE", "SIGXFSZ", "SIGALRM"}, got["handlers"]


def test_a_handler_cannot_hang_the_zygote_through_its_wakeup_pipe(h, code):
    clogger = h.sandbox(code, "attacks.clog", memory_mb=1769)  # a full core for the thread that keeps it full
    try:
        h.invoke(clogger)
        for _ in range(h.pool.size + 6):  # each ends a zygote child (a SIGCHLD), and forks another
            quitter = h.sandbox(code, "attacks.leave")
            assert error_of(h.invoke(quitter))["errorType"] == "Runtime.ExitError"
            h.run(quitter.close())
            began = time.monotonic()
            fresh = h.sandbox(code, "attacks.ok")
            assert json.loads(h.invoke(fresh).payload)["fine"] is True
            h.run(fresh.close())
            assert time.monotonic() - began < 1.0
    finally:
        h.run(clogger.close())


# --- 3. seccomp: io_uring and socket families --------------------------------------------------------------------


def _refusals(harness: Harness, code: Path) -> dict:
    sb = harness.sandbox(code, "attacks.refused")
    got = json.loads(harness.invoke(sb).payload)
    harness.run(sb.close())
    return got


def test_io_uring_vsock_and_netlink_are_refused_inside_a_sandbox(h, code, tmp_path):
    got = _refusals(h, code)
    for call in ("io_uring_setup", "io_uring_enter", "io_uring_register", "vsock", "netlink_route",
                 "netlink_audit"):
        assert got[call] == "refused: EPERM", (call, got)
    assert got["unix"].startswith("allowed") and got["inet"].startswith("allowed")
    # the same filter without root (no namespaces): seccomp alone holds it
    partial = iso.Capabilities(root=False, namespaces=False, cgroups=0, seccomp=True, reasons=["not root"])
    bare = Harness(tmp_path, caps=partial, cgroups=False)
    try:
        got = _refusals(bare, code)
    finally:
        bare.close()
    assert all(got[c] == "refused: EPERM" for c in ("io_uring_setup", "vsock", "netlink_route")), got


# --- 4. what a sandbox sees of its host --------------------------------------------------------------------------


@ROOT_ONLY
def test_a_sandbox_sees_its_own_minimal_etc_and_only_its_own_processes(h, code):
    sb = h.sandbox(code, "attacks.host_view")
    got = json.loads(h.invoke(sb).payload)
    h.run(sb.close())
    host_users = [line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines() if line]
    passwd = got["passwd"].splitlines()
    assert len(passwd) == 1 and passwd[0].split(":")[2] == str(got["uid"]), passwd
    assert got["me"] == passwd[0].split(":")[0] and got["me"] not in host_users
    assert len(got["group"].splitlines()) == 1
    assert got["resolv"] is None  # no network, no resolver
    assert got["localhost"] == "127.0.0.1"
    assert set(got["etc"]) <= {"passwd", "group", "hosts", "hostname", "nsswitch.conf", "resolv.conf",
                               "ld.so.cache", "ssl", "ca-certificates", "alternatives", "localtime"}, got["etc"]
    assert got["procs"] == ["1"]
    for leak in ("zygote", "worker_pid", str(Path(__file__).resolve().parents[2])):
        assert leak not in got["pid1_cmdline"], got["pid1_cmdline"]
    # (a sandbox with network gets its resolver from its worker's network: tests/integration/test_sandbox_network.py;
    # this harness has none, so such a sandbox is refused here rather than given the host's network)
    with pytest.raises(ServiceException, match="NoSafeNetwork"):
        h.sandbox(code, "attacks.host_view", network=True)
    assert "own /etc" in h.caps.details()["applied"]
    partial = iso.Capabilities(root=False, namespaces=False, cgroups=0, seccomp=True, reasons=["not root"])
    assert any("/etc and /proc are visible" in r for r in partial.details()["missing"])  # without root: said


# --- 5. idle sandboxes do not run ---------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU time of a sandbox's runtime process, all its threads, from the host's side."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@ROOT_ONLY
def test_an_idle_sandbox_burns_no_cpu_and_thaws_for_its_next_invoke(h, code):
    sb = h.sandbox(code, "attacks.spin", memory_mb=1769)  # a full core: burning is not throttled away
    try:
        assert json.loads(h.invoke(sb).payload)["spinning"] is True
        time.sleep(0.1)
        before = _cpu_s(sb.pid)
        time.sleep(1.0)
        idle = _cpu_s(sb.pid) - before
        assert idle < 0.05, f"an idle sandbox burnt {idle:.2f} CPU-s in 1 s"
        again = h.invoke(sb)  # thawed: the invoke runs, and so does the thread it left
        assert json.loads(again.payload)["spinning"] is True and again.alive
    finally:
        h.run(sb.close())
    assert not sb.alive


def test_isolation_details_say_whether_idle_sandboxes_are_frozen(h):
    details = h.caps.details()
    if h.caps.freezer:
        assert "freezer (idle sandboxes frozen)" in details["applied"]
    else:
        assert any("freezer" in r for r in details["missing"])
    partial = iso.Capabilities(root=False, namespaces=False, cgroups=0, seccomp=True, reasons=["not root"])
    assert any("idle sandboxes are not frozen" in r for r in partial.details()["missing"])


# --- on a real region ----------------------------------------------------------------------------------------------

REGION_SETTINGS = {"sandbox_pool": 0, "zygote_spawn_timeout_s": 2.0, "keep_alive_s": 600}


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("attacks-region"), nodes=1, azs=1, settings=REGION_SETTINGS)
    yield region
    region.down()


@pytest.fixture(scope="module")
def client(region):
    c = Client.from_region(region.root)
    yield c
    c.close()


def _suspects(region) -> list[str]:
    nodes = region.call("placement", m.ListNodes()).nodes
    return [n.node_id for n in nodes if n.suspect or not n.healthy]


def _zygotes(region) -> list[psutil.Process]:
    """The node's live zygote processes (a killed one may linger a moment as a zombie), not their forks."""
    node = psutil.Process(region.pid(region.nodes()[0]["node_id"]))
    found = {}
    for p in node.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("zygote.py" in a for a in p.cmdline()):
                found[p.pid] = p
        except psutil.Error:
            pass  # gone meanwhile
    return [p for p in found.values() if p.ppid() not in found]


@pytest.mark.slow
def test_forged_replies_on_a_region_are_function_errors_and_count_nothing_against_the_host(region, client, code):
    client.create_function("forger", code=code, handler="attacks.forge", timeout_s=10)
    for round_ in range(4):
        for kind in ("unencodable", "garbage"):
            began = time.monotonic()
            result = client.invoke("forger", {"kind": kind}, timeout_s=30)
            took = time.monotonic() - began
            assert result.function_error == "Unhandled", (round_, kind, result.payload[:200])
            assert result.json()["errorType"] == "Runtime.InvalidResponse"
            assert took < 3.0, f"round {round_} {kind}: answered after {took:.1f} s"
    node = region.nodes()[0]["node_id"]
    assert _suspects(region) == []
    assert region.call("manager", m.ManagerStatus(), node=node).unhealthy_nodes == ()
    client.create_function("bystander", code=code, handler="attacks.ok")
    assert client.invoke("bystander", {"n": 1}).json() == {"fine": True, "event": {"n": 1}}


@pytest.mark.slow
def test_after_a_handler_clogs_what_it_inherited_another_function_still_cold_starts(region, client, code):
    zygote = _zygotes(region)
    client.create_function("clogger", code=code, handler="attacks.clog", memory_mb=1769)
    client.create_function("quitter", code=code, handler="attacks.leave")
    client.invoke("clogger", {})
    for i in range(4):
        # the attacker's other function ends its sandbox (a SIGCHLD for the zygote) ...
        assert client.invoke("quitter", {}).json()["errorType"] == "Runtime.ExitError"
        # ... and another function cold starts on the same worker (sandbox_pool 0: a fork from the zygote)
        client.create_function(f"after-clog-{i}", code=code, handler="attacks.ok")
        began = time.monotonic()
        assert client.invoke(f"after-clog-{i}", {"i": i}, timeout_s=30).json()["event"] == {"i": i}
        assert time.monotonic() - began < 1.5
    assert [p.pid for p in _zygotes(region)] == [p.pid for p in zygote]  # the same zygote: it never hung


@pytest.mark.slow
def test_a_zygote_that_stops_answering_is_replaced(region, client, code):
    (zygote,) = _zygotes(region)
    os.kill(zygote.pid, signal.SIGSTOP)  # alive but answering nothing, as a hung zygote
    try:
        client.create_function("after-stop", code=code, handler="attacks.ok")
        assert client.invoke("after-stop", {"n": 2}, timeout_s=30).json()["event"] == {"n": 2}
    finally:
        if zygote.is_running():
            os.kill(zygote.pid, signal.SIGCONT)
    (replacement,) = wait_until(lambda: _zygotes(region), 5, what="one zygote")
    assert replacement.pid != zygote.pid
    log = (region.root / "nodes" / region.nodes()[0]["node_id"] / "node.log").read_text()
    assert "zygote.unresponsive" in log
