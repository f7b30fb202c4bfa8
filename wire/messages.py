"""One small type per operation, and one per reply. The op name's prefix says which service answers it.

Limits are Lambda's where Lambda has one; they live here so every service refuses the same thing the same way.
Each request names its reply type; shapes several replies share (a function's configuration, an event, a node
as placement sees it) are declared once, first.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

from wire.schema import (
    Message,
    any_map,
    blob,
    flag,
    int_map,
    integer,
    message,
    nested,
    nested_list,
    nested_map,
    number,
    raw,
    text,
    text_list,
    text_map,
)

MiB = 1024 * 1024
SYNC_PAYLOAD_MAX_BYTES = 6 * MiB
ASYNC_PAYLOAD_MAX_BYTES = 256 * 1024
ZIP_MAX_BYTES = 50 * MiB
NAME_MAX = 64
HANDLER_MAX = 128
ID_MAX = 64
ENDPOINT_MAX = 255
MEMORY_MB_MIN, MEMORY_MB_MAX = 128, 10240
TIMEOUT_S_MAX = 900
ENV_MAX_BYTES = 4096
RETRIES_MAX = 2  # async: retries after a function error (Lambda: 0 to 2)
EVENT_AGE_S_MIN, EVENT_AGE_S_MAX = 60, 21600  # async: an event older than its maximum age is dead (Lambda's range)
MAX_KEYS = 100_000  # entries in the key map frontends fetch for ZAP


class InvocationType(enum.StrEnum):
    REQUEST_RESPONSE = "RequestResponse"
    EVENT = "Event"
    DRY_RUN = "DryRun"


class Runtime(enum.StrEnum):
    PYTHON3 = "python3"
    PROVIDED = "provided"  # a custom runtime: ./bootstrap in the code package


class Role(enum.StrEnum):
    """What a node does (its config's `roles`)."""

    CONTROL = "control"
    FRONTEND = "frontend"
    MANAGER = "manager"
    WORKER = "worker"


ROLES = tuple(r.value for r in Role)
RAFT_GROUPS = ("control", "counting", "placement")

# Names as Lambda allows them: no '/', '|', ':', NUL or dots can make one name look like another or like a path.
NAME_PATTERN = r"[a-zA-Z0-9_-]{1,64}"
ALIAS_PATTERN = r"(?![0-9]+$)[a-zA-Z0-9_-]{1,128}"
QUALIFIER_PATTERN = r"\$LATEST|[0-9]{1,16}|" + ALIAS_PATTERN
QUALIFIER_MAX = 128


def name_text(**kw) -> Any:
    """A tenant's or a function's name."""
    return text(NAME_MAX, pattern=NAME_PATTERN, pattern_says="1 to 64 letters, digits, '-' or '_'", **kw)


def alias_name(**kw) -> Any:
    return text(QUALIFIER_MAX, pattern=ALIAS_PATTERN,
                pattern_says="1 to 128 letters, digits, '-' or '_', not only digits", **kw)


def qualifier(**kw) -> Any:
    return text(QUALIFIER_MAX, pattern=QUALIFIER_PATTERN,
                pattern_says="$LATEST, a version number, or an alias name", **kw)


class EventState(enum.StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DONE = "done"
    DLQ = "dlq"


class SettleOutcome(enum.StrEnum):
    """How a poller's delivery of an event ended."""

    OK = "ok"
    FUNCTION_ERROR = "function_error"  # uses one of the event's retries
    THROTTLED = "throttled"  # waits and goes again, no retry used
    SYSTEM_ERROR = "system_error"  # the same
    FATAL = "fatal"  # the function or its alias is gone: no retry can help
    EXTEND = "extend"  # still running: keep it hidden from other pollers


class ReleaseOutcome(enum.StrEnum):
    """What a manager hears about a sandbox it handed out."""

    OK = "ok"  # the invoke ended and the sandbox is idle again
    GONE = "gone"  # the sandbox is no more (retired, reaped, its process died)
    NODE_FAILED = "node_failed"  # its host could not be reached mid-invoke
    NOT_SENT = "not_sent"  # its host could not be reached before the invoke was sent: nothing ran


class SandboxState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"


# --- shared shapes -----------------------------------------------------------------------------------------------


@message()
class ConfigChanges(Message):
    """The settings of a function a tenant may change after creating it (each absent one stays)."""

    handler: str | None = text(HANDLER_MAX, default=None)
    runtime: str | None = text(32, choices=Runtime, default=None)
    memory_mb: int | None = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=None)
    timeout_s: float | None = number(0.001, TIMEOUT_S_MAX, default=None)
    environment: dict | None = text_map(256, default=None)
    network: bool | None = flag(default=None)
    maximum_retry_attempts: int | None = integer(0, RETRIES_MAX, default=None)
    maximum_event_age_s: int | None = integer(EVENT_AGE_S_MIN, EVENT_AGE_S_MAX, default=None)


CONFIG_FIELDS = tuple(name for name, _, _ in ConfigChanges._specs)  # every setting a tenant can change


@message()
class FunctionConfig(Message):
    """A function as the registry keeps it ($LATEST, a version, or what an alias resolved to), and what a worker
    needs to build a sandbox."""

    tenant: str = name_text()
    name: str = name_text()
    version: str = text(16, default="$LATEST")
    handler: str = text(HANDLER_MAX)
    runtime: str = text(32, default=Runtime.PYTHON3, choices=Runtime)
    memory_mb: int = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=128)
    timeout_s: float = number(0.001, TIMEOUT_S_MAX, default=3.0)
    environment: dict = text_map(256, default={})
    code_sha256: str = text(64)
    code_size: int = integer(0, ZIP_MAX_BYTES, default=0)
    created_ms: int = integer(0, default=0)
    network: bool = flag(default=False)  # the sandbox gets a network of its own with NAT (worker/network.py)
    maximum_retry_attempts: int = integer(0, RETRIES_MAX, default=RETRIES_MAX)
    maximum_event_age_s: int = integer(EVENT_AGE_S_MIN, EVENT_AGE_S_MAX, default=EVENT_AGE_S_MAX)
    last_modified_ms: int = integer(0, default=0)
    description: str | None = text(256, default=None)  # a published version's
    published_ms: int | None = integer(0, default=None)
    alias: str | None = alias_name(default=None)  # set when an invoke named an alias

    @property
    def function_id(self) -> str:
        """Which function and version this is ("tenant/name/version": names hold no '/'): what routes its invokes
        to one manager."""
        return f"{self.tenant}/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        """The sandbox pool key: sandboxes are shared only by invokes of exactly this code and configuration. A
        change of any setting a sandbox is built with, or a delete and re-create, makes a new key."""
        built_with = (self.handler, str(self.runtime), self.memory_mb, float(self.timeout_s),
                      sorted(self.environment.items()), self.network, self.code_sha256, self.created_ms)
        digest = hashlib.blake2b(repr(built_with).encode(), digest_size=8).hexdigest()
        return f"{self.tenant}/{self.name}/{self.version}/{digest}"


SANDBOX_FIELDS = ("handler", "runtime", "memory_mb", "timeout_s", "environment", "network", "code_sha256",
                  "created_ms")  # what a sandbox is built with (FunctionConfig.key): a change of any makes new sandboxes


@message()
class Empty(Message):
    """The reply of a request that has nothing to say beyond having been done."""


@message()
class FunctionReply(Message):
    config: FunctionConfig = nested(FunctionConfig)
    reserved_concurrency: int | None = integer(0, default=None)  # shown by get_function


@message()
class FunctionList(Message):
    functions: tuple = nested_list(FunctionConfig)


@message()
class Choice(Message):
    """One configuration name[:qualifier] may run, and the share of invokes it gets (an alias's canary)."""

    weight: float = number(0, 1)
    config: FunctionConfig = nested(FunctionConfig)


@message()
class Choices(Message):
    choices: tuple = nested_list(Choice, 2)


@message()
class AliasView(Message):
    name: str = alias_name()
    version: str = text(16)
    additional_version: str | None = text(16, default=None)
    weight: float = number(0, 1, default=0.0)


@message()
class AliasReply(Message):
    alias: AliasView = nested(AliasView)


@message()
class AliasList(Message):
    aliases: tuple = nested_list(AliasView)


@message()
class TenantView(Message):
    tenant: str = name_text()
    keys: tuple = text_list(1024)
    revoked: int = integer(0)
    created_ms: int = integer(0)
    network: bool = flag(default=False)  # its functions may have network access (the operator's decision)


@message()
class TenantReply(Message):
    tenant: TenantView = nested(TenantView)


@message()
class Tenants(Message):
    tenants: tuple = nested_list(TenantView)


@message()
class PoolView(Message):
    capacity: int = integer(0)
    held: int = integer(0)
    in_use: int = integer(0)
    leases: int = integer(0)


@message()
class TenantConcurrency(Message):
    """A tenant's limits as the counting ledger sees them, per pool ("(unreserved)" or a function's name)."""

    limit: int = integer(0)
    unreserved_min: int = integer(0)
    reserved: dict = int_map()
    pools: dict = nested_map(PoolView)


@message()
class EventView(Message):
    event_id: str = text(ID_MAX + 3)
    tenant: str = name_text()
    function: str = name_text()
    qualifier: str | None = qualifier(default=None)
    accepted_at: float = number()
    max_retries: int = integer(0, RETRIES_MAX)
    max_age_s: float = number(0)
    state: str = text(16, choices=EventState)
    visible_at: float = number(default=0.0)
    owner: str = text(ID_MAX, default="")
    attempts: int = integer(0, default=0)  # function errors so far
    deliveries: int = integer(0, default=0)  # times a poller took it
    last_error: dict | None = any_map(default=None)
    settled_at: float | None = number(default=None)
    payload_bytes: int = integer(0, default=0)  # as accepted (a done event's payload itself is gone)
    payload: bytes | None = blob(ASYNC_PAYLOAD_MAX_BYTES, default=None)  # only when a poller takes it


@message()
class EventReply(Message):
    event: EventView | None = nested(EventView, default=None)


@message()
class EventCounts(Message):
    queued: int = integer(0, default=0)
    inflight: int = integer(0, default=0)
    done: int = integer(0, default=0)
    dlq: int = integer(0, default=0)
    queued_bytes: int = integer(0, default=0)  # what the queued and in-flight ones take of the tenant's quota
    dlq_bytes: int = integer(0, default=0)  # what the dead letters take of theirs
    dlq_dropped: int = integer(0, default=0)  # dead letters pushed out by newer ones past the quota


@message()
class EventList(Message):
    events: tuple = nested_list(EventView)
    counts: EventCounts = nested(EventCounts)


@message()
class Redriven(Message):
    redriven: int = integer(0)


@message()
class RaftStatus(Message):
    group: str = text(16)
    address: str = text(ENDPOINT_MAX)  # this replica's Raft address
    state: str = text(16)
    leader: str | None = text(ENDPOINT_MAX, default=None)
    term: int | None = integer(0, default=None)
    commit_idx: int | None = integer(0, default=None)
    ready: bool = flag(default=False)
    applied: int = integer(0, default=0)


@message()
class NodeInfo(Message):
    node_id: str = text(NAME_MAX)
    az: str = text(NAME_MAX)
    address: str = text(ENDPOINT_MAX)
    roles: tuple = text_list(len(ROLES))
    ports: dict = int_map(64)
    memory_mb: int = integer(0, default=0)
    cores: int = integer(0, default=0)
    isolation: str = text(256, default="process")


@message()
class NodeView(NodeInfo):
    """A node as placement sees it: what it announced, and its health."""

    alive: bool = flag(default=False)
    healthy: bool = flag(default=False)
    suspect: bool = flag(default=False)
    draining: bool = flag(default=False)
    held_down_s: float = number(0, default=0.0)
    leasable: bool = flag(default=False)
    last_heartbeat_age_s: float = number(0, default=0.0)
    placement_stalled_s: float = number(0, default=0.0)
    sandboxes: int = integer(0, default=0)
    memory_used_mb: int = integer(0, default=0)
    capacity_mb: int = integer(0, default=0)
    leased_mb: int = integer(0, default=0)
    incarnation: int = integer(0, default=0)


@message()
class Headroom(Message):
    """Whether a worker lease request can still be answered at once in every AZ (placement.state.headroom)."""

    free_mb: int = integer(0, default=0)
    reserve_mb: int = integer(0, default=0)
    short_azs: tuple = text_list(64, default=())


@message()
class WorkerLeaseView(Message):
    lease_id: str = text(ID_MAX)
    node_id: str = text(NAME_MAX)
    manager: str = text(ENDPOINT_MAX)  # the manager endpoint holding it
    memory_mb: int = integer(0)
    granted_at: float = number()
    expires_at: float = number()
    node: NodeView | None = nested(NodeView, default=None)  # the host, as placement sees it now


# --- frontend (tenant-facing) ------------------------------------------------------------------------------------


@message()
class InvokeResult(Message):
    status_code: int = integer(100, 599)
    request_id: str = text(ID_MAX + 3)
    executed_version: str | None = text(16, default=None)
    function_error: str | None = text(32, default=None)  # "Unhandled" when the function failed, as in Lambda
    log_tail: str | None = text(8192, default=None)
    cold_start: bool = flag(default=False)
    payload: bytes | None = raw(SYNC_PAYLOAD_MAX_BYTES, default=None)


@message("invoke", reply=InvokeResult)
class Invoke(Message):
    function: str = name_text()
    qualifier: str | None = qualifier(default=None)
    invocation_type: str = text(32, default=InvocationType.REQUEST_RESPONSE, choices=InvocationType)
    log_tail: bool = flag(default=False)
    payload: bytes | None = raw(SYNC_PAYLOAD_MAX_BYTES, default=None)


@message("create_function", reply=FunctionReply)
class CreateFunction(Message):
    name: str = name_text()
    handler: str = text(HANDLER_MAX)
    runtime: str = text(32, default=Runtime.PYTHON3, choices=Runtime)
    memory_mb: int = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=128)
    timeout_s: float = number(0.001, TIMEOUT_S_MAX, default=3.0)
    environment: dict = text_map(256, default={})
    network: bool = flag(default=False)
    code: bytes | None = raw(ZIP_MAX_BYTES, default=None)


