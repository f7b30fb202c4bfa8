"""The control plane as tenants and operators reach it through a frontend: functions, versions, aliases,
concurrency, tenants and keys, and the async events of a tenant. Each handler checks what only the frontend
can (the code package, that the function is the caller's) and hands the change to the registry or the counting
service, whose state modules hold the rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from counting.client import CountingClient
from frontend.keys import KeyMap
from frontend.state import FunctionCache
from manager.client import ManagerClient
from placement.client import NodeView
from registry.client import RegistryClient
from registry.package import sha256, validate_zip
from wire import messages as m
from wire.errors import (
    AccessDeniedException,
    FlintError,
    InvalidParameterValueException,
    ResourceNotFoundException,
    error_fields,
)
from wire.ids import scoped_id
from wire.principal import Role
from wire.server import Request
from wire.transport import node_endpoint

log = structlog.get_logger("frontend.control")


class ControlPlane:
    def __init__(self, registry: RegistryClient, counting: CountingClient, managers: ManagerClient, view: NodeView,
                 cache: FunctionCache, keys: KeyMap, revise: Callable[[str], None], unzipped_max_mb: int):
        self.registry = registry
        self.counting = counting
        self.managers = managers
        self.view = view
        self.cache = cache
        self.keys = keys
        self.revise_credits = revise  # the ledger changed a tenant's limits: what this frontend holds is revised
        self.unzipped_max_bytes = unzipped_max_mb * 1024 * 1024

    def handlers(self) -> dict:
        tenant, operator = self.keys.only(Role.TENANT), self.keys.only(Role.OPERATOR)
        return {
            m.CreateFunction: tenant(self.create_function),
            m.GetFunction: tenant(self.get_function),
            m.ListFunctions: tenant(self.list_functions),
            m.DeleteFunction: tenant(self.delete_function),
            m.UpdateFunctionCode: tenant(self.update_code),
            m.UpdateFunctionConfiguration: tenant(self.update_configuration),
            m.PublishVersion: tenant(self.publish_version),
            m.ListVersions: tenant(self.list_versions),
            m.PutAlias: tenant(self.put_alias),
            m.DeleteAlias: tenant(self.delete_alias),
            m.ListAliases: tenant(self.list_aliases),
            m.PutFunctionConcurrency: tenant(self.put_concurrency),
            m.DeleteFunctionConcurrency: tenant(self.delete_concurrency),
            m.GetFunctionConcurrency: tenant(self.get_concurrency),
            m.ListEvents: tenant(self.list_events),
            m.GetEvent: tenant(self.get_event),
            m.RedriveEvents: tenant(self.redrive_events),
            m.TenantCreate: operator(self.tenant_create),
            m.TenantAddKey: operator(self.tenant_add_key),
            m.TenantRevokeKey: operator(self.tenant_revoke_key),
            m.TenantList: operator(self.tenant_list),
            m.TenantNetwork: operator(self.tenant_network),
            m.TenantLimit: operator(self.tenant_limit),
            m.Revise: self.revise,
        }

    @staticmethod
    def _for_tenant(cls: type[m.Message], req: Request) -> m.Message:
        """The registry's request for the caller's own: the same fields, and the tenant its key belongs to."""
        return cls.from_fields({**req.msg.to_fields(), "tenant": req.tenant})

    @staticmethod
    def _once(req: Request, msg: m.Message) -> str:
        """The id a change is applied at most once under: the caller's request id, scoped to the caller and the
        operation, so one tenant's id can never name (and return) another tenant's change."""
        return scoped_id(req.caller.who, msg.op, req.id)

    async def _changed(self, req: Request, msg: m.Message, name: str) -> m.Message:
        """A change to one of the caller's functions: committed once, then this frontend forgets what it cached
        of the function."""
        reply = await self.registry.command(msg, request_id=self._once(req, msg))
        self.cache.forget(req.tenant, name)
        return reply

    # --- function lifecycle ----------------------------------------------------------------------------------

    async def _code(self, tenant: str, name: str, code: bytes | None, *, create: bool) -> tuple[str, int]:
        """Check a package (its zip, then with the registry: the name, the tenant's code storage quota), and only
        then upload it to the control nodes."""
        if not code:
            raise InvalidParameterValueException("no code: send the zip as the request's payload frame")
        await asyncio.to_thread(validate_zip, code, unzipped_max_bytes=self.unzipped_max_bytes)
        await self.registry.check_code(tenant, name, code, create=create)
        await self.registry.put_blob(code)
        return sha256(code), len(code)

    async def create_function(self, req: Request) -> m.FunctionReply:
        msg = req.msg
        digest, size = await self._code(req.tenant, msg.name, msg.code, create=True)
        config = m.FunctionConfig(
            tenant=req.tenant, name=msg.name, handler=msg.handler, runtime=msg.runtime, memory_mb=msg.memory_mb,
            timeout_s=msg.timeout_s, environment=msg.environment, code_sha256=digest, code_size=size,
            network=msg.network,
        )
        return await self._changed(req, m.RegistryCreateFunction(config=config), msg.name)

    async def update_code(self, req: Request) -> m.FunctionReply:
        digest, size = await self._code(req.tenant, req.msg.name, req.msg.code, create=False)  # not theirs: not found
        change = m.RegistryUpdateCode(tenant=req.tenant, name=req.msg.name, code_sha256=digest, code_size=size)
        return await self._changed(req, change, req.msg.name)

    async def update_configuration(self, req: Request) -> m.FunctionReply:
        msg = req.msg
        changes = m.ConfigChanges.from_fields({f: getattr(msg, f) for f in m.CONFIG_FIELDS})
        change = m.RegistryUpdateConfig(tenant=req.tenant, name=msg.name, changes=changes)
        return await self._changed(req, change, msg.name)

    async def get_function(self, req: Request) -> m.FunctionReply:
        choices = await self.registry.resolve(req.tenant, req.msg.name, req.msg.qualifier)
        concurrency = await self.counting.tenant(req.tenant)
        reserved = concurrency.reserved.get(req.msg.name) if concurrency is not None else None
        return m.FunctionReply(config=choices[0].config, reserved_concurrency=reserved)

    async def list_functions(self, req: Request) -> m.FunctionList:
        return m.FunctionList(functions=await self.registry.list_functions(req.tenant))

    async def delete_function(self, req: Request) -> m.Empty:
        await self._changed(req, self._for_tenant(m.RegistryDeleteFunction, req), req.msg.name)
        await self._unreserve(req.tenant, req.msg.name)
        await self._retire_sandboxes(req.tenant, req.msg.name)
        return m.Empty()

    async def _retire_sandboxes(self, tenant: str, name: str) -> None:
        """Every manager destroys the deleted function's warm sandboxes (a function made again under the name
        never gets them: its sandbox key differs)."""
        await self.view.refresh()
        endpoints = [node_endpoint(n, "manager") for n in self.view.healthy("manager")]
        results = await asyncio.gather(*(self.managers.retire_function(e, tenant, name) for e in endpoints),
                                       return_exceptions=True)
        for endpoint, result in zip(endpoints, results):
            if isinstance(result, FlintError):  # that manager's sandboxes of it idle out by keep-alive
                log.warning("function.retire_unheard", manager=endpoint, function=name, **error_fields(result))
            elif isinstance(result, BaseException):
                raise result

    async def publish_version(self, req: Request) -> m.FunctionReply:
        return await self._changed(req, self._for_tenant(m.RegistryPublishVersion, req), req.msg.name)

    async def list_versions(self, req: Request) -> m.FunctionList:
        return await self.registry.command(self._for_tenant(m.RegistryListVersions, req))

    async def put_alias(self, req: Request) -> m.AliasReply:
        return await self._changed(req, self._for_tenant(m.RegistryPutAlias, req), req.msg.name)

    async def delete_alias(self, req: Request) -> m.Empty:
        return await self._changed(req, self._for_tenant(m.RegistryDeleteAlias, req), req.msg.name)

    async def list_aliases(self, req: Request) -> m.AliasList:
        return await self.registry.command(self._for_tenant(m.RegistryListAliases, req))

    # --- concurrency -----------------------------------------------------------------------------------------

    async def put_concurrency(self, req: Request) -> m.Concurrency:
        await self.registry.get_function(req.tenant, req.msg.name)  # ResourceNotFoundException if not theirs
        reserved = await self.counting.set_reserved(req.tenant, req.msg.name, req.msg.reserved)
        return m.Concurrency(reserved_concurrency=reserved)

    async def delete_concurrency(self, req: Request) -> m.Empty:
        await self.registry.get_function(req.tenant, req.msg.name)
        await self._unreserve(req.tenant, req.msg.name)
        return m.Empty()

    async def _unreserve(self, tenant: str, name: str) -> None:
        try:
            await self.counting.set_reserved(tenant, name, None)
        except ResourceNotFoundException:
            pass  # it had no reservation: nothing to remove

    async def get_concurrency(self, req: Request) -> m.Concurrency:
        await self.registry.get_function(req.tenant, req.msg.name)
        view = await self.counting.tenant(req.tenant)
        if view is None:
            return m.Concurrency()
        return m.Concurrency(reserved_concurrency=view.reserved.get(req.msg.name), tenant_limit=view.limit,
                             unreserved_min=view.unreserved_min)

    async def revise(self, req: Request) -> m.Empty:
        if req.role is not Role.CLUSTER:
            raise AccessDeniedException("only the counting service sends revisions")
        self.revise_credits(req.msg.tenant)
        return m.Empty()

    # --- operator --------------------------------------------------------------------------------------------

    async def tenant_create(self, req: Request) -> m.TenantReply:
        create = m.RegistryCreateTenant(tenant=req.msg.tenant, public_keys=(req.msg.public_key,))
        reply = await self.registry.command(create, request_id=self._once(req, create))
        self.keys.changed()
        log.info("tenant.created", new_tenant=req.msg.tenant)
        return reply

    async def tenant_add_key(self, req: Request) -> m.TenantReply:
        add = m.RegistryAddKey.from_fields(req.msg.to_fields())
        reply = await self.registry.command(add, request_id=self._once(req, add))
        self.keys.changed()
        return reply

    async def tenant_revoke_key(self, req: Request) -> m.TenantReply:
        revoke = m.RegistryRevokeKey.from_fields(req.msg.to_fields())
        reply = await self.registry.command(revoke, request_id=self._once(req, revoke))
        self.keys.changed()
        log.warning("tenant.key_revoked", target_tenant=req.msg.tenant)
        return reply

    async def tenant_network(self, req: Request) -> m.TenantReply:
        change = m.RegistrySetTenantNetwork.from_fields(req.msg.to_fields())
        reply = await self.registry.command(change, request_id=self._once(req, change))
        self.cache.forget_tenant(req.msg.tenant)  # functions whose network was taken away must not run cached
        log.warning("tenant.network", target_tenant=req.msg.tenant, allowed=req.msg.allowed)
        return reply

    async def tenant_list(self, req: Request) -> m.Tenants:
        return await self.registry.command(m.RegistryListTenants())

    async def tenant_limit(self, req: Request) -> m.TenantLimitView:
        if req.msg.limit is not None:
            await self.counting.set_limit(req.msg.tenant, req.msg.limit)
        view = await self.counting.tenant(req.msg.tenant)
        return m.TenantLimitView(view=view or m.TenantConcurrency(limit=0, unreserved_min=0, reserved={}, pools={}))

    # --- async events ----------------------------------------------------------------------------------------

    async def list_events(self, req: Request) -> m.EventList:
        return await self.registry.command(self._for_tenant(m.EventsList, req))

    async def get_event(self, req: Request) -> m.EventReply:
        reply = await self.registry.command(self._for_tenant(m.EventsGet, req))
        if reply.event is None:
            raise ResourceNotFoundException(f"Event not found: {req.msg.event_id}")
        return reply

    async def redrive_events(self, req: Request) -> m.Redriven:
        redrive = self._for_tenant(m.EventsRedrive, req)
        return await self.registry.command(redrive, request_id=self._once(req, redrive))
