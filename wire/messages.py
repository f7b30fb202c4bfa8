"""One small type per operation. The op name's prefix says which service answers it.

Limits are Lambda's where Lambda has one; they live here so every service refuses the same thing the same way.
"""

from __future__ import annotations

from wire.schema import (
    Message,
    any_map,
    flag,
    integer,
    message,
    nested,
    number,
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
MEMORY_MB_MIN, MEMORY_MB_MAX = 128, 10240
TIMEOUT_S_MAX = 900
ENV_MAX_BYTES = 4096
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
RUNTIMES = ("python3", "provided")  # provided: a custom runtime, ./bootstrap in the code package
ROLES = ("control", "frontend", "manager", "worker")


# --- shared shapes -----------------------------------------------------------------------------------------------


@message()
class FunctionConfig(Message):
    """What a worker needs to build a sandbox, and what the registry stores."""

    tenant: str = text(NAME_MAX)
    name: str = text(NAME_MAX)
    version: str = text(16, default="$LATEST")
    handler: str = text(HANDLER_MAX)
    runtime: str = text(32, default="python3", choices=RUNTIMES)
    memory_mb: int = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=128)
    timeout_s: float = number(0.001, TIMEOUT_S_MAX, default=3.0)
    environment: dict = text_map(256, default={})
    code_sha256: str = text(64)
    code_size: int = integer(0, ZIP_MAX_BYTES, default=0)
    created_ms: int = integer(0, default=0)
    network: bool = flag(default=False)  # the sandbox gets the host's network instead of none
    maximum_retry_attempts: int = integer(0, 2, default=2)  # async: retries after a function error
    maximum_event_age_s: int = integer(60, 21600, default=21600)  # async: an event older than this is dead

    @property
    def key(self) -> str:
        """The sandbox pool key: sandboxes are shared only by invokes of exactly this code and configuration."""
        return f"{self.tenant}/{self.name}/{self.version}/{self.code_sha256[:16]}"


@message()
class NodeInfo(Message):
    node_id: str = text(NAME_MAX)
    az: str = text(NAME_MAX)
    address: str = text(255)
    roles: tuple = text_list(len(ROLES))
    ports: dict = any_map()
    memory_mb: int = integer(0, default=0)
    cores: int = integer(0, default=0)
    isolation: str = text(256, default="process")


# --- frontend (tenant-facing) ------------------------------------------------------------------------------------


@message("invoke", max_payload_bytes=SYNC_PAYLOAD_MAX_BYTES)
class Invoke(Message):
    function: str = text(NAME_MAX)
    qualifier: str | None = text(NAME_MAX, default=None)
    invocation_type: str = text(32, default="RequestResponse", choices=INVOCATION_TYPES)
    log_tail: bool = flag(default=False)


@message("create_function", max_payload_bytes=ZIP_MAX_BYTES)
class CreateFunction(Message):
    name: str = text(NAME_MAX)
    handler: str = text(HANDLER_MAX)
    runtime: str = text(32, default="python3", choices=RUNTIMES)
    memory_mb: int = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=128)
    timeout_s: float = number(0.001, TIMEOUT_S_MAX, default=3.0)
    environment: dict = text_map(256, default={})
    network: bool = flag(default=False)


@message("get_function")
class GetFunction(Message):
    name: str = text(NAME_MAX)
    qualifier: str | None = text(NAME_MAX, default=None)


@message("update_function_code", max_payload_bytes=ZIP_MAX_BYTES)
class UpdateFunctionCode(Message):
    name: str = text(NAME_MAX)


@message("update_function_configuration")
class UpdateFunctionConfiguration(Message):
    name: str = text(NAME_MAX)
    handler: str | None = text(HANDLER_MAX, default=None)
    runtime: str | None = text(32, choices=RUNTIMES, default=None)
    memory_mb: int | None = integer(MEMORY_MB_MIN, MEMORY_MB_MAX, default=None)
    timeout_s: float | None = number(0.001, TIMEOUT_S_MAX, default=None)
    environment: dict | None = text_map(256, default=None)
    network: bool | None = flag(default=None)
    maximum_retry_attempts: int | None = integer(0, 2, default=None)
    maximum_event_age_s: int | None = integer(60, 21600, default=None)


@message("publish_version")
class PublishVersion(Message):
    name: str = text(NAME_MAX)
    description: str = text(256, default="")


@message("list_versions")
class ListVersions(Message):
    name: str = text(NAME_MAX)


@message("put_alias")
class PutAlias(Message):
    name: str = text(NAME_MAX)
    alias: str = text(NAME_MAX)
    version: str = text(16)
    additional_version: str | None = text(16, default=None)
    weight: float = number(0, 1, default=0.0)
    create: bool = flag(default=True)


@message("delete_alias")
class DeleteAlias(Message):
    name: str = text(NAME_MAX)
    alias: str = text(NAME_MAX)


@message("list_aliases")
class ListAliases(Message):
    name: str = text(NAME_MAX)