@message("get_function", reply=FunctionReply)
class GetFunction(Message):
    name: str = name_text()
    qualifier: str | None = qualifier(default=None)


@message("update_function_code", reply=FunctionReply)
class UpdateFunctionCode(Message):
    name: str = name_text()
    code: bytes | None = raw(ZIP_MAX_BYTES, default=None)


@message("update_function_configuration", reply=FunctionReply)
class UpdateFunctionConfiguration(ConfigChanges):
    name: str = name_text()


@message("publish_version", reply=FunctionReply)
class PublishVersion(Message):
    name: str = name_text()
    description: str = text(256, default="")


@message("list_versions", reply=FunctionList)
class ListVersions(Message):
    name: str = name_text()


@message("put_alias", reply=AliasReply)
class PutAlias(Message):
    name: str = name_text()
    alias: str = alias_name()
    version: str = text(16)
    additional_version: str | None = text(16, default=None)
    weight: float = number(0, 1, default=0.0)
    create: bool = flag(default=True)


@message("delete_alias", reply=Empty)
class DeleteAlias(Message):
    name: str = name_text()
    alias: str = alias_name()


@message("list_aliases", reply=AliasList)
class ListAliases(Message):
    name: str = name_text()


@message("list_events", reply=EventList)
class ListEvents(Message):
    state: str | None = text(16, choices=EventState, default=None)
    limit: int = integer(1, 10_000, default=100)


