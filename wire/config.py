"""A node's configuration: one TOML file per host. Every tunable has its default and unit here.

    node_id = "n1"
    az = "az1"
    address = "10.0.1.5"            # the cluster address; every Flint port binds only here
    roles = ["control", "frontend", "manager", "worker"]
    control_nodes = ["10.0.1.5", "10.0.2.5", "10.0.3.5"]   # addresses of the nodes with role "control"
    data_dir = "/var/lib/flint"

    [ports]        # optional; these are the defaults
    frontend = 7100
    ...
    [settings]     # optional; see Settings below
    keep_alive_s = 600
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wire.messages import (
    MEMORY_MB_MAX,
    MEMORY_MB_MIN,
    RAFT_GROUPS,
    ROLES,
    TIMEOUT_S_MAX,
)
from wire.transport import endpoint


@dataclasses.dataclass(frozen=True)
class Ports:
    frontend: int = 7100
    manager: int = 7101
    worker: int = 7102
    registry: int = 7103
    counting: int = 7104
    placement: int = 7105
    admin: int = 7106
    raft_control: int = 7200
    raft_counting: int = 7201
    raft_placement: int = 7202

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Settings:
    heartbeat_interval_s: float = 0.5  # placement agent -> placement
    missed_heartbeats: int = 3  # a node is unhealthy after this many missed intervals
    keep_alive_s: float = 600.0  # an idle sandbox is reaped after this long
    worker_lease_s: float = 6 * 3600.0  # placement leases worker capacity to a manager for this long
    lease_block_mb: int = 2048  # the capacity one lease carries (a function bigger than this gets its size)
    hold_down_s: float = 5.0  # a host that went bad stays out this long after it recovers (doubling per relapse)
    orphan_grace_s: float = 10.0  # a worker reaps sandboxes whose manager has been gone this long
    worker_memory_mb: int = 0  # memory this host offers for sandboxes; 0: its physical memory
    function_cache_ttl_s: float = 2.0  # how long a frontend trusts its copy of a function's config
    code_cache_mb: int = 2048  # unpacked code kept per worker host
    unzipped_max_mb: int = 250  # a function's code, unzipped (refused at upload past it; workers check it again)
    role_restarts: int = 5  # a role that crashes more often than this within role_restart_window_s ends the node
    role_restart_window_s: float = 60.0
    max_sandboxes: int = 256  # per worker host
    sandbox_pids_max: int = 64  # processes and threads per sandbox (a fork bomb stops here)
    sandbox_tmp_mb: int = 64  # size of each sandbox's /tmp (a tmpfs, counted in the function's memory)
    sandbox_pool: int = 4  # isolated slots kept prepared, so a cold start skips cgroup and namespace set-up
    shutdown_grace_s: float = 5.0  # on SIGTERM, in-flight invokes get this long to finish
    record_executions: bool = False  # worker: log each execution's start/end (monotonic) to executions.log
    credit_lease_s: float = 3.0  # frontend: how long a credit lease lasts before it must be renewed
    # How long after admission an execution may wait for its sandbox before its own timeout starts. The ledger
    # holds a lapsed lease's credits for expiry + the longest timeout + this; the worker refuses runs past it.
    cold_start_allowance_s: float = 12.0
    default_tenant_limit: int = 1000  # counting: concurrent executions per tenant unless set otherwise
    unreserved_min: int = 100  # counting: reservations must leave at least this much of a tenant's limit
    event_retry_backoff_s: float = 60.0  # async: the wait before a retry after a function error (doubles)
    event_visibility_s: float = 60.0  # async: a taken event reappears this long after its poller went quiet
    event_pollers: int = 16  # async: executions of queued events one frontend runs at once
    # Quotas on control-plane state, per tenant (one tenant at its quota never blocks another), and how long
    # finished state is kept.
    tenant_event_queue_mb: int = 128  # async: payloads of a tenant's events not yet run (1 KB more each); past it, 429
    tenant_dlq_mb: int = 32  # async: a tenant's dead-letter queue; past it, its oldest dead letters are dropped
    event_done_retention_s: float = 3600.0  # async: a finished event stays listable this long (not its payload)
    event_dlq_retention_s: float = 24 * 3600.0  # async: a dead letter stays this long, to be redriven
    tenant_code_storage_mb: int = 5120  # zipped code of all a tenant's function versions (Lambda: 75 GB an account)
    code_blob_grace_s: float = 300.0  # a code blob no version names any more leaves the control nodes this long after
    # Sandboxes of functions with network (worker/network.py): each worker takes a block of this pool (the block
    # is its own on the host; addresses never leave it: they are masqueraded). The default lies in 198.18.0.0/15,
    # the benchmarking range, so it meets no real network; 198.19.0.0/16 is left for tests' "outside" servers.
    sandbox_network_cidr: str = "198.18.0.0/16"
    sandbox_network_prefix: int = 24  # the size of a worker's block: /24 = 254 sandboxes with network at once
    sandbox_network_block: str = ""  # this worker's block, e.g. "198.18.7.0/24"; "": derived from its node id
    # more networks sandboxes may not reach, e.g. the cluster's own (its control nodes, its node address, every
    # node placement knows, loopback, link-local and the sandbox pool itself are always refused)
    sandbox_network_refused: tuple[str, ...] = ()
    # A tenant's sandboxes (warm or running) may hold at most this much memory at each manager; past it the
    # manager first destroys the tenant's least recently used idle sandboxes, then refuses (429). 0: no cap.
    tenant_sandbox_memory_mb: int = 0
    sandbox_resolver: str = ""  # the nameserver sandboxes are told of: "" the host's first non-loopback one; "none"
    # Raft log compaction: a replica dumps its state (raft/<group>.dump) and cuts its journal to what follows, when
    # its log holds this many entries, this long after its last dump, or this much was appended since, first of the
    # three. A dump stalls the group's tick thread for about 1 ms per MB of state.
    raft_compaction_entries: int = 20_000
    raft_compaction_interval_s: float = 60.0
    raft_compaction_mb: int = 64
    # worker: a zygote that has not answered a spawn (a fork, normally milliseconds) within this is taken for hung
    # (its signal handler blocked, its process stopped): it is killed and replaced
    zygote_spawn_timeout_s: float = 10.0
    # worker: an idle sandbox is frozen (cgroup freezer) this long after its last invoke, and thawed by the next;
    # back-to-back invokes pay for no freeze and thaw, and a thread left running burns at most this much
    sandbox_freeze_after_s: float = 0.05
    # A node's data dir (wire/persist.py): probed this often (a small file written, fsynced and removed; a failed
    # write ends the node, as any failed write there does), and reported unable to persist (unhealthy) while its
    # free space or inodes are under these margins
    persist_probe_interval_s: float = 1.0
    persist_min_free_mb: int = 128
    persist_min_free_inodes: int = 1000
    # control nodes: the code blobs function versions name that are missing here (a push missed while down) are
    # copied from a peer, looked for this often, one at a time at most this fast
    code_blob_repair_interval_s: float = 10.0
    code_blob_repair_mb_s: float = 20.0

    def validate(self) -> Settings:
        """Each setting within its range, and the settings that depend on each other in step. Raises ConfigError
        naming what to change."""
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                where = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
                raise ConfigError(f"{name} = {value:g}: it must be {where}")
        for fields, holds, why in _RELATIONS:
            if not holds(self):
                values = ", ".join(f"{f} = {getattr(self, f):g}" for f in fields)
                raise ConfigError(f"{values}: {why}")
        _check_sandbox_network(self)
        return self


CODE_BLOB_GRACE_S_MAX = 24 * 3600.0  # the longest code_blob_grace_s: the registry forgets releases after this
SKEW_MARGIN_S = 0.25  # a frontend stops admitting on a credit lease this long before the ledger's expiry
# (low, high or None) of every numeric setting
_BOUNDS: dict[str, tuple[float, float | None]] = {
    "heartbeat_interval_s": (0.05, 60), "missed_heartbeats": (1, 100), "keep_alive_s": (0.1, None),
    "worker_lease_s": (1, 7 * 24 * 3600), "lease_block_mb": (MEMORY_MB_MIN, 1_000_000), "hold_down_s": (0, 3600),
    "orphan_grace_s": (0.1, None), "worker_memory_mb": (0, None), "function_cache_ttl_s": (0, 3600),
    "code_cache_mb": (1, None), "unzipped_max_mb": (1, 10_240), "role_restarts": (0, 1000),
    "role_restart_window_s": (1, None), "max_sandboxes": (1, 100_000), "sandbox_pids_max": (4, 100_000),
    "sandbox_tmp_mb": (1, MEMORY_MB_MAX), "sandbox_pool": (0, 1000), "shutdown_grace_s": (0, TIMEOUT_S_MAX),
    "credit_lease_s": (4 * SKEW_MARGIN_S, 60), "cold_start_allowance_s": (0, TIMEOUT_S_MAX),
    "default_tenant_limit": (0, 1_000_000), "unreserved_min": (0, 1_000_000),
    "event_retry_backoff_s": (0.01, 6 * 3600), "event_visibility_s": (1, 12 * 3600), "event_pollers": (1, 10_000),
    "tenant_event_queue_mb": (1, 1_000_000), "tenant_dlq_mb": (1, 1_000_000),
    "event_done_retention_s": (1, 7 * 24 * 3600), "event_dlq_retention_s": (1, 14 * 24 * 3600),
    "tenant_code_storage_mb": (1, 75 * 1024), "code_blob_grace_s": (1, CODE_BLOB_GRACE_S_MAX),
    "sandbox_network_prefix": (16, 30), "tenant_sandbox_memory_mb": (0, 100_000_000),
    # pysyncobj needs at least 2 entries; its journal addresses records with 32 bits, so it must stay well under 4 GiB
    "raft_compaction_entries": (100, 10_000_000), "raft_compaction_interval_s": (1, 24 * 3600),
    "raft_compaction_mb": (1, 1024),
    "zygote_spawn_timeout_s": (0.1, 600), "sandbox_freeze_after_s": (0, 60),
    "persist_probe_interval_s": (0.1, 60), "persist_min_free_mb": (0, 1_000_000),
    "persist_min_free_inodes": (0, 1_000_000_000), "code_blob_repair_interval_s": (0.5, 3600),
    "code_blob_repair_mb_s": (0.1, 100_000),
}
# (the settings involved, what must hold, why), checked after the bounds
_RELATIONS: list[tuple[tuple[str, ...], Callable[[Settings], bool], str]] = [
    (("orphan_grace_s", "heartbeat_interval_s", "missed_heartbeats"),
     lambda s: s.orphan_grace_s >= s.heartbeat_interval_s * s.missed_heartbeats,
     "a worker would reap a manager's sandboxes before placement could tell the manager is gone; "
     "raise orphan_grace_s to at least heartbeat_interval_s x missed_heartbeats"),
    (("worker_lease_s", "heartbeat_interval_s", "missed_heartbeats"),
     lambda s: s.worker_lease_s >= 4 * s.heartbeat_interval_s * s.missed_heartbeats,
     "a worker lease would end before its host's failure could be noticed; raise worker_lease_s"),
    (("sandbox_pool", "max_sandboxes"), lambda s: s.sandbox_pool <= s.max_sandboxes,
     "more prepared slots than sandboxes a host may hold; lower sandbox_pool"),
    (("unreserved_min", "default_tenant_limit"), lambda s: s.unreserved_min <= s.default_tenant_limit,
     "a tenant's limit must leave room for the unreserved minimum; lower unreserved_min"),
    (("code_blob_grace_s", "function_cache_ttl_s"), lambda s: s.code_blob_grace_s >= s.function_cache_ttl_s,
     "a frontend may still start the code a function just replaced for function_cache_ttl_s; raise "
     "code_blob_grace_s to at least that"),
]


def _check_sandbox_network(s: Settings) -> None:
    """The sandbox network's addresses: IPv4 networks that fit together."""
    def network(name: str, text: str) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(text)
        except ValueError as exc:
            raise ConfigError(f"{name} = {text!r}: not an IPv4 network ({exc})") from None

    pool = network("sandbox_network_cidr", s.sandbox_network_cidr)
    if s.sandbox_network_prefix < pool.prefixlen or s.sandbox_network_prefix - pool.prefixlen > 16:
        raise ConfigError(f"sandbox_network_prefix = {s.sandbox_network_prefix}: a worker's block must lie in "
                          f"sandbox_network_cidr = {pool} and it must hold at most 65536 blocks")
    if s.sandbox_network_block:
        block = network("sandbox_network_block", s.sandbox_network_block)
        if not block.subnet_of(pool) or block.prefixlen != s.sandbox_network_prefix:
            raise ConfigError(f"sandbox_network_block = {block}: it must be a /{s.sandbox_network_prefix} of "
                              f"sandbox_network_cidr = {pool}")
    for text in s.sandbox_network_refused:
        refused = network("sandbox_network_refused", text)
        if refused.overlaps(pool):
            raise ConfigError(f"sandbox_network_refused holds {refused}, which overlaps sandbox_network_cidr = "
                              f"{pool}: sandbox addresses must be apart from the networks they may not reach")
    if s.sandbox_resolver not in ("", "none"):
        try:
            ipaddress.IPv4Address(s.sandbox_resolver)
        except ValueError:
            raise ConfigError(f"sandbox_resolver = {s.sandbox_resolver!r}: an IPv4 address, \"none\", or \"\" "
                              "for the host's own nameserver") from None


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    node_id: str
    az: str
    address: str
    roles: tuple[str, ...]
    control_nodes: tuple[str, ...]
    data_dir: Path
    ports: Ports = Ports()
    settings: Settings = Settings()

    @classmethod
    def load(cls, path: Path | str) -> NodeConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> NodeConfig:
        def need(key: str, kind: type) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: '{key}' is required")
            if not isinstance(raw[key], kind):
                raise ConfigError(f"{source}: '{key}' must be a {kind.__name__}")
            return raw[key]

        roles = tuple(need("roles", list))
        for role in roles:
            if role not in ROLES:
                raise ConfigError(f"{source}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        control_nodes = tuple(need("control_nodes", list))
        if not control_nodes:
            raise ConfigError(f"{source}: 'control_nodes' must list at least one address")
        address = need("address", str)
        if "control" in roles and address not in control_nodes:
            raise ConfigError(f"{source}: this node has role control, so its address must be in control_nodes")
        ports = _sub(Ports, raw.get("ports", {}), f"{source} [ports]")
        settings = _sub(Settings, raw.get("settings", {}), f"{source} [settings]")
        known = {"node_id", "az", "address", "roles", "control_nodes", "data_dir", "ports", "settings"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{source}: unknown keys {', '.join(sorted(unknown))}")
        return cls(
            node_id=need("node_id", str),
            az=need("az", str),
            address=address,
            roles=roles,
            control_nodes=control_nodes,
            data_dir=Path(need("data_dir", str)),
            ports=ports,
            settings=settings,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "az": self.az,
            "address": self.address,
            "roles": list(self.roles),
            "control_nodes": list(self.control_nodes),
            "data_dir": str(self.data_dir),
            "ports": self.ports.as_dict(),
            "settings": dataclasses.asdict(self.settings),
        }

    def endpoint(self, service: str, address: str | None = None) -> str:
        return endpoint(address or self.address, getattr(self.ports, service))

    def bind_endpoint(self, service: str) -> str:
        return self.endpoint(service)

    def raft_address(self, group: str, address: str | None = None) -> str:
        return f"{address or self.address}:{getattr(self.ports, 'raft_' + group)}"

    def control_endpoints(self, service: str) -> list[str]:
        """This node's own control service first (if it has one), then the others."""
        addresses = sorted(self.control_nodes, key=lambda a: a != self.address)
        return [self.endpoint(service, a) for a in addresses]

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def memory_mb(self) -> int:
        if self.settings.worker_memory_mb:
            return self.settings.worker_memory_mb
        try:
            import psutil

            return int(psutil.virtual_memory().total / (1024 * 1024))
        except Exception:
            return 0

    @property
    def sandbox_capacity_mb(self) -> int:
        """The memory this host's sandboxes may take between them (their cgroup limits added up)."""
        return max(0, self.memory_mb - SYSTEM_RESERVED_MB)

    @property
    def cores(self) -> int:
        return os.cpu_count() or 1


class ConfigError(Exception):
    pass


DEFAULTS = Settings()
SYSTEM_RESERVED_MB = 512  # of a host's memory, kept back for the node itself: sandboxes never get it  # what every state class falls back to: each default is written once, in Settings


def _sub(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys are {', '.join(fields)}")
        default = getattr(cls(), key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false")
            values[key] = value
            continue
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string")
            values[key] = value
            continue
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of strings")
            values[key] = tuple(value)
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number")
        values[key] = type(default)(value)
    out = cls(**values)
    return out.validate() if isinstance(out, Settings) else out
