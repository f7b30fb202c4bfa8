"""How other services talk to the registry: any control node, failing over between them.

Changes are typed messages (wire.messages, `registry.*`): `command()` sends one and returns its
typed reply; the reads below return what callers use. Queue writes go straight to the control leader when the
caller knows where it is (a frontend on a control node), saving a forwarding hop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from registry.package import sha256
from wire import messages as m
from wire.client import Failover
from wire.errors import PeerUnavailable, Reason, ServiceException

READ_TIMEOUT_S = 2.0
BLOB_TIMEOUT_S = 30.0
LEADER_TIMEOUT_S = 2.0
QUEUE_WRITES = (m.EventsPut, m.EventsTake, m.EventsSettle, m.EventsRedrive)


class RegistryClient:
    def __init__(self, failover: Failover, leader_endpoint: Callable[[], str | None] | None = None):
        self.fo = failover
        # on a control node: where the control group's leader serves, so queue writes skip a forwarding hop
        self.leader_endpoint = leader_endpoint or (lambda: None)

    async def command(self, msg: m.Message, *, request_id: str | None = None, timeout_s: float = 5.0) -> Any:
        """A replicated change (or a read that must be current): its typed reply. Retries keep `request_id`, so
        the change is applied at most once."""
        leader = self.leader_endpoint() if isinstance(msg, QUEUE_WRITES) else None
        if leader is not None:
            try:
                return await self.fo.pool.call(leader, msg, request_id=request_id,
                                               timeout_s=min(timeout_s, LEADER_TIMEOUT_S))
            except PeerUnavailable:
                pass  # the leader just changed: any control node will do (same request id)
        return await self.fo.call(msg, request_id=request_id, timeout_s=timeout_s)

    async def get_function(self, tenant: str, name: str) -> m.FunctionConfig:
        return (await self.fo.call(m.RegistryGetFunction(tenant=tenant, name=name), timeout_s=READ_TIMEOUT_S)).config

    async def list_functions(self, tenant: str | None) -> tuple[m.FunctionConfig, ...]:
        return (await self.fo.call(m.RegistryListFunctions(tenant=tenant), timeout_s=READ_TIMEOUT_S)).functions

    async def resolve(self, tenant: str, name: str, qualifier: str | None = None) -> tuple[m.Choice, ...]:
        msg = m.RegistryResolve(tenant=tenant, name=name, qualifier=qualifier)
        return (await self.fo.call(msg, timeout_s=READ_TIMEOUT_S)).choices

    async def principals(self) -> dict[str, str]:
        return (await self.fo.call(m.RegistryPrincipals(), timeout_s=READ_TIMEOUT_S)).principals

    async def check_code(self, tenant: str, name: str, data: bytes, *, create: bool) -> None:
        """Raises what a create (or code update) of `name` with this package would be refused for (the name, the
        tenant's code storage quota): asked before uploading it."""
        msg = m.RegistryCheckCode(tenant=tenant, name=name, code_sha256=sha256(data), code_size=len(data),
                                  create=create)
        await self.fo.call(msg, timeout_s=READ_TIMEOUT_S)

    async def put_blob(self, data: bytes) -> str:
        digest = sha256(data)
        await self.fo.call(m.PutBlob(sha256=digest, data=data), timeout_s=BLOB_TIMEOUT_S)
        return digest

    async def get_blob(self, digest: str) -> bytes:
        data = (await self.fo.call(m.GetBlob(sha256=digest), timeout_s=BLOB_TIMEOUT_S)).data or b""
        if sha256(data) != digest:
            raise ServiceException(f"code blob {digest[:12]}... arrived corrupted", reason=Reason.CODE_CORRUPTED)
        return data
