"""A function created with network=True, on a real region: its sandbox has a network of its own, reaches the
outside through the host's NAT, and reaches nothing of the node or the cluster.

Root only: the tests make a network namespace of their own (the "outside": a TCP server and a UDP resolver at
an address in 198.19.0.0/16, routed from the host) and read the host's nftables.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from flint import Client
from tests.conftest import start_region
from wire.errors import Reason, ServiceException

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="sandbox networks (namespaces, veths, nftables) need root"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("nft") is None,
                       reason="needs iproute2 and nftables (.ci/run installs nftables)"),
]

POOL = ipaddress.ip_network("198.18.0.0/16")  # the default sandbox_network_cidr; the outside is in 198.19.0.0/16

PROBE = textwrap.dedent(
    """
    import errno, json, os, socket

    def attempt(fn):
        try:
            return "allowed: " + repr(fn())
        except socket.timeout:
            return "refused: timeout"
        except OSError as exc:
            return "refused: " + errno.errorcode.get(exc.errno, str(exc.errno))

    def connect(addr, port):
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect((addr, port))
            return "connected from " + s.getsockname()[0]
        finally:
            s.close()

    HELD = []  # kept listening after the invoke: the sandbox stays warm, and the test looks from the host

    def hold(addr, port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4)
        HELD.append(s)
        return f"listening on {addr}:{port}"

    def talk(addr, port):
        s = socket.create_connection((addr, port), timeout=3)
        try:
            return {"mine": s.getsockname()[0], "said": s.recv(200).decode()}
        finally:
            s.close()

    def listening():
        out = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = open(table).read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    out.append(fields[1])
        return out

    def resolver():
        names = [l.split()[1] for l in open("/etc/resolv.conf").read().splitlines() if l.startswith("nameserver")]
        if not names:
            return {"nameservers": names}
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        try:
            s.sendto(b"query", (names[0], 53))
            return {"nameservers": names, "answer": s.recv(200).decode()}
        except OSError as exc:
            return {"nameservers": names, "answer": "refused: " + errno.errorcode.get(exc.errno, str(exc.errno))}
        finally:
            s.close()

    def interfaces():
        return sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:])

    def addresses():
        import fcntl, struct
        out = {}
        for name in interfaces():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()))  # SIOCGIFADDR
                out[name] = socket.inet_ntoa(raw[20:24])
            except OSError:
                out[name] = None
            finally:
                s.close()
        return out

    def probe(event, context):
        out = {"connect": {}, "bind": {}, "listening": listening()}
        for addr in event["node_addresses"]:
            for port in event["ports"]:
                out["connect"][f"{addr}:{port}"] = attempt(lambda: connect(addr, port))
            out["bind"][addr] = attempt(lambda: hold(addr, event["bind_port"]))
        out["host_loopback"] = attempt(lambda: connect("127.0.0.1", event["loopback_port"]))
        out["host_addresses"] = {a: attempt(lambda: connect(a, event["loopback_port"]))
                                 for a in event["host_addresses"]}
        out["interfaces"] = interfaces()
        out["addresses"] = addresses()
        if event.get("outside"):
            out["outside"] = attempt(lambda: talk(*event["outside"]))
            out["resolver"] = resolver()
        return out
    """
)

OUTSIDE_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    addr, port = sys.argv[1], int(sys.argv[2])
    def resolver():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((addr, 53))
        while True:
            data, peer = u.recvfrom(512)
            u.sendto(b"answer to " + peer[0].encode(), peer)
    threading.Thread(target=resolver, daemon=True).start()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(("outside saw " + peer[0]).encode())
        c.close()
    """
)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


class Outside:
    """A network namespace of this run's own, with a TCP server (and a UDP echo on port 53, the sandboxes'
    resolver) at an address in 198.19.0.0/16, routed from the host by a veth pair."""

    def __init__(self) -> None:
        tag = os.urandom(3).hex()
        self.netns = f"flint-test-{os.getpid()}-{tag}"
        self.host_if, self.ns_if = f"ft{tag}h", f"ft{tag}n"
        k = int.from_bytes(os.urandom(2), "big") % 16000 + 1
        subnet = ipaddress.ip_network("198.19.0.0/16").network_address + 4 * k
        self.host_addr, self.addr = str(subnet + 1), str(subnet + 2)
        self.port = 8000 + k % 1000
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> Outside:
        sh("ip", "netns", "add", self.netns)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.netns)
            sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            sh("ip", "-n", self.netns, "addr", "add", f"{self.addr}/30", "dev", self.ns_if)
            sh("ip", "-n", self.netns, "link", "set", self.ns_if, "up")
            sh("ip", "-n", self.netns, "link", "set", "lo", "up")
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-c", OUTSIDE_SERVER, self.addr, str(self.port)],
                stdout=subprocess.PIPE, text=True)
            assert self.server.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class LoopbackServer:
    """A TCP server on the host's 127.0.0.1, as a node-local service would be."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def host_addresses() -> list[str]:
    """Every IPv4 address of the host but loopback's (127/8 is probed through the nodes and 127.0.0.1)."""
    out = sh("ip", "-4", "-o", "addr", "show")
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()} - {"127.0.0.1"})


