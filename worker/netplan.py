"""The plan of the sandboxes' networks on a host, with no I/O: the block of addresses a worker takes, each
sandbox's address and interface names, the nftables ruleset that confines them, the `ip` commands that wire
one, and the resolver a sandbox is told of. worker/network.py carries it out.

Every sandbox has a network namespace of its own. One with network gets a veth pair: `eth0` inside with one
address of its worker's block (a /32), the host end named after the block (`fl<block in hex><index>`) with a
route to that address. The host end answers as the sandbox's gateway, 169.254.1.1, at a fixed MAC, and both
ends know each other's MAC statically: no ARP, no address on the host's side, no IPv6 on either. Traffic leaves
through the host's masquerade; the node's nft table refuses everything a sandbox sends to the host itself and
to the networks it may not reach (`refused_networks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator

GATEWAY = "169.254.1.1"  # every sandbox's next hop: the host end of its veth
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # every host end's MAC (a sandbox's neighbour entry for the gateway)
TABLE_PREFIX = "flint_"
VETH_PREFIX = "fl"
# Never reachable from a sandbox, whatever the settings: loopback, link-local (where clouds serve instance
# metadata and credentials), "this network", multicast and broadcast.
ALWAYS_REFUSED = ("127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")


@dataclasses.dataclass(frozen=True)
class Block:
    """One worker's addresses on its host. Its names (nft table, veths, the claim) derive from the block alone,
    so two workers on one host - of one region or of two - never share one while both run."""

    network: ipaddress.IPv4Network

    @property
    def tag(self) -> str:
        return f"{int(self.network.network_address):08x}"

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}{self.tag}_{self.network.prefixlen}"

    @property
    def veth_prefix(self) -> str:
        return VETH_PREFIX + self.tag  # 10 characters: an index of up to 5 hex digits fits IFNAMSIZ

    @property
    def claim(self) -> str:
        """The abstract socket name a live worker holds for this block (freed by the kernel when it dies)."""
        return f"flint-net/{self.network}"

    @property
    def capacity(self) -> int:
        return self.network.num_addresses - 2  # the first and last are left alone, as a LAN would

    def address(self, index: int) -> str:
        return str(self.network.network_address + 1 + index)

    def veth(self, index: int) -> str:
        return f"{self.veth_prefix}{index:x}"


def blocks(pool: str, prefix: int, node_id: str, explicit: str = "") -> Iterator[Block]:
    """The blocks a worker may take, in its order of preference: the one set for it, or every block of the pool
    starting from one derived from its node id (another worker on the host may hold that one)."""
    if explicit:
        yield Block(ipaddress.IPv4Network(explicit))
        return
    net = ipaddress.IPv4Network(pool)
    count = 2 ** (prefix - net.prefixlen)
    size = 2 ** (32 - prefix)
    start = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "big") % count
    for i in range(count):
        yield Block(ipaddress.IPv4Network((int(net.network_address) + ((start + i) % count) * size, prefix)))


def block_of_table(name: str) -> Block | None:
    """The block an nft table of ours is named after (`flint_c6120400_24`), None for any other table."""
    if not name.startswith(TABLE_PREFIX):
        return None
    tag, _, prefix = name[len(TABLE_PREFIX):].partition("_")
    try:
        return Block(ipaddress.IPv4Network((int(tag, 16), int(prefix))))
    except ValueError:
        return None


class Addresses:
    """Which of a block's addresses are in use. Freed ones are handed out again last, so a sandbox's address is
    not reused while its old veth may still be going away."""

    def __init__(self, block: Block):
        self.block = block
        self.used: set[int] = set()
        self._next = 0

    def take(self) -> int | None:
        for i in range(self.block.capacity):
            index = (self._next + i) % self.block.capacity
            if index not in self.used:
                self.used.add(index)
                self._next = index + 1
                return index
        return None

    def give_back(self, index: int) -> None:
        self.used.discard(index)


def refused_networks(node_address: str, control_nodes: Iterable[str], extra: Iterable[str], pool: str) -> list[str]:
    """What no sandbox may reach, as IPv4 networks: the node and its cluster, the sandbox pool, the settings'
    extras, and ALWAYS_REFUSED. (A sandbox has no IPv6 at all: the table drops it.)"""
    return ipv4_networks((*ALWAYS_REFUSED, pool, node_address, *control_nodes, *extra))


def ipv4_networks(texts: Iterable[str]) -> list[str]:
    """The IPv4 addresses and networks among `texts`, collapsed; host names and IPv6 left out (a sandbox has no
    IPv6, and cannot send to a name)."""
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.IPv4Network(text, strict=False))
        except ValueError:
            continue
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def ruleset(block: Block, refused: list[str], resolver: str | None, comment: str) -> str:
    """The node's nft table (`nft -f`): created afresh each time (an old one of the same name goes first)."""
    p = f'"{block.veth_prefix}*"'
    dns = (f"iifname {p} ip daddr {resolver} meta l4proto {{ tcp, udp }} th dport 53 accept "
           'comment "the resolver sandboxes are told of"') if resolver else ""
    lines = [
        f"table inet {block.table}",
        f"delete table inet {block.table}",
        f"table inet {block.table} {{",
        f'\tcomment "{comment}"',
        "\tset refused {",
        "\t\ttype ipv4_addr; flags interval; auto-merge;",
        f"\t\telements = {{ {', '.join(refused)} }}",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority -10; policy accept;",
        f"\t\t{dns}",
        f"\t\tiifname {p} counter reject with icmpx type admin-prohibited "
        'comment "nothing from a sandbox reaches the host itself, on any of its addresses"',
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority -10; policy accept;",
        f'\t\tiifname {p} meta nfproto ipv6 counter drop comment "sandboxes have no IPv6"',
        f"\t\tiifname {p} fib saddr . iif oif missing counter drop "
        'comment "a sandbox sends from its own address only"',
        f"\t\t{dns}",
        f"\t\tiifname {p} ip daddr @refused counter reject with icmpx type admin-prohibited "
        'comment "the node, its cluster, loopback, link-local, other sandboxes"',
        f"\t\tiifname {p} accept",
        f"\t\toifname {p} ct state established,related accept",
        f'\t\toifname {p} counter drop comment "nothing outside opens a connection to a sandbox"',
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\tip saddr {block.network} oifname != {p} masquerade",
        "\t}",
        "}",
    ]
    return "\n".join(line for line in lines if line.strip()) + "\n"