@message("list_events")
class ListEvents(Message):
    state: str | None = text(16, choices=("queued", "inflight", "done", "dlq"), default=None)
    limit: int = integer(1, 10_000, default=100)


@message("get_event")
class GetEvent(Message):
    event_id: str = text(ID_MAX)


@message("redrive_events")
class RedriveEvents(Message):
    event_ids: tuple | None = text_list(10_000, default=None)  # absent: every dead-lettered event


# --- operator (through the frontend, with an operator key) -------------------------------------------------------


@message("tenant.create")
class TenantCreate(Message):
    tenant: str = text(NAME_MAX)
    public_key: str = text(40)


@message("tenant.add_key")
class TenantAddKey(Message):
    tenant: str = text(NAME_MAX)
    public_key: str = text(40)


@message("tenant.revoke_key")
class TenantRevokeKey(Message):
    tenant: str = text(NAME_MAX)
    public_key: str = text(40)


@message("tenant.list")
class TenantList(Message):
    pass


@message("tenant.limit")
class TenantLimit(Message):
    tenant: str = text(NAME_MAX)
    limit: int | None = integer(0, 1_000_000, default=None)  # absent: just show it


@message("list_functions")
class ListFunctions(Message):
    pass


@message("delete_function")
class DeleteFunction(Message):
    name: str = text(NAME_MAX)


@message("put_function_concurrency")
class PutFunctionConcurrency(Message):
    name: str = text(NAME_MAX)
    reserved: int = integer(0, 1_000_000)


@message("delete_function_concurrency")
class DeleteFunctionConcurrency(Message):
    name: str = text(NAME_MAX)


@message("get_function_concurrency")
class GetFunctionConcurrency(Message):
    name: str = text(NAME_MAX)


# --- registry ----------------------------------------------------------------------------------------------------


@message("registry.create_function")
class RegistryCreateFunction(Message):
    config: FunctionConfig = nested(FunctionConfig)


@message("registry.get_function")
class RegistryGetFunction(Message):
    tenant: str = text(NAME_MAX)
    name: str = text(NAME_MAX)


@message("registry.list_functions")
class RegistryListFunctions(Message):
    tenant: str | None = text(NAME_MAX, default=None)


@message("registry.delete_function")
class RegistryDeleteFunction(Message):
    tenant: str = text(NAME_MAX)
    name: str = text(NAME_MAX)


@message("registry.update")
class RegistryUpdate(Message):
    """A replicated change to a function or tenant: `command` names it, `args` are its arguments."""

    command: str = text(32, choices=("update_code", "update_config", "publish_version", "put_alias", "delete_alias",
                                "add_key", "revoke_key", "add_operator"))
    args: dict = any_map()


@message("registry.describe")
class RegistryDescribe(Message):
    """What name[:qualifier] runs: a config, or an alias's configs with their weights; versions and aliases."""

    tenant: str = text(NAME_MAX)
    name: str = text(NAME_MAX)
    qualifier: str | None = text(NAME_MAX, default=None)
    what: str = text(16, choices=("resolve", "versions", "aliases"), default="resolve")


@message("registry.principals")
class RegistryPrincipals(Message):
    pass


@message("registry.events", max_payload_bytes=ASYNC_PAYLOAD_MAX_BYTES)
class RegistryEvents(Message):
    """The async queue: put (the payload rides as the raw frame), take, settle, redrive - and reads."""

    action: str = text(16, choices=("put", "take", "settle", "redrive", "visible", "list", "get", "counts"))
    args: dict = any_map()


@message("registry.put_blob", max_payload_bytes=ZIP_MAX_BYTES)
class PutBlob(Message):
    sha256: str = text(64)
    replicate: bool = flag(default=True)


@message("registry.get_blob")
class GetBlob(Message):
    sha256: str = text(64)
    local_only: bool = flag(default=False)  # set by a control node asking a peer, so no request goes round


@message("registry.create_tenant")
class CreateTenant(Message):
    tenant: str = text(NAME_MAX)
    public_keys: tuple = text_list(16)


@message("registry.list_tenants")
class ListTenants(Message):
    pass


# --- counting ----------------------------------------------------------------------------------------------------


@message("counting.lease")
class LeaseCredits(Message):
    """Take or renew a lease on credits for the pool `function` draws from."""

    lease_id: str = text(ID_MAX)
    holder: str = text(NAME_MAX)
    endpoint: str = text(255)
    tenant: str = text(NAME_MAX)
    function: str = text(NAME_MAX)
    want: int = integer(0, 1_000_000)
    in_use: int = integer(0, 1_000_000)
    max_timeout_s: float = number(0, TIMEOUT_S_MAX)
    duration_s: float = number(0.05, 60)


@message("counting.release_lease")
class ReleaseLease(Message):
    lease_id: str = text(ID_MAX)
    in_use: int = integer(0, 1_000_000, default=0)


@message("counting.set_reserved")
class SetReserved(Message):
    tenant: str = text(NAME_MAX)
    function: str = text(NAME_MAX)
    reserved: int | None = integer(0, 1_000_000, default=None)  # absent: remove the reservation