@message("get_event", reply=EventReply)
class GetEvent(Message):
    event_id: str = text(ID_MAX + 3)


@message("redrive_events", reply=Redriven)
class RedriveEvents(Message):
    event_ids: tuple | None = text_list(10_000, default=None)  # absent: every dead-lettered event


@message("list_functions", reply=FunctionList)
class ListFunctions(Message):
    pass


@message("delete_function", reply=Empty)
class DeleteFunction(Message):
    name: str = name_text()


@message()
class Concurrency(Message):
    reserved_concurrency: int | None = integer(0, default=None)
    tenant_limit: int | None = integer(0, default=None)
    unreserved_min: int | None = integer(0, default=None)


@message("put_function_concurrency", reply=Concurrency)
class PutFunctionConcurrency(Message):
    name: str = name_text()
    reserved: int = integer(0, 1_000_000)


@message("delete_function_concurrency", reply=Empty)
class DeleteFunctionConcurrency(Message):
    name: str = name_text()


@message("get_function_concurrency", reply=Concurrency)
class GetFunctionConcurrency(Message):
    name: str = name_text()


# --- operator (through the frontend, with an operator key) -------------------------------------------------------


@message("tenant.create", reply=TenantReply)
class TenantCreate(Message):
    tenant: str = name_text()
    public_key: str = text(40)


