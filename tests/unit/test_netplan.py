"""The sandbox network's plan (worker/netplan.py), and what a worker without a safe network does with a function
that asks for one (worker/network.py, worker/slots.py): refuse it, never hand it the host's network."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import types

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wire.config import Settings
from wire.errors import Reason, ServiceException
from worker import isolation as iso
from worker import netplan
from worker.netplan import Addresses, Block
from worker.network import SandboxNetwork
from worker.slots import SlotPool

POOL = "198.18.0.0/16"


def test_a_workers_block_derives_from_its_node_id_and_the_rest_follow_in_order():
    first = [next(netplan.blocks(POOL, 24, f"n{i}")) for i in range(1, 40)]
    assert first[0] == next(netplan.blocks(POOL, 24, "n1"))  # the same node prefers the same block every time
    assert len(set(first)) > 30  # nodes spread over the pool
    every = list(netplan.blocks(POOL, 24, "n1"))
    assert len(every) == 256 and len(set(every)) == 256
    assert all(b.network.subnet_of(ipaddress.ip_network(POOL)) and b.network.prefixlen == 24 for b in every)
    chosen = Block(ipaddress.ip_network("198.18.7.0/24"))
    assert list(netplan.blocks(POOL, 24, "n1", explicit="198.18.7.0/24")) == [chosen]


@pytest.mark.parametrize("pool, prefix", [("198.18.0.0/16", 24), ("198.18.0.0/15", 30), ("10.0.0.0/8", 16)])
def test_names_fit_the_kernels_interface_name_limit_and_read_back(pool, prefix):
    for block in [next(netplan.blocks(pool, prefix, "n1")), next(netplan.blocks(pool, prefix, "zz"))]:
        assert len(block.veth(block.capacity - 1)) <= 15
        assert netplan.block_of_table(block.table) == block
        assert block.veth(3).startswith(block.veth_prefix) and block.address(0) == str(block.network[1])
    assert netplan.block_of_table("filter") is None and netplan.block_of_table("flint_zz_24") is None


class AddressBook(RuleBasedStateMachine):
    """However sandboxes come and go, an address is never handed out twice, and None only when all are taken."""

    def __init__(self):
        super().__init__()
        self.book = Addresses(Block(ipaddress.ip_network("198.18.9.0/29")))  # 6 addresses
        self.held: list[int] = []

    @rule()
    def take(self):
        index = self.book.take()
        if index is None:
            assert len(self.held) == self.book.block.capacity
        else:
            assert index not in self.held and 0 <= index < self.book.block.capacity
            self.held.append(index)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def give_back(self, data):
        index = data.draw(st.sampled_from(self.held))
        self.held.remove(index)
        self.book.give_back(index)

    @invariant()
    def in_step(self):
        assert self.book.used == set(self.held)


TestAddressBook = AddressBook.TestCase


def test_a_freed_address_is_handed_out_last():
    book = Addresses(Block(ipaddress.ip_network("198.18.9.0/29")))
    a, b = book.take(), book.take()
    book.give_back(a)
    assert [book.take() for _ in range(4)] == [2, 3, 4, 5] and book.take() == a and book.take() is None
    assert b == 1


def test_the_refused_networks_hold_the_cluster_and_what_is_always_refused():
    refused = netplan.refused_networks("10.0.1.5", ["10.0.1.5", "10.0.2.5", "fd00::1", "ctl.example"],
                                       ["10.0.0.0/16", "192.168.4.0/24"], POOL)
    assert refused == ["0.0.0.0/8", "10.0.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "192.168.4.0/24",
                       "198.18.0.0/16", "224.0.0.0/4", "255.255.255.255/32"]
    assert "10.0.2.5/32" in netplan.refused_networks("10.9.0.1", ["10.0.2.5"], [], POOL)


def test_the_ruleset_refuses_the_host_and_the_refused_set_and_masquerades_the_block():
    block = next(netplan.blocks(POOL, 24, "n1"))
    text = netplan.ruleset(block, ["127.0.0.0/8", "10.0.0.0/8"], "10.255.255.53", "flint test")
    p = f'iifname "{block.veth_prefix}*"'
    assert f"table inet {block.table} {{" in text and text.startswith(f"table inet {block.table}\ndelete table")
    assert f"{p} counter reject with icmpx type admin-prohibited" in text  # input: the host itself
    assert f"{p} ip daddr @refused counter reject" in text and "elements = { 127.0.0.0/8, 10.0.0.0/8 }" in text
    assert f"{p} ip daddr 10.255.255.53 meta l4proto {{ tcp, udp }} th dport 53 accept" in text
    assert f'ip saddr {block.network} oifname != "{block.veth_prefix}*" masquerade' in text
    assert text.index("dport 53 accept") < text.index("@refused")  # the resolver is let through first
    assert "dport 53" not in netplan.ruleset(block, ["127.0.0.0/8"], None, "c")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables")
def test_nft_accepts_the_ruleset_and_an_addition():
    block = Block(ipaddress.ip_network("198.18.250.0/24"))
    text = netplan.ruleset(block, netplan.refused_networks("10.0.1.5", [], [], POOL), "10.255.255.53", "check")
    subprocess.run(["nft", "-c", "-f", "-"], input=text, text=True, check=True)


def test_wiring_a_sandbox_gives_it_its_address_the_gateway_and_a_default_route():
    block = Block(ipaddress.ip_network("198.18.4.0/24"))
    host = netplan.host_wiring(block, 16, 4242)
    assert host.splitlines()[0] == ("link add flc612040010 address ee:ee:ee:ee:ee:ee type veth peer name eth0 "
                                    "address 02:fe:c6:12:04:11 netns 4242")  # index 16 (0x10): 198.18.4.17
    assert "route replace 198.18.4.17/32 dev flc612040010" in host
    inside = netplan.sandbox_wiring(block, 16)
    assert "addr add 198.18.4.17/32 dev eth0" in inside and "link set lo up" in inside
    assert "route add default via 169.254.1.1 dev eth0 src 198.18.4.17" in inside
    assert "addrgenmode none" in host and "addrgenmode none" in inside  # no IPv6 link-local on either end


def test_a_block_some_host_network_routes_into_is_not_taken():
    block = Block(ipaddress.ip_network("198.18.4.0/24"))
    routes = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
              "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default: overlaps nothing
              "flc612040011\t110412C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n"  # our own veth's route
              "br0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n")  # 198.18.0.0/16 on br0
    assert netplan.overlapping_routes(block, routes) == ["198.18.0.0/16 dev br0"]
    assert netplan.overlapping_routes(block, routes.rsplit("br0", 1)[0]) == []


def test_the_resolver_is_the_setting_or_the_hosts_first_reachable_nameserver():
    host = "# local stub first\nnameserver 127.0.0.53\nnameserver fd00::53\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"
    assert netplan.choose_resolver("", host) == "10.0.0.2"
    assert netplan.choose_resolver("", "nameserver 127.0.0.53\n") is None
    assert netplan.choose_resolver("192.0.2.53", host) == "192.0.2.53"
    assert netplan.choose_resolver("none", host) is None
    assert netplan.sandbox_resolv_conf("10.0.0.2").startswith("nameserver 10.0.0.2\n")
    assert "nameserver" not in netplan.sandbox_resolv_conf(None)


def test_without_root_a_function_with_network_is_refused_and_never_given_the_hosts_network(tmp_path):
    partial = iso.Capabilities(root=False, namespaces=False, cgroups=0, seccomp=True, reasons=["not root"])
    network = SandboxNetwork("n1", "127.0.0.2", ["127.0.0.2"], Settings(), partial)

    async def go():
        await network.start()
        zygote = types.SimpleNamespace(caps=partial)  # never asked to fork: the refusal comes first
        with pytest.raises(ServiceException) as refused:
            await SlotPool(zygote, None, tmp_path, network=network).prepare(network=True)
        with pytest.raises(ServiceException):
            await SlotPool(zygote, None, tmp_path).prepare(network=True)  # no network at all: refused too
        return refused.value

    err = asyncio.run(go())
    assert not network.available and err.reason == Reason.NO_SAFE_NETWORK and "without root" in err.message
    details = network.details()
    assert details["with_network"] == "refused (NoSafeNetwork): no network namespaces without root"
    assert details["without_network"].startswith("the host's network")
