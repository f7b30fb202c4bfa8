"""How other services talk to the registry: any control node, failing over between them."""

from __future__ import annotations

from typing import Any

from registry.package import sha256
from wire import messages as m
from wire.errors import ServiceException
from wire.sockets import Failover


class RegistryClient:
    def __init__(self, failover: Failover):
        self.fo = failover

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