@message("tenant.add_key", reply=TenantReply)
class TenantAddKey(Message):
    tenant: str = name_text()
    public_key: str = text(40)


@message("tenant.revoke_key", reply=TenantReply)
class TenantRevokeKey(Message):
    tenant: str = name_text()
    public_key: str = text(40)


@message("tenant.network", reply=TenantReply)
class TenantNetwork(Message):
    """Whether a tenant's functions may have network access; taking it away turns it off in all of them."""

    tenant: str = name_text()
    allowed: bool = flag()


@message("tenant.list", reply=Tenants)
class TenantList(Message):
    pass


@message()
class TenantLimitView(Message):
    view: TenantConcurrency = nested(TenantConcurrency)


@message("tenant.limit", reply=TenantLimitView)
class TenantLimit(Message):
    tenant: str = name_text()
    limit: int | None = integer(0, 1_000_000, default=None)  # absent: just show it


# --- registry: functions ---------------------------------------------------------------------------------------


@message("registry.create_function", reply=FunctionReply)
class RegistryCreateFunction(Message):
    config: FunctionConfig = nested(FunctionConfig)


@message("registry.get_function", reply=FunctionReply)
class RegistryGetFunction(Message):
    tenant: str = name_text()
    name: str = name_text()


@message("registry.list_functions", reply=FunctionList)
class RegistryListFunctions(Message):
    tenant: str | None = name_text(default=None)