def refuse_more(block: Block, addresses: Iterable[str]) -> str:
    """`nft -f` input adding addresses (say, nodes placement came to know) to the refused set."""
    return f"add element inet {block.table} refused {{ {', '.join(ipv4_networks(addresses))} }}\n"


def sandbox_mac(address: str) -> str:
    """A locally administered MAC made of the sandbox's address: unique wherever the address is."""
    return "02:fe:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


def host_wiring(block: Block, index: int, pid: int) -> str:
    """`ip -batch` in the host's namespace: the veth pair, its inside end straight into the sandbox's namespace
    (of process `pid`), the host end up with a route and a static neighbour for the sandbox's address."""
    name, address = block.veth(index), block.address(index)
    mac = sandbox_mac(address)
    return (f"link add {name} address {GATEWAY_MAC} type veth peer name eth0 address {mac} netns {pid}\n"
            f"link set {name} addrgenmode none\n"
            f"link set {name} up\n"
            f"route replace {address}/32 dev {name}\n"
            f"neigh replace {address} lladdr {mac} dev {name} nud permanent\n")


def sandbox_wiring(block: Block, index: int) -> str:
    """`ip -batch` inside the sandbox's namespace: loopback, its address, the gateway and a default route."""
    address = block.address(index)
    return ("link set lo up\n"
            "link set eth0 addrgenmode none\n"
            f"addr add {address}/32 dev eth0\n"
            "link set eth0 up\n"
            f"route add {GATEWAY}/32 dev eth0 scope link\n"
            f"neigh replace {GATEWAY} lladdr {GATEWAY_MAC} dev eth0 nud permanent\n"
            f"route add default via {GATEWAY} dev eth0 src {address}\n")


def overlapping_routes(block: Block, proc_net_route: str) -> list[str]:
    """Routes of the host (/proc/net/route) into the block through interfaces not of this block: then the block
    is someone else's network here and must not be taken. A default route overlaps nothing."""
    found = []
    for line in proc_net_route.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0].startswith(block.veth_prefix):
            continue
        try:
            dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
            mask = bin(int(fields[7], 16)).count("1")
        except ValueError:
            continue
        if mask and ipaddress.IPv4Network((dest, mask), strict=False).overlaps(block.network):
            found.append(f"{dest}/{mask} dev {fields[0]}")
    return found


def first_nameserver(resolv_conf_text: str) -> str | None:
    """The host's first nameserver a sandbox could reach: IPv4, not loopback (a host's local stub resolver)."""
    for line in resolv_conf_text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                return str(address)
    return None


def choose_resolver(setting: str, host_resolv_conf: str) -> str | None:
    """`sandbox_resolver`: an address, "none", or "" for the host's own first nameserver (None if it has none)."""
    if setting == "none":
        return None
    return setting or first_nameserver(host_resolv_conf)


def sandbox_resolv_conf(resolver: str | None) -> str:
    """A network sandbox's /etc/resolv.conf: the one resolver it can reach, or none (lookups then fail at once)."""
    if resolver is None:
        return "# no resolver: this host gives sandboxes none (setting sandbox_resolver)\n"
    return f"nameserver {resolver}\noptions timeout:2 attempts:2\n"
