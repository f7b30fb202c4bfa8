"""The network of a worker's sandboxes with network: one veth and one address each, NAT to the outside, and the
node's nftables table refusing the host and the cluster. The plan - addresses, names, rules - is
worker/netplan.py; this module carries it out with `ip`, `nsenter` and `nft`.

A worker takes one block of `sandbox_network_cidr` for its life, held by an abstract socket (`Block.claim`) the
kernel frees when the worker dies; at start it removes every table (and veth) of a block no live worker holds,
and at stop its own. IPv4 forwarding, which NAT needs, is turned on at the first sandbox with network (and
logged), and off again at a worker's stop if a worker turned it on and no Flint table is left on the host.

Without root, namespaces, `ip`, `nsenter` or `nft`, nothing here is done: `available` is False, `why` says
what is missing, and the worker refuses functions with network (Reason.NO_SAFE_NETWORK). No sandbox ever gets
the host's network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from wire.config import NodeConfig, Settings
from wire.errors import Reason, ServiceException, error_fields
from worker import isolation as iso
from worker import netplan
from worker.netplan import Addresses, Block

log = structlog.get_logger("worker.network")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
FORWARDING_MARK = Path("/run/flint-net-forwarding")  # there while forwarding is on because a worker turned it on
SYS_NET = Path("/sys/class/net")
TOOLS = ("ip", "nsenter", "nft")


class NetworkError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class SandboxLink:
    """One sandbox's veth and address."""

    index: int
    veth: str
    address: str


class SandboxNetwork:
    def __init__(self, node_id: str, address: str, control_nodes: Iterable[str], settings: Settings,
                 caps: iso.Capabilities):
        self.node_id = node_id
        self.node_address = address
        self.control_nodes = tuple(control_nodes)
        self.settings = settings
        self.caps = caps
        self.available = False
        self.why = "not started"
        self.block: Block | None = None
        self.addresses: Addresses | None = None
        self.resolver: str | None = None
        self.refused: list[str] = []
        self._claim: socket.socket | None = None
        self._peers: set[str] = set()

    @classmethod
    def for_node(cls, config: NodeConfig, caps: iso.Capabilities) -> SandboxNetwork:
        return cls(config.node_id, config.address, config.control_nodes, config.settings, caps)

    @property
    def resolv_conf(self) -> str:
        return netplan.sandbox_resolv_conf(self.resolver)

    # --- start and stop ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take a block, clear what dead workers left, install the table. On any failure: unavailable, saying why."""
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not (self.caps.root and self.caps.namespaces):
            self.why = "no network namespaces without root"
        elif missing:
            self.why = f"{' and '.join(missing)} not found (Debian packages: iproute2, util-linux, nftables)"
        else:
            try:
                await self._start()
                self.available = True
                self.why = ""
            except (NetworkError, OSError) as err:
                self.why = f"the sandbox network could not be set up: {err}"
                log.error("net.setup_failed", **error_fields(err))
                self.close()
        if not self.available:
            log.warning("net.unavailable", why=self.why, consequence="functions with network are refused here")

    async def _start(self) -> None:
        s = self.settings
        sweep_stale()
        routes = _read("/proc/net/route")
        for block in netplan.blocks(s.sandbox_network_cidr, s.sandbox_network_prefix, self.node_id,
                                    s.sandbox_network_block):
            claim = _claim(block)
            if claim is None:
                continue  # a live worker on this host has it
            if netplan.overlapping_routes(block, routes):
                claim.close()  # a network of this host's own lies there
                continue
            self._claim, self.block = claim, block
            break
        if self.block is None:
            raise NetworkError(f"no free /{s.sandbox_network_prefix} left in {s.sandbox_network_cidr} on this host")
        _remove_block(self.block)  # what an earlier incarnation on this block left
        self.addresses = Addresses(self.block)
        self.resolver = netplan.choose_resolver(s.sandbox_resolver, _read("/etc/resolv.conf"))
        self.refused = netplan.refused_networks(self.node_address, self.control_nodes, s.sandbox_network_refused,
                                                s.sandbox_network_cidr)
        comment = f"flint sandboxes of node {self.node_id} ({self.node_address}), pid {os.getpid()}"
        await _run("nft", "-f", "-", input=netplan.ruleset(self.block, self.refused, self.resolver, comment))
        log.info("net.ready", block=str(self.block.network), table=f"inet {self.block.table}",
                 veths=f"{self.block.veth_prefix}*", resolver=self.resolver, refused=self.refused)

    def close(self) -> None:
        """At the worker's stop: its table and veths go, its block is free, forwarding back as it found it.
        Synchronous, so a stop that cancels the worker's other clean-up still runs all of it."""
        held = self.block is not None and self._claim is not None
        if held:
            _remove_block(self.block)
            log.info("net.removed", table=self.block.table)
        if self._claim is not None:
            self._claim.close()
            self._claim = None
        self.available = False
        if held:
            _restore_forwarding_if_unneeded()

    # --- one sandbox ---------------------------------------------------------------------------------------------

    async def attach(self, pid: int) -> SandboxLink:
        """Wire the sandbox whose namespace process `pid` holds: veth, address, gateway, default route."""
        if not self.available or self.addresses is None or self.block is None:
            raise no_safe_network(self.why)
        index = self.addresses.take()
        if index is None:
            raise ServiceException(f"all {self.block.capacity} sandbox addresses of this host are in use",
                                   reason=Reason.WORKER_FULL, retryable=True)
        link = SandboxLink(index, self.block.veth(index), self.block.address(index))
        try:
            self._enable_forwarding()
            await _run("ip", "-batch", "-", input=netplan.host_wiring(self.block, index, pid))
            await _run("nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-batch", "-",
                       input=netplan.sandbox_wiring(self.block, index))
        except BaseException:
            await self.detach(link)
            raise
        return link

    async def detach(self, link: SandboxLink) -> None:
        await _run("ip", "link", "del", link.veth, check=False)  # gone already if its namespace went first
        if self.addresses is not None:
            self.addresses.give_back(link.index)

    async def refuse_peers(self, addresses: Iterable[str]) -> None:
        """Nodes placement knows of join the refused set as they appear (control nodes and this node are in it
        from the start)."""
        new = set(addresses) - self._peers
        if not new or not self.available or self.block is None:
            return
        self._peers |= new
        if not netplan.ipv4_networks(new):
            return  # names or IPv6: nothing a sandbox can reach (it has no IPv6)
        try:
            await _run("nft", "-f", "-", input=netplan.refuse_more(self.block, sorted(new)))
        except NetworkError as err:
            log.error("net.refuse_peers_failed", peers=sorted(new), **error_fields(err))

    # --- forwarding ----------------------------------------------------------------------------------------------

    def _enable_forwarding(self) -> None:
        if IP_FORWARD.read_text().strip() == "1":
            return
        FORWARDING_MARK.write_text(f"net.ipv4.ip_forward turned on by flint node {self.node_id}\n")
        IP_FORWARD.write_text("1")
        log.warning("net.forwarding_enabled", sysctl="net.ipv4.ip_forward=1",
                    why="sandboxes with network reach the outside through this host's NAT; the node's nft table "
                        "forwards nothing else to or from them")

    # --- what the worker reports ---------------------------------------------------------------------------------

    def details(self) -> dict[str, Any]:
        """For isolation_details: what a function with network gets on this worker, or that it is refused."""
        if not self.available or self.block is None:
            return {"with_network": f"refused (NoSafeNetwork): {self.why}",
                    "without_network": "own network namespace, lo only" if self.caps.root and self.caps.namespaces
                    else "the host's network: no namespaces without root"}
        return {"with_network": "own network namespace, veth eth0, NAT",
                "without_network": "own network namespace, lo only",
                "block": str(self.block.network), "table": f"inet {self.block.table}",
                "veths": f"{self.block.veth_prefix}*", "resolver": self.resolver, "refused": self.refused}