# A registry request that a tenant's request becomes is that request plus the tenant it is for (the frontend
# knows the tenant from the caller's key, never from the request).


@message("registry.delete_function", reply=Empty)
class RegistryDeleteFunction(DeleteFunction):
    tenant: str = name_text()


@message("registry.update_code", reply=FunctionReply)
class RegistryUpdateCode(Message):
    tenant: str = name_text()
    name: str = name_text()
    code_sha256: str = text(64)
    code_size: int = integer(0, ZIP_MAX_BYTES)


@message("registry.update_config", reply=FunctionReply)
class RegistryUpdateConfig(Message):
    tenant: str = name_text()
    name: str = name_text()
    changes: ConfigChanges = nested(ConfigChanges)


@message("registry.publish_version", reply=FunctionReply)
class RegistryPublishVersion(PublishVersion):
    tenant: str = name_text()


@message("registry.put_alias", reply=AliasReply)
class RegistryPutAlias(PutAlias):
    tenant: str = name_text()


@message("registry.delete_alias", reply=Empty)
class RegistryDeleteAlias(DeleteAlias):
    tenant: str = name_text()


@message("registry.resolve", reply=Choices)
class RegistryResolve(GetFunction):
    """What name[:qualifier] runs: one config, or an alias's one or two with their weights."""

    tenant: str = name_text()


@message("registry.list_versions", reply=FunctionList)
class RegistryListVersions(ListVersions):
    tenant: str = name_text()


@message("registry.list_aliases", reply=AliasList)
class RegistryListAliases(ListAliases):
    tenant: str = name_text()


# --- registry: tenants, keys and code ----------------------------------------------------------------------------


@message("registry.create_tenant", reply=TenantReply)
class RegistryCreateTenant(Message):
    tenant: str = name_text()
    public_keys: tuple = text_list(16)


@message("registry.add_key", reply=TenantReply)
class RegistryAddKey(TenantAddKey):
    pass


@message("registry.revoke_key", reply=TenantReply)
class RegistryRevokeKey(TenantRevokeKey):
    pass


@message()
class Operators(Message):
    operators: tuple = text_list(1024)


@message("registry.set_tenant_network", reply=TenantReply)
class RegistrySetTenantNetwork(TenantNetwork):
    pass


@message("registry.add_operator", reply=Operators)
class RegistryAddOperator(Message):
    public_key: str = text(40)


@message("registry.list_tenants", reply=Tenants)
class RegistryListTenants(Message):
    pass


@message()
class Principals(Message):
    principals: dict = text_map(MAX_KEYS)  # public key -> "tenant:NAME" or "operator"


@message("registry.principals", reply=Principals)
class RegistryPrincipals(Message):
    pass


@message()
class BlobStored(Message):
    copies: int = integer(0)


@message("registry.put_blob", reply=BlobStored)
class PutBlob(Message):
    sha256: str = text(64)
    replicate: bool = flag(default=True)
    data: bytes | None = raw(ZIP_MAX_BYTES, default=None)


@message()
class Blob(Message):
    size: int = integer(0)
    data: bytes | None = raw(ZIP_MAX_BYTES, default=None)


@message("registry.get_blob", reply=Blob)
class GetBlob(Message):
    sha256: str = text(64)
    local_only: bool = flag(default=False)  # set by a control node asking a peer, so no request goes round


@message("registry.check_code", reply=Empty)
class RegistryCheckCode(Message):
    """Would the registry take this package for a create (or a code update) of `name`? Asked before uploading it,
    so a package past the tenant's code storage quota is never stored."""

    tenant: str = name_text()
    name: str = name_text()
    code_sha256: str = text(64)
    code_size: int = integer(0, ZIP_MAX_BYTES)
    create: bool = flag(default=True)


# --- registry: the async event queue -----------------------------------------------------------------------------


@message("registry.put_event", reply=EventReply)
class EventsPut(Message):
    event_id: str = text(ID_MAX + 3)
    tenant: str = name_text()
    function: str = name_text()
    qualifier: str | None = qualifier(default=None)
    max_retries: int = integer(0, RETRIES_MAX, default=RETRIES_MAX)
    max_age_s: float = number(EVENT_AGE_S_MIN, EVENT_AGE_S_MAX, default=EVENT_AGE_S_MAX)
    payload: bytes | None = raw(ASYNC_PAYLOAD_MAX_BYTES, default=None)


@message()
class TakenEvents(Message):
    events: tuple = nested_list(EventView, 10_000)