def free_port(addresses: list[str]) -> int:
    """A port no one listens on at any of these addresses (for the sandbox to try to take)."""
    while True:
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        try:
            for addr in addresses:
                with socket.socket() as s:
                    s.bind((addr, port))
            return port
        except OSError:
            continue


@pytest.fixture(scope="module")
def outside():
    with Outside() as o:
        yield o


@pytest.fixture(scope="module")
def loopback():
    server = LoopbackServer()
    yield server
    server.sock.close()


FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


@pytest.fixture(scope="module")
def forwarding_before() -> str:
    return FORWARDING.read_text().strip()


def allow_network(region) -> None:
    """The operator lets the region's default tenant give its functions network access."""
    with Client.from_region(region.root, operator=True) as operator:
        operator.set_tenant_network("default", allowed=True)


@pytest.fixture(scope="module")
def region(tmp_path_factory, outside, forwarding_before):
    region = start_region(tmp_path_factory.mktemp("net"), settings={"keep_alive_s": 600,
                                                                    "sandbox_resolver": outside.addr})
    allow_network(region)
    yield region
    region.down()


@pytest.fixture(scope="module")
def probed(region, outside, loopback, tmp_path_factory):
    """What a network function's sandbox found, and what a function without network found."""
    code = tmp_path_factory.mktemp("probe")
    (code / "handler.py").write_text(PROBE)
    nodes = region.nodes()
    ports = sorted(set(region.config(nodes[0]["node_id"]).ports.as_dict().values()))
    event = {"node_addresses": [n["address"] for n in nodes], "ports": ports, "loopback_port": loopback.port,
             "bind_port": free_port([n["address"] for n in nodes]), "host_addresses": host_addresses()}
    with Client.from_region(region.root) as client:
        client.create_function("netprobe", code=code, handler="handler.probe", network=True, timeout_s=60)
        client.create_function("noprobe", code=code, handler="handler.probe", timeout_s=60)
        with_net = client.invoke("netprobe", {**event, "outside": [outside.addr, outside.port]}, timeout_s=90)
        without = client.invoke("noprobe", event, timeout_s=90)
    assert with_net.function_error is None, with_net.payload
    assert without.function_error is None, without.payload
    return {"network": with_net.json(), "none": without.json(), "event": event}


def test_a_network_sandbox_reaches_no_port_of_any_node(probed):
    reached = {k: v for k, v in probed["network"]["connect"].items() if not v.startswith("refused")}
    assert not reached, f"the sandbox reached node ports: {reached}"


def test_a_network_sandbox_reaches_no_address_of_the_host(probed):
    """Nothing listens on these at that port: a host that answered would reset (ECONNREFUSED); the node's table
    rejects the packet before the host sees it (EHOSTUNREACH, ICMP administratively prohibited)."""
    seen = probed["network"]["host_addresses"]
    assert seen and all(v == "refused: EHOSTUNREACH" for v in seen.values()), seen


def test_a_network_sandbox_cannot_take_a_port_on_a_nodes_address(probed):
    """In a region on loopback addresses the sandbox may bind a node's 127.x address - on its own loopback; what
    counts is that nothing listens there as the host sees it (with a real address the bind itself fails)."""
    port = probed["event"]["bind_port"]
    taken = {}
    for addr in probed["event"]["node_addresses"]:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            taken[addr] = probed["network"]["bind"][addr]
        except OSError:
            pass
    assert not taken, f"the sandbox listens on a node's address, as the host sees it: {taken}"


def test_a_network_sandbox_sees_no_listening_socket_of_the_host(probed):
    assert probed["network"]["listening"] == [], "the sandbox's /proc/net/tcp lists the host's listening sockets"


def test_a_network_sandbox_cannot_reach_the_hosts_loopback(probed, loopback):
    assert probed["network"]["host_loopback"].startswith("refused"), probed["network"]["host_loopback"]
    assert loopback.accepted == 0


def test_a_network_sandbox_has_eth0_in_its_nodes_block_and_reaches_the_outside_through_nat(probed, outside):
    net = probed["network"]
    assert net["interfaces"] == ["eth0", "lo"], net["interfaces"]
    mine = ipaddress.ip_address(net["addresses"]["eth0"])
    assert mine in POOL, f"eth0 has {mine}, not an address of the sandbox pool {POOL}"
    assert net["outside"].startswith("allowed"), net["outside"]
    talk = json.loads(net["outside"].removeprefix("allowed: ").replace("'", '"'))
    assert talk["mine"] == str(mine)
    # the server outside saw the host's address on its link, not the sandbox's: masqueraded
    assert talk["said"] == f"outside saw {outside.host_addr}", talk


