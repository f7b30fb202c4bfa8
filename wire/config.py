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
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wire.messages import MEMORY_MB_MAX, MEMORY_MB_MIN, RAFT_GROUPS, ROLES, TIMEOUT_S_MAX
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
    # worker: a zygote that has not answered a spawn (a fork, normally milliseconds) within this is taken for hung
    # (its signal handler blocked, its process stopped): it is killed and replaced
    zygote_spawn_timeout_s: float = 10.0
    # worker: an idle sandbox is frozen (cgroup freezer) this long after its last invoke, and thawed by the next;
    # back-to-back invokes pay for no freeze and thaw, and a thread left running burns at most this much
    sandbox_freeze_after_s: float = 0.05

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
        return self


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
    "zygote_spawn_timeout_s": (0.1, 600), "sandbox_freeze_after_s": (0, 60),
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
]


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
    def cores(self) -> int:
        return os.cpu_count() or 1


class ConfigError(Exception):
    pass


DEFAULTS = Settings()  # what every state class falls back to: each default is written once, in Settings


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
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number")
        values[key] = type(default)(value)
    out = cls(**values)
    return out.validate() if isinstance(out, Settings) else out