@message("registry.take_events", reply=TakenEvents)
class EventsTake(Message):
    poller: str = text(ID_MAX)
    limit: int = integer(1, 10_000)
    visibility_s: float = number(0.01, 12 * 3600)


@message()
class Settlement(Message):
    event_id: str = text(ID_MAX + 3)
    outcome: str = text(16, choices=SettleOutcome)
    error: dict | None = any_map(default=None)
    visibility_s: float | None = number(0.01, 12 * 3600, default=None)  # with EXTEND


@message()
class Settled(Message):
    event_id: str = text(ID_MAX + 3)
    state: str = text(16, choices=EventState)


@message()
class SettledEvents(Message):
    results: tuple = nested_list(Settled, 10_000)


@message("registry.settle_events", reply=SettledEvents)
class EventsSettle(Message):
    poller: str = text(ID_MAX)
    outcomes: tuple = nested_list(Settlement, 10_000)


@message("registry.redrive_events", reply=Redriven)
class EventsRedrive(RedriveEvents):
    tenant: str = name_text()


@message()
class Visible(Message):
    visible: bool = flag()


@message("registry.events_visible", reply=Visible)
class EventsVisible(Message):
    """Whether a take could find anything now (read on the local replica, before committing a take)."""


@message("registry.list_events", reply=EventList)
class EventsList(ListEvents):
    tenant: str = name_text()


@message("registry.get_event", reply=EventReply)
class EventsGet(GetEvent):
    tenant: str = name_text()


# --- counting ----------------------------------------------------------------------------------------------------


@message()
class CreditGrant(Message):
    """The ledger's answer to a credit lease request (counting.state.Ledger.cmd_lease)."""

    lease_id: str = text(ID_MAX)
    renewed: bool = flag()
    pool: str = text(NAME_MAX)
    credits: int = integer(0)
    expires_at: float = number()
    capacity: int = integer(0, default=0)
    reclaimable: int = integer(0, default=0)  # idle credits elsewhere that the ledger asked back
    target: int | None = integer(0, default=None)  # the holder is asked to come down to this
    reason: str | None = text(32, default=None)  # why a lease was not renewed: expired, pool_changed


@message("counting.lease", reply=CreditGrant)
class LeaseCredits(Message):
    """Take or renew a credit lease for the pool `function` draws from."""

    lease_id: str = text(ID_MAX)
    holder: str = text(NAME_MAX)
    endpoint: str = text(ENDPOINT_MAX)
    tenant: str = name_text()
    function: str = name_text()
    want: int = integer(0, 1_000_000)
    in_use: int = integer(0, 1_000_000)
    max_timeout_s: float = number(0, TIMEOUT_S_MAX)
    duration_s: float = number(0.05, 60)


@message()
class Released(Message):
    released: bool = flag()


@message("counting.release_lease", reply=Released)
class ReleaseCreditLease(Message):
    lease_id: str = text(ID_MAX)
    in_use: int = integer(0, 1_000_000, default=0)


@message()
class ReservedSet(Message):
    reserved: int | None = integer(0, default=None)


@message("counting.set_reserved", reply=ReservedSet)
class SetReserved(Message):
    tenant: str = name_text()
    function: str = name_text()
    reserved: int | None = integer(0, 1_000_000, default=None)  # absent: remove the reservation


@message("counting.revise", reply=Empty)
class Revise(Message):
    """Counting -> a frontend holding credit leases: the tenant's limits changed or idle credits are wanted back."""

    tenant: str = name_text()


@message()
class LimitSet(Message):
    limit: int = integer(0)


@message("counting.set_limit", reply=LimitSet)
class SetLimit(Message):
    tenant: str = name_text()
    limit: int = integer(0, 1_000_000)


@message()
class Member(Message):
    address: str = text(ENDPOINT_MAX)
    connected: bool = flag()
    leader: bool = flag()


@message()
class Members(Message):
    members: tuple = nested_list(Member, 64)
    address: str | None = text(ENDPOINT_MAX, default=None)  # the answering replica's own Raft address


@message("counting.members", reply=Members)
class CountingMembers(Message):
    pass


@message("counting.change_members", reply=Members)
class ChangeMembers(Message):
    """Add or remove one counting replica (its Raft address, host:port) at run time."""

    action: str = text(8, choices=("add", "remove"))
    address: str = text(ENDPOINT_MAX)


@message()
class CreditLeaseView(Message):
    lease_id: str = text(ID_MAX)
    holder: str = text(NAME_MAX)
    tenant: str = name_text()
    pool: str = text(NAME_MAX + 16)
    credits: int = integer(0)
    in_use: int = integer(0)
    demand: int = integer(0)
    target: int | None = integer(0, default=None)
    expires_in_s: float = number()
    free_in_s: float = number()