def test_a_network_sandbox_reaches_the_resolver_its_resolv_conf_names(probed, outside):
    resolver = probed["network"]["resolver"]
    assert resolver["nameservers"] == [outside.addr], resolver
    assert resolver["answer"] == f"answer to {outside.host_addr}", resolver


def test_a_sandbox_without_network_has_only_lo_and_reaches_nothing(probed):
    none = probed["none"]
    assert none["interfaces"] == ["lo"], none["interfaces"]
    assert all(v.startswith("refused") for v in none["connect"].values())
    assert none["host_loopback"].startswith("refused") and none["listening"] == []


def test_a_worker_without_nftables_refuses_a_function_with_network_and_runs_the_others(tmp_path, monkeypatch):
    """As without root: no safe network here, so a function with network is refused (NoSafeNetwork, not held
    against the host) - never run in the host's network - and a function without network runs as ever."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the node finds no nft (Debian installs it in /usr/sbin)
    region = start_region(tmp_path, nodes=1, azs=1)
    allow_network(region)
    try:
        net = networks(region)["n1"]
        assert net["with_network"].startswith("refused (NoSafeNetwork)") and "nft" in net["with_network"], net
        code = tmp_path / "code"
        code.mkdir()
        (code / "handler.py").write_text("def handle(event, context):\n    return 'ran'\n")
        with Client.from_region(region.root) as client:
            client.create_function("wantsnet", code=code, handler="handler.handle", network=True)
            client.create_function("nonet", code=code, handler="handler.handle")
            with pytest.raises(ServiceException) as refused:
                client.invoke("wantsnet", {})
            assert client.invoke("nonet", {}).json() == "ran"
        assert refused.value.reason == Reason.NO_SAFE_NETWORK and "nft" in refused.value.message
        assert region.status()[0]["health"] == "healthy"
    finally:
        region.down()


def networks(region) -> dict[str, dict]:
    """Each node's sandbox network as its worker reports it (isolation_details)."""
    return {r["node"]: (r["isolation_details"] or {}).get("network", {}) for r in region.status()}


def tables() -> set[str]:
    return {line.split()[-1] for line in sh("nft", "list", "tables", "inet").splitlines() if line.strip()}


def links(prefix: str) -> list[str]:
    return [name for name in os.listdir("/sys/class/net") if name.startswith(prefix)]


def test_each_worker_has_a_block_and_a_table_of_its_own_and_the_sandbox_an_address_of_one(region, probed):
    nets = networks(region)
    blocks = [ipaddress.ip_network(n["block"]) for n in nets.values()]
    assert len(set(blocks)) == len(nets) == 3, nets
    assert all(b.subnet_of(POOL) for b in blocks)
    assert {n["table"].split()[-1] for n in nets.values()} <= tables()
    mine = ipaddress.ip_address(probed["network"]["addresses"]["eth0"])
    assert sum(mine in b for b in blocks) == 1
    ruleset = sh("nft", "list", "table", *next(iter(nets.values()))["table"].split())
    assert "reject with icmpx admin-prohibited" in ruleset and "masquerade" in ruleset


def test_a_killed_workers_table_is_removed_when_it_starts_again(region, probed):
    node = region.nodes()[-1]["node_id"]
    table = networks(region)[node]["table"].split()[-1]
    region.kill_node(node)
    assert table in tables(), "a SIGKILLed worker cannot remove its table: it is stale until a worker starts"
    sh("nft", "add", "chain", "inet", table, "stale_marker")
    region.start_node(node)
    region.wait_healthy(60, nodes=[node])
    new = networks(region)[node]["table"].split()[-1]
    assert new in tables()
    assert "stale_marker" not in sh("nft", "list", "table", "inet", new)
    if new != table:
        assert table not in tables()


def test_stopping_the_nodes_removes_their_tables_and_veths_and_forwarding_is_as_before(region, probed,
                                                                                       forwarding_before):
    """A node stopped removes its own; one SIGKILLed on the way leaves its table to `Region.down` (or to the next
    worker to start on the host)."""
    nets = networks(region)
    killed = region.nodes()[0]["node_id"]
    region.kill_node(killed)
    assert nets[killed]["table"].split()[-1] in tables()
    region.down()
    left = {n["table"].split()[-1] for n in nets.values()} & tables()
    assert not left, f"tables left behind: {left}"
    assert not [name for n in nets.values() for name in links(n["veths"].rstrip("*"))]
    logs = "".join((region.root / "nodes" / n["node_id"] / "node.log").read_text() for n in region.nodes())
    if forwarding_before == "0":  # turned on for the sandbox's NAT, said so, and off again once no table is left
        assert '"net.forwarding_enabled"' in logs
        assert FORWARDING.read_text().strip() == "0"
