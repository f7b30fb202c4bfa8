"""How other services talk to the registry: any control node, failing over between them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from registry.package import sha256
from wire import messages as m
from wire.errors import PeerUnavailable, ServiceException
from wire.sockets import Failover


class RegistryClient:
    def __init__(self, failover: Failover, leader_endpoint: Callable[[], str | None] | None = None):
        self.fo = failover
        # on a control node: where the control group's leader serves, so queue writes skip a forwarding hop
        self.leader_endpoint = leader_endpoint or (lambda: None)

    async def create_function(self, config: m.FunctionConfig, *, request_id: str | None = None) -> dict[str, Any]:
        resp = await self.fo.call(m.RegistryCreateFunction(config=config), request_id=request_id)
        return resp.fields["config"]

    async def get_function(self, tenant: str, name: str) -> dict[str, Any]:
        resp = await self.fo.call(m.RegistryGetFunction(tenant=tenant, name=name), timeout_s=2.0)
        return resp.fields["config"]

    async def list_functions(self, tenant: str | None) -> list[dict[str, Any]]:
        resp = await self.fo.call(m.RegistryListFunctions(tenant=tenant), timeout_s=2.0)
        return resp.fields["functions"]

    async def delete_function(self, tenant: str, name: str, *, request_id: str | None = None) -> None:
        await self.fo.call(m.RegistryDeleteFunction(tenant=tenant, name=name), request_id=request_id)

    async def put_blob(self, data: bytes) -> str:
        digest = sha256(data)
        await self.fo.call(m.PutBlob(sha256=digest), data, timeout_s=30.0)
        return digest

    async def get_blob(self, digest: str) -> bytes:
        resp = await self.fo.call(m.GetBlob(sha256=digest), timeout_s=30.0)
        data = resp.payload or b""
        if sha256(data) != digest:
            raise ServiceException(f"code blob {digest[:12]}... arrived corrupted", reason="CodeCorrupted")
        return data

    async def create_tenant(self, tenant: str, public_keys: list[str]) -> dict[str, Any]:
        resp = await self.fo.call(m.CreateTenant(tenant=tenant, public_keys=tuple(public_keys)))
        return resp.fields["tenant"]

    async def list_tenants(self) -> dict[str, Any]:
        resp = await self.fo.call(m.ListTenants(), timeout_s=2.0)
        return resp.fields["tenants"]

    async def update(self, command: str, *, request_id: str | None = None, **args: Any) -> Any:
        """A replicated change to a function or a tenant (registry.state.RegistryState.cmd_<command>)."""
        resp = await self.fo.call(m.RegistryUpdate(command=command, args=args), request_id=request_id)
        return resp.fields["result"]

    async def describe(self, tenant: str, name: str, qualifier: str | None = None, what: str = "resolve") -> Any:
        resp = await self.fo.call(m.RegistryDescribe(tenant=tenant, name=name, qualifier=qualifier, what=what),
                                  timeout_s=2.0)
        return resp.fields.get("choices") or resp.fields.get("versions") or resp.fields.get("aliases") or []

    async def principals(self) -> dict[str, str]:
        resp = await self.fo.call(m.RegistryPrincipals(), timeout_s=2.0)
        return resp.fields["principals"]

    async def events(self, action: str, payload: bytes | None = None, *, request_id: str | None = None,
                     timeout_s: float = 5.0, **args: Any) -> dict[str, Any]:
        msg = m.RegistryEvents(action=action, args=args)
        leader = self.leader_endpoint() if action in ("put", "take", "settle", "redrive") else None
        if leader is not None:
            try:
                return (await self.fo.pool.call(leader, msg, payload, request_id=request_id,
                                                timeout_s=min(timeout_s, 2.0))).fields
            except PeerUnavailable:
                pass  # the leader just changed: any control node will do (same request id)
        resp = await self.fo.call(msg, payload, request_id=request_id, timeout_s=timeout_s)
        return resp.fields