@message()
class CountingStatusReply(Message):
    tenants: dict = nested_map(TenantConcurrency)
    lease_details: tuple = nested_list(CreditLeaseView)
    leases: int = integer(0)
    digest: str = text(64)
    raft: RaftStatus = nested(RaftStatus)


@message("counting.status", reply=CountingStatusReply)
class CountingStatus(Message):
    tenant: str | None = name_text(default=None)


# --- placement ---------------------------------------------------------------------------------------------------


@message()
class Incarnation(Message):
    incarnation: int = integer(0)


@message("placement.register", reply=Incarnation)
class Register(Message):
    node: NodeInfo = nested(NodeInfo)


@message("placement.heartbeat", reply=Incarnation)
class Heartbeat(Message):
    node_id: str = text(NAME_MAX)
    sandboxes: int = integer(0, default=0)
    memory_used_mb: int = integer(0, default=0)


@message()
class Nodes(Message):
    nodes: tuple = nested_list(NodeView, 100_000)
    free_capacity_mb: int = integer(0, default=0)
    headroom: Headroom = nested(Headroom, default=Headroom())
    raft: RaftStatus | None = nested(RaftStatus, default=None)


@message("placement.list_nodes", reply=Nodes)
class ListNodes(Message):
    pass


@message()
class WorkerLeaseGrant(Message):
    lease: WorkerLeaseView = nested(WorkerLeaseView)
    node: NodeView = nested(NodeView)


@message("placement.lease_worker", reply=WorkerLeaseGrant)
class LeaseWorker(Message):
    """A manager asks for `memory_mb` of worker capacity; placement picks the host (packing policy)."""

    lease_id: str = text(ID_MAX)
    manager: str = text(ENDPOINT_MAX)
    memory_mb: int = integer(MEMORY_MB_MIN, 1_000_000)
    prefer_azs: tuple = text_list(16, default=())
    avoid_nodes: tuple = text_list(64, default=())
    lease_s: float = number(1, 7 * 24 * 3600)


@message()
class Returned(Message):
    returned: bool = flag()


@message("placement.return_lease", reply=Returned)
class ReturnWorkerLease(Message):
    lease_id: str = text(ID_MAX)


@message()
class WorkerLeases(Message):
    leases: tuple = nested_list(WorkerLeaseView, 100_000)
    headroom: Headroom = nested(Headroom, default=Headroom())


@message("placement.list_leases", reply=WorkerLeases)
class ListWorkerLeases(Message):
    manager: str | None = text(ENDPOINT_MAX, default=None)


@message()
class Suspect(Message):
    suspect: bool = flag()


@message("placement.report", reply=Suspect)
class ReportOutcome(Message):
    """A manager's word on invokes it ran on a node: False for a system error (not a function error)."""

    node_id: str = text(NAME_MAX)
    ok: bool = flag()
    incarnation: int | None = integer(0, default=None)  # which run of the node the report is about


@message()
class Draining(Message):
    node_id: str = text(NAME_MAX)
    draining: bool = flag()
    leases: tuple = text_list(100_000, default=())


@message("placement.drain", reply=Draining)
class Drain(Message):
    node_id: str = text(NAME_MAX)
    draining: bool = flag(default=True)


# --- worker manager ----------------------------------------------------------------------------------------------


@message()
class Reservation(Message):
    sandbox_id: str = text(ID_MAX)
    node_id: str = text(NAME_MAX)
    endpoint: str = text(ENDPOINT_MAX)  # the worker to run the invoke on
    cold: bool = flag(default=False)
    init_ms: float = number(0, default=0.0)


@message("manager.reserve", reply=Reservation)
class Reserve(Message):
    config: FunctionConfig = nested(FunctionConfig)
    request_id: str = text(ID_MAX)
    avoid_nodes: tuple = text_list(64, default=())
    # which handling of a sync invoke this is (one per frontend handling of one client request): a second,
    # different handling of the same request id is refused, so a client's retry never runs it twice
    attempt: str | None = text(ID_MAX, default=None)


@message("manager.release", reply=Released)
class ManagerRelease(Message):
    function_key: str = text(512)
    sandbox_id: str = text(ID_MAX)
    request_id: str = text(ID_MAX)
    outcome: str = text(16, default=ReleaseOutcome.OK, choices=ReleaseOutcome)


@message()
class Retired(Message):
    retired: int = integer(0)  # idle sandboxes destroyed now (busy ones go when their invoke ends)


@message("manager.retire_function", reply=Retired)
class RetireFunction(Message):
    """A function was deleted: its sandboxes must serve nothing more."""

    tenant: str = name_text()
    name: str = name_text()


