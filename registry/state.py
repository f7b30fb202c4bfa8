"""Function metadata, versions, aliases and tenants, replicated in the `control` Raft group. No I/O.

Code is not here: it is a content-addressed blob (sha256) kept by the control nodes' blob stores; a function
record names its blob, and `code` (registry.code.CodeStorage) counts what each tenant's versions name against its
quota and says which blobs nothing names any more. The async event queue shares the group (`ControlState` at the
bottom), and so do the limits those rules use (`ControlState.cmd_set_limits`).

Every rule about what a function's configuration may be lives here (`check_config`), and every command that
makes or changes a configuration goes through it, whoever proposes it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from registry.code import CodeStorage
from registry.events import EventLimits, EventQueue
from wire.config import Settings
from wire.errors import (
    AccessDeniedException,
    FlintError,
    InvalidParameterValueException,
    ResourceConflictException,
    ResourceNotFoundException,
)
from wire.messages import CONFIG_FIELDS, ENV_MAX_BYTES, EVENT_AGE_S_MAX, RETRIES_MAX, MiB, Runtime

LATEST = "$LATEST"
ASYNC_DEFAULTS = {"maximum_retry_attempts": RETRIES_MAX, "maximum_event_age_s": EVENT_AGE_S_MAX}
RESERVED_ENV_PREFIXES = ("AWS_", "FLINT_")
RESERVED_ENV_NAMES = ("LAMBDA_TASK_ROOT",)


def check_config(config: dict[str, Any]) -> None:
    """A function's configuration as a whole: its environment and its handler for its runtime. (Each field's
    own type and range is checked where the message is decoded.)"""
    env = config.get("environment") or {}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > ENV_MAX_BYTES:
        raise InvalidParameterValueException(
            f"environment variables take {size} bytes; the limit is {ENV_MAX_BYTES} bytes"
        )
    for key in env:
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise InvalidParameterValueException(f"environment variable name {key!r} is not valid")
        if key.startswith(RESERVED_ENV_PREFIXES) or key in RESERVED_ENV_NAMES:
            raise InvalidParameterValueException(f"environment variable {key} is reserved")
    runtime, handler = config.get("runtime", Runtime.PYTHON3), config.get("handler", "")
    if runtime == Runtime.PYTHON3 and "." not in handler:
        raise InvalidParameterValueException(f"handler {handler!r} must be module.function for python3")


class RegistryState:
    COMMANDS: ClassVar[dict[str, Callable[..., Any]]]  # what a replicated command may name (set below)

    def __init__(self) -> None:
        # (tenant, name) -> {"latest": config, "versions": {"1": config}, "aliases": {...}, "published_sha": ...}
        self.functions: dict[tuple[str, str], dict[str, Any]] = {}
        self.tenants: dict[str, dict[str, Any]] = {}
        self.operators: list[str] = []  # public keys allowed to administer tenants and limits
        self._key_owner: dict[str, str] = {}
        self.code = CodeStorage()

    # --- functions -----------------------------------------------------------------------------------------------

    def check_code(self, tenant: str, name: str, code_sha256: str, code_size: int, create: bool) -> None:
        """What a create of function `name` (or an update of its code) with this package is refused for: the name
        taken (or missing), or the tenant's code storage quota. Asked before the package is uploaded, and again
        as the change commits."""
        entry = self.functions.get((tenant, name))
        if create and entry is not None:
            raise ResourceConflictException(f"Function already exist: {name}. Update it, or delete it first.")
        if not create and entry is None:
            raise _not_found(name)
        replacing = None if entry is None else entry["latest"]["code_sha256"]
        self.code.check(tenant, code_sha256, code_size, replacing=replacing)

    def cmd_create_function(self, now: float, config: dict[str, Any]) -> dict[str, Any]:
        tenant, name = config["tenant"], config["name"]
        self.check_code(tenant, name, config["code_sha256"], config.get("code_size", 0), create=True)
        check_config(config)
        self._check_network(tenant, config)
        record = {**ASYNC_DEFAULTS, **config, "version": LATEST, "created_ms": int(now * 1000),
                  "last_modified_ms": int(now * 1000)}
        self.functions[(tenant, name)] = {"latest": record, "versions": {}, "aliases": {}, "next_version": 1}
        self.code.add(tenant, record["code_sha256"], record.get("code_size", 0))
        return dict(record)

    def cmd_update_code(self, now: float, tenant: str, name: str, code_sha256: str, code_size: int) -> dict[str, Any]:
        self.check_code(tenant, name, code_sha256, code_size, create=False)
        latest = self._entry(tenant, name)["latest"]
        self.code.add(tenant, code_sha256, code_size)
        self.code.drop(now, tenant, latest["code_sha256"])
        latest.update(code_sha256=code_sha256, code_size=code_size, last_modified_ms=int(now * 1000))
        return dict(latest)

    def cmd_update_config(self, now: float, tenant: str, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        latest = self._entry(tenant, name)["latest"]
        unknown = set(changes) - set(CONFIG_FIELDS)
        if unknown:
            raise InvalidParameterValueException(f"cannot change {', '.join(sorted(unknown))}")
        if not changes:
            raise InvalidParameterValueException("nothing to change: give at least one setting")
        check_config({**latest, **changes})
        self._check_network(tenant, changes)
        latest.update(changes)
        latest["last_modified_ms"] = int(now * 1000)
        return dict(latest)

    def cmd_delete_function(self, now: float, tenant: str, name: str) -> None:
        entry = self.functions.pop((tenant, name), None)
        if entry is None:
            raise _not_found(name)
        for record in (entry["latest"], *entry["versions"].values()):
            self.code.drop(now, tenant, record["code_sha256"])

    def cmd_publish_version(self, now: float, tenant: str, name: str, description: str = "") -> dict[str, Any]:
        """An immutable copy of $LATEST. Publishing unchanged code and configuration returns the last version."""
        entry = self._entry(tenant, name)
        latest = entry["latest"]
        fingerprint = {k: latest.get(k) for k in (*CONFIG_FIELDS, "code_sha256")}
        if entry["versions"]:
            last = entry["versions"][str(entry["next_version"] - 1)]
            if {k: last.get(k) for k in fingerprint} == fingerprint:
                return dict(last)
        version = str(entry["next_version"])
        entry["next_version"] += 1
        entry["versions"][version] = {**copy.deepcopy(latest), "version": version, "description": description,
                                      "published_ms": int(now * 1000)}
        self.code.add(tenant, latest["code_sha256"], latest.get("code_size", 0))
        return dict(entry["versions"][version])

    def cmd_put_alias(self, now: float, tenant: str, name: str, alias: str, version: str,
                      additional_version: str | None = None, weight: float = 0.0,
                      create: bool = True) -> dict[str, Any]:
        """Create (or update) an alias pointing at a published version, optionally sending `weight` (0 to 1) of
        invokes to a second version, for a canary."""
        entry = self._entry(tenant, name)
        if alias == LATEST or alias.isdigit():
            raise InvalidParameterValueException("an alias name cannot be $LATEST or a number")
        exists = alias in entry["aliases"]
        if create and exists:
            raise ResourceConflictException(f"Alias already exists: {name}:{alias}")
        if not create and not exists:
            raise ResourceNotFoundException(f"Alias not found: {name}:{alias}")
        for v in filter(None, (version, additional_version)):
            if v != LATEST and v not in entry["versions"]:
                raise InvalidParameterValueException(f"version {v} of {name} is not published")
        if not 0.0 <= weight <= 1.0:
            raise InvalidParameterValueException("an alias weight must be between 0 and 1")
        if additional_version is not None and additional_version == version:
            raise InvalidParameterValueException("the additional version must differ from the main one")
        entry["aliases"][alias] = {"name": alias, "version": version, "additional_version": additional_version,
                                   "weight": weight if additional_version else 0.0}
        return dict(entry["aliases"][alias])

    def cmd_delete_alias(self, now: float, tenant: str, name: str, alias: str) -> None:
        if self._entry(tenant, name)["aliases"].pop(alias, None) is None:
            raise ResourceNotFoundException(f"Alias not found: {name}:{alias}")

    # --- reads ---------------------------------------------------------------------------------------------------

    def _entry(self, tenant: str, name: str) -> dict[str, Any]:
        entry = self.functions.get((tenant, name))
        if entry is None:
            raise _not_found(name)
        return entry

    def get_function(self, tenant: str, name: str) -> dict[str, Any]:
        return dict(self._entry(tenant, name)["latest"])

    def describe(self, tenant: str, name: str, qualifier: str | None) -> list[dict[str, Any]]:
        """The configurations name[:qualifier] may run, each with the share of invokes it gets: one for $LATEST
        or a version, one or two for an alias (the frontend rolls the weight)."""
        entry = self._entry(tenant, name)
        if qualifier in (None, LATEST):
            return [{"weight": 1.0, "config": dict(entry["latest"])}]
        if qualifier in entry["versions"]:
            return [{"weight": 1.0, "config": dict(entry["versions"][qualifier])}]
        alias = entry["aliases"].get(qualifier)
        if alias is None:
            raise ResourceNotFoundException(f"Function not found: {name}:{qualifier}")

        def config(v: str) -> dict[str, Any]:
            return {**(entry["latest"] if v == LATEST else entry["versions"][v]), "alias": qualifier}

        out = [{"weight": 1.0 - alias["weight"], "config": config(alias["version"])}]
        if alias["additional_version"]:
            out.append({"weight": alias["weight"], "config": config(alias["additional_version"])})
        return out

    def list_functions(self, tenant: str | None) -> list[dict[str, Any]]:
        return [dict(e["latest"]) for (t, _), e in sorted(self.functions.items()) if tenant is None or t == tenant]

    def list_versions(self, tenant: str, name: str) -> list[dict[str, Any]]:
        entry = self._entry(tenant, name)
        return [dict(entry["latest"])] + [dict(v) for _, v in sorted(entry["versions"].items(), key=lambda kv: int(kv[0]))]

    def list_aliases(self, tenant: str, name: str) -> list[dict[str, Any]]:
        return [dict(a) for _, a in sorted(self._entry(tenant, name)["aliases"].items())]

    # --- tenants and keys ----------------------------------------------------------------------------------------

    def cmd_create_tenant(self, now: float, tenant: str, public_keys: list[str]) -> dict[str, Any]:
        for key in public_keys:
            owner = self._key_owner.get(key)
            if owner is not None and owner != tenant:
                raise ResourceConflictException("that public key already belongs to another tenant")
        record = self.tenants.setdefault(tenant, {"keys": [], "revoked": [], "created_ms": int(now * 1000)})
        for key in public_keys:
            if key in record["revoked"]:
                raise InvalidParameterValueException("that key was revoked; make a new one")
            if key not in record["keys"]:
                record["keys"].append(key)
            self._key_owner[key] = tenant
        return _tenant_view(tenant, record)

    def cmd_add_key(self, now: float, tenant: str, public_key: str) -> dict[str, Any]:
        if tenant not in self.tenants:
            raise ResourceNotFoundException(f"no tenant {tenant}; create it first")
        return self.cmd_create_tenant(now, tenant, [public_key])

    def cmd_revoke_key(self, now: float, tenant: str, public_key: str) -> dict[str, Any]:
        record = self.tenants.get(tenant)
        if record is None or public_key not in record["keys"]:
            raise ResourceNotFoundException(f"tenant {tenant} has no such key")
        record["keys"].remove(public_key)
        record["revoked"].append(public_key)
        self._key_owner.pop(public_key, None)
        return _tenant_view(tenant, record)

    def cmd_set_tenant_network(self, now: float, tenant: str, allowed: bool) -> dict[str, Any]:
        """The operator decides whether a tenant's functions may have network access at all. Taking it away
        turns it off in every function of the tenant, its published versions included: their sandboxes are
        then built anew, without it."""
        record = self.tenants.get(tenant)
        if record is None:
            raise ResourceNotFoundException(f"no tenant {tenant}; create it first")
        record["network"] = allowed
        if not allowed:
            for (owner, _), entry in self.functions.items():
                if owner == tenant:
                    for config in (entry["latest"], *entry["versions"].values()):
                        if config.get("network"):
                            config["network"] = False
                            config["last_modified_ms"] = int(now * 1000)
        return _tenant_view(tenant, record)

    def _check_network(self, tenant: str, config: dict[str, Any]) -> None:
        if config.get("network") and not self.tenants.get(tenant, {}).get("network", False):
            raise AccessDeniedException(
                f"tenant {tenant} may not give functions network access; ask your operator "
                f"(flint tenant network {tenant} --allow)")

    def cmd_add_operator(self, now: float, public_key: str) -> list[str]:
        if public_key in self._key_owner:
            raise ResourceConflictException("that key belongs to a tenant")
        if public_key not in self.operators:
            self.operators.append(public_key)
        return list(self.operators)

    def tenant_for_key(self, public_key: str) -> str | None:
        return self._key_owner.get(public_key)

    def list_tenants(self) -> dict[str, dict[str, Any]]:
        return {name: _tenant_view(name, r) for name, r in self.tenants.items()}

    def principals(self) -> dict[str, str]:
        """Every active key and who it is: 'tenant:NAME' or 'operator'. Frontends cache this for their ZAP."""
        out = {key: f"tenant:{tenant}" for key, tenant in self._key_owner.items()}
        out.update({key: "operator" for key in self.operators})
        return out


def _tenant_view(name: str, record: dict[str, Any]) -> dict[str, Any]:
    return {"tenant": name, "keys": list(record["keys"]), "revoked": len(record.get("revoked", [])),
            "created_ms": record["created_ms"], "network": record.get("network", False)}


def _not_found(name: str) -> ResourceNotFoundException:
    # The same answer whether the function is missing or belongs to someone else: existence is not disclosed.
    return ResourceNotFoundException(f"Function not found: {name}")


RegistryState.COMMANDS = {
    "create_function": RegistryState.cmd_create_function,
    "update_code": RegistryState.cmd_update_code,
    "update_config": RegistryState.cmd_update_config,
    "delete_function": RegistryState.cmd_delete_function,
    "publish_version": RegistryState.cmd_publish_version,
    "put_alias": RegistryState.cmd_put_alias,
    "delete_alias": RegistryState.cmd_delete_alias,
    "create_tenant": RegistryState.cmd_create_tenant,
    "add_key": RegistryState.cmd_add_key,
    "revoke_key": RegistryState.cmd_revoke_key,
    "add_operator": RegistryState.cmd_add_operator,
    "set_tenant_network": RegistryState.cmd_set_tenant_network,
}


def limits_of(settings: Settings) -> dict[str, Any]:
    """The limits of ControlState's rules that a node's settings ask for (what `cmd_set_limits` takes)."""
    return {"events": dataclasses.asdict(EventLimits.of(settings)),
            "code_storage_bytes": settings.tenant_code_storage_mb * MiB}


class ControlState(RegistryState):
    """The `control` group's state: the registry, and the async event queue beside it.

    The limits its rules use (quotas, retention, the retry backoff) are part of the replicated state: every
    replica starts from the defaults and the leader commits its node's settings when they differ
    (`cmd_set_limits`), so replicas never decide with different numbers, even if nodes' settings differ."""

    def __init__(self) -> None:
        super().__init__()
        self.events = EventQueue()

    def limits(self) -> dict[str, Any]:
        return {"events": dataclasses.asdict(self.events.limits), "code_storage_bytes": self.code.quota_bytes}

    def cmd_set_limits(self, now: float, events: dict[str, Any], code_storage_bytes: int) -> dict[str, Any]:
        self.events.limits = EventLimits(**events)
        self.code.quota_bytes = code_storage_bytes
        return self.limits()

    def cmd_events_put(self, now: float, **kw: Any) -> dict[str, Any]:
        return self.events.put(now, **kw)

    def cmd_events_put_many(self, now: float, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several accepts in one commit (group commit at the leader); each is idempotent on its event id, and
        each is refused on its own ({"error": ...} in its place), so one tenant at its quota fails no other's."""
        out: list[dict[str, Any]] = []
        for item in items:
            try:
                out.append({"event": self.events.put(now, **item)})
            except FlintError as err:
                out.append({"error": err.to_wire()})
        return out

    def cmd_events_take(self, now: float, **kw: Any) -> list[dict[str, Any]]:
        return self.events.take(now, **kw)

    def cmd_events_settle(self, now: float, **kw: Any) -> list[dict[str, Any]]:
        return self.events.settle(now, **kw)

    def cmd_events_redrive(self, now: float, **kw: Any) -> int:
        return self.events.redrive(now, **kw)

    def cmd_events_expire(self, now: float) -> int:
        return self.events.expire(now)


ControlState.COMMANDS = {
    **RegistryState.COMMANDS,
    "set_limits": ControlState.cmd_set_limits,
    "events_put": ControlState.cmd_events_put,
    "events_put_many": ControlState.cmd_events_put_many,
    "events_take": ControlState.cmd_events_take,
    "events_settle": ControlState.cmd_events_settle,
    "events_redrive": ControlState.cmd_events_redrive,
    "events_expire": ControlState.cmd_events_expire,
}