def sweep_stale() -> list[str]:
    """Remove the tables and veths of every block no live worker on this host holds (SIGKILLed workers' leave
    theirs). Run at a worker's start, and by `Region.down` once its nodes are stopped. Returns the tables gone."""
    removed = []
    for block in _our_tables():
        claim = _claim(block)
        if claim is not None:
            try:
                _remove_block(block)
                removed.append(block.table)
                log.info("net.stale_removed", table=block.table)
            except OSError as err:
                log.warning("net.stale_not_removed", table=block.table, **error_fields(err))
            finally:
                claim.close()
    if removed:
        _restore_forwarding_if_unneeded()
    return removed


def _restore_forwarding_if_unneeded() -> None:
    """IPv4 forwarding off again if a worker turned it on and no Flint table is left on the host to need it."""
    if FORWARDING_MARK.exists() and not _our_tables():
        IP_FORWARD.write_text("0")
        FORWARDING_MARK.unlink(missing_ok=True)
        log.info("net.forwarding_restored", sysctl="net.ipv4.ip_forward=0")


def no_safe_network(why: str) -> ServiceException:
    return ServiceException(
        f"this worker cannot give a function with network a network of its own: {why}. It never runs one in the "
        "host's network, so functions with network are refused here (they need a worker with root and nftables)",
        reason=Reason.NO_SAFE_NETWORK)


def _claim(block: Block) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inherited: the zygote never holds it
    try:
        sock.bind("\0" + block.claim)
    except OSError:
        sock.close()
        return None
    return sock


def _our_tables() -> list[Block]:
    """The blocks of every Flint table on this host (any worker's, live or dead)."""
    try:
        listing = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True).stdout
    except OSError:
        return []
    blocks = (netplan.block_of_table(line.split()[-1]) for line in listing.splitlines() if line.strip())
    return [b for b in blocks if b is not None]


def _remove_block(block: Block) -> None:
    """A block's table and veths, gone (what is not there already)."""
    subprocess.run(["nft", "delete", "table", "inet", block.table], capture_output=True)
    for name in _links(block.veth_prefix):
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _links(prefix: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(SYS_NET) if name.startswith(prefix))
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


async def _run(*args: str, input: str | None = None, check: bool = True) -> str:
    """One command, in a thread: ~2 ms where the event loop's own subprocess support takes ~5 ms (uvloop)."""
    done = await asyncio.to_thread(subprocess.run, args, input=input, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(args[:3])}: {done.stderr.strip()[:500]}")
    return done.stdout