@message()
class ManagerSummary(Message):
    sandboxes: int = integer(0)
    busy: int = integer(0)
    idle: int = integer(0)
    functions: int = integer(0)
    leases: int = integer(0)
    leased_mb: int = integer(0)
    used_mb: int = integer(0)
    unhealthy_nodes: tuple = text_list(100_000, default=())


@message("manager.status", reply=ManagerSummary)
class ManagerStatus(Message):
    pass


# --- worker ------------------------------------------------------------------------------------------------------


@message()
class SandboxCreated(Message):
    init_ms: float = number(0)
    isolation: str = text(256)


@message("worker.create_sandbox", reply=SandboxCreated)
class CreateSandbox(Message):
    sandbox_id: str = text(ID_MAX)
    config: FunctionConfig = nested(FunctionConfig)
    manager: str = text(ENDPOINT_MAX)


@message()
class RunResult(Message):
    executed_version: str = text(16)
    sandbox_alive: bool = flag(default=True)  # False: the sandbox was retired (crashed, timed out, out of memory)
    function_error: str | None = text(32, default=None)
    log_tail: str | None = text(8192, default=None)
    payload: bytes | None = raw(SYNC_PAYLOAD_MAX_BYTES, default=None)


@message("worker.run", reply=RunResult)
class Run(Message):
    sandbox_id: str = text(ID_MAX)
    request_id: str = text(ID_MAX)
    function_key: str = text(512)
    log_tail: bool = flag(default=False)
    not_after_ms: int | None = integer(0, default=None)  # the execution must have ended by then (admission bound)
    payload: bytes | None = raw(SYNC_PAYLOAD_MAX_BYTES, default=None)


@message()
class Destroyed(Message):
    destroyed: bool = flag()


@message("worker.destroy_sandbox", reply=Destroyed)
class DestroySandbox(Message):
    sandbox_id: str = text(ID_MAX)


@message()
class SandboxView(Message):
    sandbox_id: str = text(ID_MAX)
    function_key: str = text(512)
    state: str = text(16, choices=SandboxState)
    manager: str = text(ENDPOINT_MAX)
    invocations: int = integer(0)
    memory_mb: int = integer(0, default=128)


@message()
class Sandboxes(Message):
    sandboxes: tuple = nested_list(SandboxView, 100_000)
    node_id: str = text(NAME_MAX)


@message("worker.list_sandboxes", reply=Sandboxes)
class ListSandboxes(Message):
    pass


# --- node --------------------------------------------------------------------------------------------------------


@message()
class RoleState(Message):
    state: str = text(16)
    restarts: int = integer(0)


@message()
class NodeStatusReply(Message):
    node_id: str = text(NAME_MAX)
    az: str = text(NAME_MAX)
    address: str = text(ENDPOINT_MAX)
    roles: tuple = text_list(len(ROLES))
    pid: int = integer(0)
    uptime_s: float = number(0)
    role_states: dict = nested_map(RoleState, 64)
    raft: dict = nested_map(RaftStatus, 8)
    isolation: str | None = text(256, default=None)
    isolation_details: dict | None = any_map(default=None)
    sandboxes: int = integer(0, default=0)
    can_persist: bool = flag(default=True)  # its data dir takes writes, with free space and inodes over the margins
    persist_problem: str | None = text(1024, default=None)  # why not


@message("node.status", reply=NodeStatusReply)
class NodeStatus(Message):
    pass


@message()
class FaultInjected(Message):
    role: str = text(32)
    fault: str = text(32)
    in_s: float = number(0)


@message("node.inject_fault", reply=FaultInjected)
class InjectFault(Message):
    """Operator fault injection on a local region: make one role crash, to see the supervisor act."""

    role: str = text(32, choices=ROLES)
    fault: str = text(32, choices=("crash",))


@message()
class RaftJoined(Message):
    address: str = text(ENDPOINT_MAX)


@message("node.raft_join", reply=RaftJoined)
class RaftJoin(Message):
    """Start a replica of `group` on this node, joining the members in `peers` (host:port each)."""

    group: str = text(16, choices=RAFT_GROUPS)
    peers: tuple = text_list(16)


@message()
class RaftLeft(Message):
    left: bool = flag()


@message("node.raft_leave", reply=RaftLeft)
class RaftLeave(Message):
    """Stop this node's replica of `group` (after it was removed from the group) and delete its journal."""

    group: str = text(16, choices=RAFT_GROUPS)


__all__ = [name for name, obj in dict(globals()).items() if isinstance(obj, type) and issubclass(obj, Message)]
