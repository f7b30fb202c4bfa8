"""Registry service: function metadata through the `control` Raft group, code blobs on the control nodes."""

from __future__ import annotations

import asyncio

import structlog

from nodes.runtime import Runtime
from registry.blobs import BlobStore
from registry.state import RegistryState
from wire import messages as m
from wire.errors import FlintError, PeerUnavailable, ResourceNotFoundException, ServiceException
from wire.raft import RaftGroup
from wire.sockets import Reply, Request, new_request_id

log = structlog.get_logger("registry")

GROUP_COMMIT_S = 0.001  # an accept waits at most this long for others to share its commit
GROUP_COMMIT_MAX = 128


class RegistryService:
    def __init__(self, rt: Runtime, group: RaftGroup):
        self.rt = rt
        self.group = group
        self.blobs = BlobStore(rt.config.data_dir / "blobs")
        self._batch: list = []
        self._events_at_leader = rt.at_leader("control", "registry", self._events_here)

    async def run(self) -> None:
        # Writes commit at the leader. Reads a tenant or operator makes are served there too, so whoever just
        # changed something sees the change, whichever node they ask next (a follower applies a commit a moment
        # after the leader acknowledged it). Only when the leader cannot be reached does this replica answer.
        at_leader = lambda handler: self.rt.at_leader("control", "registry", handler)  # noqa: E731
        server = self.rt.server(
            "registry",
            {
                m.RegistryCreateFunction: at_leader(self.create_function),
                m.RegistryGetFunction: at_leader(self.get_function),
                m.RegistryListFunctions: at_leader(self.list_functions),
                m.RegistryDeleteFunction: at_leader(self.delete_function),
                m.PutBlob: self.put_blob,
                m.GetBlob: self.get_blob,
                m.CreateTenant: at_leader(self.create_tenant),
                m.ListTenants: at_leader(self.list_tenants),
                m.RegistryUpdate: at_leader(self.update),
                m.RegistryDescribe: at_leader(self.describe),
                m.RegistryPrincipals: at_leader(self.principals),  # ZAP's key map: a revocation counts at once
                m.RegistryEvents: self.events,
            },
        )
        await server.serve()

    async def create_function(self, req: Request) -> dict:
        config = req.msg.config
        if not self.blobs.has(config.code_sha256):
            await self._fetch_blob(config.code_sha256)
        record = await self.group.submit(
            "create_function", {"config": config.to_fields()}, request_id=req.id, timeout_s=req.remaining_s(5)
        )
        log.info("function.created", tenant=config.tenant, function=config.name, code_sha256=config.code_sha256)
        return {"config": record}

    async def get_function(self, req: Request) -> dict:
        with self.group.machine.read() as state:
            return {"config": state.get_function(req.msg.tenant, req.msg.name)}

    async def list_functions(self, req: Request) -> dict:
        with self.group.machine.read() as state:
            return {"functions": state.list_functions(req.msg.tenant)}

    async def delete_function(self, req: Request) -> dict:
        await self.group.submit(
            "delete_function",
            {"tenant": req.msg.tenant, "name": req.msg.name},
            request_id=req.id,
            timeout_s=req.remaining_s(5),
        )
        log.info("function.deleted", tenant=req.msg.tenant, function=req.msg.name)
        return {}

    async def create_tenant(self, req: Request) -> dict:
        record = await self.group.submit(
            "create_tenant",
            {"tenant": req.msg.tenant, "public_keys": list(req.msg.public_keys)},
            request_id=req.id,
            timeout_s=req.remaining_s(5),
        )
        return {"tenant": record}

    async def list_tenants(self, req: Request) -> dict:
        with self.group.machine.read() as state:
            return {"tenants": state.list_tenants()}

    async def update(self, req: Request) -> dict:
        result = await self.group.submit(req.msg.command, dict(req.msg.args), request_id=req.id,
                                         timeout_s=req.remaining_s(5))
        log.info("registry.updated", command=req.msg.command, function=req.msg.args.get("name"),
                 tenant=req.msg.args.get("tenant"))
        return {"result": result}

    async def describe(self, req: Request) -> dict:
        msg = req.msg
        with self.group.machine.read() as state:
            if msg.what == "versions":
                return {"versions": state.list_versions(msg.tenant, msg.name)}
            if msg.what == "aliases":
                return {"aliases": state.list_aliases(msg.tenant, msg.name)}
            return {"choices": state.describe(msg.tenant, msg.name, msg.qualifier)}

    async def principals(self, req: Request) -> dict:
        with self.group.machine.read() as state:
            return {"principals": state.principals()}

    async def events(self, req: Request) -> dict | Reply:
        """The async queue. Writes commit at the leader, and a tenant's reads (get, list) are answered there so
        an event shows its latest state at once; the pollers' scans (visible, counts) use this replica."""
        if req.msg.action in ("put", "take", "settle", "redrive", "get", "list"):
            return await self._events_at_leader(req)
        return await self._events_here(req)

    async def _events_here(self, req: Request) -> dict:
        op, args = req.msg.action, dict(req.msg.args)
        if op == "put":
            args["payload"] = req.payload or b""
            return {"result": await self._put(args, req.remaining_s(5))}
        if op in ("take", "settle", "redrive"):
            return {"result": await self.group.submit(f"events_{op}", args, request_id=req.id,
                                                      timeout_s=req.remaining_s(5))}
        now = self.rt.now()
        with self.group.machine.read() as state:
            queue = state.events
            if op == "visible":
                return {"visible": queue.visible(now)}
            if op == "list":
                return {"events": queue.list(args["tenant"], args.get("state"), int(args.get("limit", 100))),
                        "counts": queue.counts(args["tenant"])}
            if op == "counts":
                return {"counts": queue.counts(args.get("tenant"))}
            return {"event": queue.get(args["tenant"], args["event_id"])}

    async def _put(self, args: dict, timeout_s: float) -> dict:
        """Group commit: accepts arriving together share one Raft command. The first waits GROUP_COMMIT_S for
        company; under load the batch fills while the previous commit is in flight."""
        fut = asyncio.get_running_loop().create_future()
        self._batch.append((args, fut))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_later(GROUP_COMMIT_S, self._spawn_flush, timeout_s)
        elif len(self._batch) >= GROUP_COMMIT_MAX:
            self._spawn_flush(timeout_s)
        return await fut

    def _spawn_flush(self, timeout_s: float) -> None:
        batch, self._batch = self._batch, []
        if batch:
            asyncio.get_running_loop().create_task(self._flush(batch, timeout_s))

    async def _flush(self, batch: list, timeout_s: float) -> None:
        try:
            results = await self.group.submit("events_put_many", {"items": [a for a, _ in batch]},
                                              request_id=new_request_id(), timeout_s=timeout_s)
        except FlintError as err:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)

    async def put_blob(self, req: Request) -> dict:
        """Store a blob here and, unless this is itself a replica push, on a majority of control nodes."""
        data = req.payload or b""
        await asyncio.to_thread(self.blobs.put, req.msg.sha256, data)
        if not req.msg.replicate:
            return {"copies": 1}
        peers = [e for e in self.rt.config.control_endpoints("registry")[1:]]
        needed = (len(peers) + 1) // 2 + 1  # a majority of all control nodes, this one included
        results = await asyncio.gather(
            *(
                self.rt.pool.call(e, m.PutBlob(sha256=req.msg.sha256, replicate=False), data, timeout_s=10)
                for e in peers
            ),
            return_exceptions=True,
        )
        copies = 1 + sum(1 for r in results if not isinstance(r, BaseException))
        if copies < needed:
            raise ServiceException(
                f"code stored on only {copies} of {len(peers) + 1} control nodes; {needed} are needed. "
                "Check that a majority of control nodes is up, then retry.",
                reason="CodeNotReplicated",
            )
        return {"copies": copies}

    async def get_blob(self, req: Request) -> Reply:
        data = self.blobs.get(req.msg.sha256)
        if data is None:
            if req.msg.local_only:
                raise ResourceNotFoundException(f"code blob {req.msg.sha256[:12]}... is not on this node")
            data = await self._fetch_blob(req.msg.sha256)
        return Reply({"size": len(data)}, data)

    async def _fetch_blob(self, digest: str) -> bytes:
        """A control node that missed a replica push pulls the blob from a peer."""
        for endpoint in self.rt.config.control_endpoints("registry")[1:]:
            try:
                resp = await self.rt.pool.call(endpoint, m.GetBlob(sha256=digest, local_only=True), timeout_s=10)
            except (PeerUnavailable, ResourceNotFoundException):
                continue
            if resp.payload is not None:
                await asyncio.to_thread(self.blobs.put, digest, resp.payload)
                return resp.payload
        raise ResourceNotFoundException(f"code blob {digest[:12]}... is not on any reachable control node")
