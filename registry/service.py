"""Registry service: function metadata and the async event queue through the `control` Raft group, code blobs on
the control nodes.

Every change is a typed message (wire.messages) that maps to one replicated command of `ControlState` (the
`COMMANDS` table below: which command, and how its result becomes the typed reply).

On its own, on a timer (`_upkeep`): the group's leader commits its node's limits when the replicated ones differ
and expires finished events when some are due; every control node removes the code blobs no function version
names any more, once their grace has passed, and copies from a peer those a version names that it lacks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from registry.blobs import BlobStore
from registry.events import EventQueue
from registry.state import ControlState, limits_of
from wire import messages as m
from wire.errors import (
    FlintError,
    PeerUnavailable,
    Reason,
    ResourceNotFoundException,
    ServiceException,
    error_fields,
    from_reply,
)
from wire.host import Host
from wire.ids import new_request_id
from wire.raft import RaftGroup
from wire.server import Handler, Request
from wire.tasks import Background

log = structlog.get_logger("registry")

GROUP_COMMIT_S = 0.001  # an accept waits at most this long for others to share its commit
GROUP_COMMIT_MAX = 128
BLOB_COPY_TIMEOUT_S = 10.0
UPKEEP_S = 0.5  # how often the leader looks for limits to replicate and events to expire


def _function(record: dict) -> m.FunctionReply:
    return m.FunctionReply(config=m.FunctionConfig.from_fields(record))


def _tenant(view: dict) -> m.TenantReply:
    return m.TenantReply(tenant=m.TenantView.from_fields(view))


def _events(views: list[dict]) -> tuple[m.EventView, ...]:
    return tuple(m.EventView.from_fields(v) for v in views)


# request type -> (the ControlState command it commits, how that command's result becomes the reply)
COMMANDS: dict[type[m.Message], tuple[str, Callable[[Any], m.Message]]] = {
    m.RegistryDeleteFunction: ("delete_function", lambda _: m.Empty()),
    m.RegistryUpdateCode: ("update_code", _function),
    m.RegistryUpdateConfig: ("update_config", _function),
    m.RegistryPublishVersion: ("publish_version", _function),
    m.RegistryPutAlias: ("put_alias", lambda alias: m.AliasReply(alias=m.AliasView.from_fields(alias))),
    m.RegistryDeleteAlias: ("delete_alias", lambda _: m.Empty()),
    m.RegistryCreateTenant: ("create_tenant", _tenant),
    m.RegistryAddKey: ("add_key", _tenant),
    m.RegistryRevokeKey: ("revoke_key", _tenant),
    m.RegistryAddOperator: ("add_operator", lambda keys: m.Operators(operators=tuple(keys))),
    m.RegistrySetTenantNetwork: ("set_tenant_network", _tenant),
    m.EventsSettle: ("events_settle", lambda out: m.SettledEvents(results=tuple(m.Settled.from_fields(r)
                                                                                 for r in out))),
    m.EventsRedrive: ("events_redrive", lambda n: m.Redriven(redriven=n)),
}


class RegistryService:
    def __init__(self, host: Host, group: RaftGroup):
        self.host = host
        self.group = group
        self.blobs = BlobStore(host.config.data_dir / "blobs")
        self.blob_grace_s = host.config.settings.code_blob_grace_s
        self._batch: list[tuple[dict, asyncio.Future]] = []
        self._background = Background("registry")
        self._unfetchable: set[str] = set()  # missing blobs no peer had when last asked (logged once each)

    async def run(self) -> None:
        # Writes commit at the leader. Reads a tenant or operator makes are served there too, so whoever just
        # changed something sees the change, whichever node they ask next (a follower applies a commit a moment
        # after the leader acknowledged it). Only when the leader cannot be reached does this replica answer.
        def at_leader(handler: Handler) -> Handler:
            return self.host.at_leader("control", "registry", handler)

        handlers: dict[type[m.Message], Handler] = {cls: at_leader(self.command) for cls in COMMANDS}
        handlers.update({
            m.RegistryCreateFunction: at_leader(self.create_function),
            m.RegistryGetFunction: at_leader(self.get_function),
            m.RegistryListFunctions: at_leader(self.list_functions),
            m.RegistryResolve: at_leader(self.resolve),
            m.RegistryListVersions: at_leader(self.list_versions),
            m.RegistryListAliases: at_leader(self.list_aliases),
            m.RegistryListTenants: at_leader(self.list_tenants),
            m.RegistryPrincipals: at_leader(self.principals),  # ZAP's key map: a revocation counts at once
            m.RegistryCheckCode: at_leader(self.check_code),
            m.EventsPut: at_leader(self.put_event),
            m.EventsTake: at_leader(self.take_events),
            m.EventsList: at_leader(self.list_events),  # a tenant's reads show an event's latest state at once
            m.EventsGet: at_leader(self.get_event),
            m.EventsVisible: self.events_visible,  # the pollers' scan: this replica is good enough
            m.PutBlob: self.put_blob,
            m.GetBlob: self.get_blob,
        })
        server = self.host.server("registry", handlers)
        self._background.spawn(self._upkeep(), name="registry-upkeep")
        self._background.spawn(self._collect_blobs(), name="blob-collector")
        self._background.spawn(self._repair_blobs(), name="blob-repair")
        try:
            await server.serve()
        finally:
            self._background.cancel()

    # --- commands --------------------------------------------------------------------------------------------

    async def _submit(self, req: Request, op: str, args: dict) -> Any:
        return await self.group.submit(op, args, request_id=req.id, timeout_s=req.remaining_s(5))

    async def command(self, req: Request) -> m.Message:
        op, reply = COMMANDS[type(req.msg)]
        result = await self._submit(req, op, req.msg.to_fields())
        if not op.startswith("events_"):
            log.info("registry.changed", command=op, function=getattr(req.msg, "name", None),
                     tenant=getattr(req.msg, "tenant", None))
        return reply(result)

    async def create_function(self, req: Request) -> m.FunctionReply:
        config = req.msg.config
        if not self.blobs.has(config.code_sha256):
            await self._fetch_blob(config.code_sha256)
        record = await self._submit(req, "create_function", {"config": config.to_fields()})
        log.info("function.created", tenant=config.tenant, function=config.name, code_sha256=config.code_sha256)
        return _function(record)

    async def put_event(self, req: Request) -> m.EventReply:
        """Group commit: accepts arriving together share one Raft command. The first waits GROUP_COMMIT_S for
        company; under load the batch fills while the previous commit is in flight. An event its tenant's quota
        has no room for is refused here first, so its payload never enters the Raft log (the commit checks again)."""
        args = {**req.msg.to_fields(), "payload": req.msg.payload or b""}
        with self._queue() as queue:
            if queue.get(req.msg.tenant, req.msg.event_id) is None:  # a retry of an accepted event is that event
                queue.check_room(req.msg.tenant, len(args["payload"]))
        fut = asyncio.get_running_loop().create_future()
        self._batch.append((args, fut))
        timeout_s = req.remaining_s(5)
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_later(GROUP_COMMIT_S, self._flush_soon, timeout_s)
        elif len(self._batch) >= GROUP_COMMIT_MAX:
            self._flush_soon(timeout_s)
        return m.EventReply(event=m.EventView.from_fields(await fut))

    def _flush_soon(self, timeout_s: float) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._background.spawn(self._flush(batch, timeout_s), name="events-group-commit")

    async def _flush(self, batch: list[tuple[dict, asyncio.Future]], timeout_s: float) -> None:
        try:
            results = await self.group.submit("events_put_many", {"items": [a for a, _ in batch]},
                                              request_id=new_request_id(), timeout_s=timeout_s)
        except FlintError as err:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (_, fut), result in zip(batch, results):
            if fut.done():
                continue
            if "error" in result:
                fut.set_exception(from_reply(result["error"]))
            else:
                fut.set_result(result["event"])

    async def take_events(self, req: Request) -> m.TakenEvents:
        """A take commits without payloads, so the results the group remembers (to apply each command once) stay
        small; each taken event's payload is read from this replica, which has applied the take."""
        views = await self._submit(req, "events_take", req.msg.to_fields())
        with self._queue() as queue:
            taken = [{**v, "payload": queue.payload(v["event_id"])} for v in views]
        return m.TakenEvents(events=_events([v for v in taken if v["payload"] is not None]))  # None: done meanwhile

    async def check_code(self, req: Request) -> m.Empty:
        msg = req.msg
        with self.group.machine.read() as state:
            state.check_code(msg.tenant, msg.name, msg.code_sha256, msg.code_size, msg.create)
        return m.Empty()

    # --- reads -----------------------------------------------------------------------------------------------

    async def get_function(self, req: Request) -> m.FunctionReply:
        with self.group.machine.read() as state:
            return _function(state.get_function(req.msg.tenant, req.msg.name))

    async def list_functions(self, req: Request) -> m.FunctionList:
        with self.group.machine.read() as state:
            records = state.list_functions(req.msg.tenant)
        return m.FunctionList(functions=tuple(m.FunctionConfig.from_fields(r) for r in records))

    async def resolve(self, req: Request) -> m.Choices:
        msg = req.msg
        with self.group.machine.read() as state:
            choices = state.describe(msg.tenant, msg.name, msg.qualifier)
        return m.Choices(choices=tuple(m.Choice.from_fields(c) for c in choices))

    async def list_versions(self, req: Request) -> m.FunctionList:
        with self.group.machine.read() as state:
            records = state.list_versions(req.msg.tenant, req.msg.name)
        return m.FunctionList(functions=tuple(m.FunctionConfig.from_fields(r) for r in records))

    async def list_aliases(self, req: Request) -> m.AliasList:
        with self.group.machine.read() as state:
            aliases = state.list_aliases(req.msg.tenant, req.msg.name)
        return m.AliasList(aliases=tuple(m.AliasView.from_fields(a) for a in aliases))

    async def list_tenants(self, req: Request) -> m.Tenants:
        with self.group.machine.read() as state:
            views = list(state.list_tenants().values())
        return m.Tenants(tenants=tuple(m.TenantView.from_fields(v) for v in views))

    async def principals(self, req: Request) -> m.Principals:
        with self.group.machine.read() as state:
            return m.Principals(principals=state.principals())

    async def events_visible(self, req: Request) -> m.Visible:
        with self._queue() as queue:
            return m.Visible(visible=queue.visible(self.host.now()))

    async def list_events(self, req: Request) -> m.EventList:
        msg = req.msg
        with self._queue() as queue:
            return m.EventList(events=_events(queue.list(msg.tenant, msg.state, msg.limit)),
                               counts=m.EventCounts.from_fields(queue.counts(msg.tenant)))

    async def get_event(self, req: Request) -> m.EventReply:
        with self._queue() as queue:
            view = queue.get(req.msg.tenant, req.msg.event_id)
        return m.EventReply(event=None if view is None else m.EventView.from_fields(view))

    @contextmanager
    def _queue(self) -> Iterator[EventQueue]:
        with self.group.machine.read() as state:
            state: ControlState
            yield state.events

    # --- upkeep ----------------------------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """At the leader: replicate this node's limits where the group's differ, and expire what is due."""
        wanted = limits_of(self.host.config.settings)
        while True:
            await asyncio.sleep(UPKEEP_S)
            if not self.group.is_leader:
                continue
            with self.group.machine.read() as state:
                state: ControlState
                replicated, due = state.limits(), state.events.expiring(self.host.now())
            try:
                if replicated != wanted:
                    await self.group.submit("set_limits", wanted, request_id=new_request_id(), timeout_s=2.0)
                    log.info("registry.limits_replicated", limits=wanted)
                if due:
                    await self.group.submit("events_expire", {}, request_id=new_request_id(), timeout_s=2.0)
            except FlintError as err:  # the next round tries again
                log.warning("registry.upkeep_failed", **error_fields(err))

    async def _collect_blobs(self) -> None:
        """On every control node: remove the blobs here that no function version names, past their grace. Only
        while this replica has caught up with its leader: a replica still replaying its log would not know of
        versions made since its last dump."""
        interval = min(60.0, max(0.5, self.blob_grace_s / 4))
        while True:
            await asyncio.sleep(interval)
            if not (self.group.has_leader and self.group.status().ready):
                continue
            stored = await asyncio.to_thread(self.blobs.stored)
            with self.group.machine.read() as state:
                doomed = state.code.collectable(stored, self.host.now(), self.blob_grace_s)
            for digest in doomed:
                if await asyncio.to_thread(self.blobs.remove, digest, stored[digest]):
                    log.info("code.collected", code_sha256=digest)

    async def _repair_blobs(self) -> None:
        """On every control node: copy from a peer each blob a function version names that is not here (a push
        missed while this node was down, or lost with its disk), one at a time and at most code_blob_repair_mb_s.
        Only while this replica has caught up: one replaying its log would look for blobs collected since."""
        settings = self.host.config.settings
        while True:
            await asyncio.sleep(settings.code_blob_repair_interval_s)
            if not (self.group.has_leader and self.group.status().ready):
                continue
            stored = await asyncio.to_thread(self.blobs.stored)
            with self.group.machine.read() as state:
                missing = state.code.missing(stored)
            for digest in missing:
                try:
                    data = await self._fetch_blob(digest)
                except FlintError as err:
                    if digest not in self._unfetchable:
                        log.warning("code.recopy_failed", code_sha256=digest, **error_fields(err),
                                    hint="tried again every code_blob_repair_interval_s")
                    self._unfetchable.add(digest)
                    continue
                self._unfetchable.discard(digest)
                log.info("code.recopied", code_sha256=digest, size=len(data), missing=len(missing))
                await asyncio.sleep(len(data) / (settings.code_blob_repair_mb_s * m.MiB))

    # --- code blobs ------------------------------------------------------------------------------------------

    async def put_blob(self, req: Request) -> m.BlobStored:
        """Store a blob here and, unless this is itself a replica push, on a majority of control nodes."""
        data = req.msg.data or b""
        await asyncio.to_thread(self.blobs.put, req.msg.sha256, data)
        if not req.msg.replicate:
            return m.BlobStored(copies=1)
        peers = self.host.config.control_endpoints("registry")[1:]
        needed = (len(peers) + 1) // 2 + 1  # a majority of all control nodes, this one included
        copy = m.PutBlob(sha256=req.msg.sha256, replicate=False, data=data)
        results = await asyncio.gather(
            *(self.host.pool.call(e, copy, timeout_s=BLOB_COPY_TIMEOUT_S) for e in peers), return_exceptions=True,
        )
        copies = 1 + sum(1 for r in results if not isinstance(r, BaseException))
        if copies < needed:
            raise ServiceException(
                f"code stored on only {copies} of {len(peers) + 1} control nodes; {needed} are needed. "
                "Check that a majority of control nodes is up, then retry.",
                reason=Reason.CODE_NOT_REPLICATED,
            )
        return m.BlobStored(copies=copies)

    async def get_blob(self, req: Request) -> m.Blob:
        data = self.blobs.get(req.msg.sha256)
        if data is None:
            if req.msg.local_only:
                raise ResourceNotFoundException(f"code blob {req.msg.sha256[:12]}... is not on this node")
            data = await self._fetch_blob(req.msg.sha256)
        return m.Blob(size=len(data), data=data)

    async def _fetch_blob(self, digest: str) -> bytes:
        """A control node that missed a replica push pulls the blob from a peer."""
        for endpoint in self.host.config.control_endpoints("registry")[1:]:
            try:
                blob = await self.host.pool.call(endpoint, m.GetBlob(sha256=digest, local_only=True),
                                                 timeout_s=BLOB_COPY_TIMEOUT_S)
            except (PeerUnavailable, ResourceNotFoundException):
                continue
            if blob.data is not None:
                await asyncio.to_thread(self.blobs.put, digest, blob.data)
                return blob.data
        raise ResourceNotFoundException(f"code blob {digest[:12]}... is not on any reachable control node")