@message("counting.revise")
class Revise(Message):
    """Counting -> a frontend holding leases: the tenant's limits changed or idle credits are wanted back."""

    tenant: str = text(NAME_MAX)


@message("counting.set_limit")
class SetLimit(Message):
    tenant: str = text(NAME_MAX)
    limit: int = integer(0, 1_000_000)


@message("counting.members")
class CountingMembers(Message):
    pass


@message("counting.change_members")
class ChangeMembers(Message):
    """Add or remove one counting replica (its Raft address, host:port) at run time."""

    action: str = text(8, choices=("add", "remove"))
    address: str = text(255)


@message("counting.status")
class CountingStatus(Message):
    tenant: str | None = text(NAME_MAX, default=None)


# --- placement ---------------------------------------------------------------------------------------------------


@message("placement.register")
class Register(Message):
    node: NodeInfo = nested(NodeInfo)


@message("placement.heartbeat")
class Heartbeat(Message):
    node_id: str = text(NAME_MAX)
    sandboxes: int = integer(0, default=0)
    memory_used_mb: int = integer(0, default=0)


@message("placement.list_nodes")
class ListNodes(Message):
    pass


@message("placement.lease_worker")
class LeaseWorker(Message):
    """A manager asks for `memory_mb` of worker capacity; placement picks the host (packing policy)."""

    lease_id: str = text(ID_MAX)
    manager: str = text(255)
    memory_mb: int = integer(MEMORY_MB_MIN, 1_000_000)
    prefer_azs: tuple = text_list(16, default=())
    avoid_nodes: tuple = text_list(64, default=())
    lease_s: float = number(1, 7 * 24 * 3600)


@message("placement.return_lease")
class ReturnLease(Message):
    lease_id: str = text(ID_MAX)


@message("placement.list_leases")
class ListLeases(Message):
    manager: str | None = text(255, default=None)


@message("placement.report")
class ReportOutcome(Message):
    """A manager's word on invokes it ran on a node: False for a system error (not a function error)."""

    node_id: str = text(NAME_MAX)
    ok: bool = flag()
    incarnation: int | None = integer(0, default=None)  # which run of the node the report is about


@message("placement.drain")
class Drain(Message):
    node_id: str = text(NAME_MAX)
    draining: bool = flag(default=True)


# --- worker manager ----------------------------------------------------------------------------------------------


@message("manager.reserve")
class Reserve(Message):
    config: FunctionConfig = nested(FunctionConfig)
    request_id: str = text(ID_MAX)
    avoid_nodes: tuple = text_list(64, default=())
    # which handling of a sync invoke this is (one per frontend handling of one client request): a second,
    # different handling of the same request id is refused, so a client's retry never runs it twice
    attempt: str | None = text(ID_MAX, default=None)


@message("manager.release")
class ManagerRelease(Message):
    function_key: str = text(512)
    sandbox_id: str = text(ID_MAX)
    request_id: str = text(ID_MAX)
    outcome: str = text(16, default="ok", choices=("ok", "gone", "node_failed", "not_sent"))


@message("manager.status")
class ManagerStatus(Message):
    pass


# --- worker ------------------------------------------------------------------------------------------------------


@message("worker.create_sandbox")
class CreateSandbox(Message):
    sandbox_id: str = text(ID_MAX)
    config: FunctionConfig = nested(FunctionConfig)
    manager: str = text(255)


@message("worker.run", max_payload_bytes=SYNC_PAYLOAD_MAX_BYTES)
class Run(Message):
    sandbox_id: str = text(ID_MAX)
    request_id: str = text(ID_MAX)
    function_key: str = text(512)
    log_tail: bool = flag(default=False)
    not_after_ms: int | None = integer(0, default=None)  # the execution must have ended by then (admission bound)


@message("worker.destroy_sandbox")
class DestroySandbox(Message):
    sandbox_id: str = text(ID_MAX)


@message("worker.list_sandboxes")
class ListSandboxes(Message):
    pass


@message()
class SandboxView(Message):
    sandbox_id: str = text(ID_MAX)
    function_key: str = text(512)
    state: str = text(16)
    manager: str = text(255)
    invocations: int = integer(0)


# --- node --------------------------------------------------------------------------------------------------------


@message("node.status")
class NodeStatus(Message):
    pass


@message("node.inject_fault")
class InjectFault(Message):
    """Operator fault injection on a local region: make one role crash, to see the supervisor act."""

    role: str = text(32, choices=ROLES)
    fault: str = text(32, choices=("crash",))


@message("node.raft_join")
class RaftJoin(Message):
    """Start a replica of `group` on this node, joining the members in `peers` (host:port each)."""

    group: str = text(16, choices=("control", "counting", "placement"))
    peers: tuple = text_list(16)


@message("node.raft_leave")
class RaftLeave(Message):
    """Stop this node's replica of `group` (after it was removed from the group) and delete its journal."""

    group: str = text(16, choices=("control", "counting", "placement"))


__all__ = [name for name, obj in dict(globals()).items() if isinstance(obj, type) and issubclass(obj, Message)]
