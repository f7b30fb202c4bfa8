"""What every role needs from its host: its config, the ZeroMQ context, the cluster keys, clients, Raft groups,
and the facts one role publishes for the others (the worker's isolation and load, read by the placement agent
and the admin status). The node daemon (nodes/) builds one Host and hands it to each role it runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import zmq.asyncio

from wire.client import ClientPool, Failover
from wire.config import NodeConfig
from wire.errors import PeerUnavailable, error_fields
from wire.keys import KeyPair
from wire.principal import Caller
from wire.raft import RaftGroup
from wire.schema import Message
from wire.server import Handler, Request, Server, cluster_only
from wire.zap import Authenticator

log = structlog.get_logger("wire.host")


@dataclasses.dataclass
class HostFacts:
    """What the worker role tells the rest of its node (the placement agent heartbeats it, admin status shows it)."""

    isolation: str = "none (no worker role)"
    isolation_details: dict[str, Any] | None = None
    sandboxes: int = 0
    sandbox_memory_mb: int = 0


class Host:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.ctx = zmq.asyncio.Context()
        self.keys = KeyPair.load(config.keys_dir / "cluster.key_secret")
        self.pool = ClientPool(self.ctx, self.keys, self.keys.public)
        self.auth = Authenticator(self.ctx, self.keys.public)
        self.groups: dict[str, RaftGroup] = {}
        self.facts = HostFacts()
        self.servers: dict[str, Server] = {}  # the latest server of each service this node runs
        self._on_stop: dict[str, Callable[[], Awaitable[None]]] = {}
        self._failovers: dict[str, Failover] = {}

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @staticmethod
    def now() -> float:
        """Wall-clock seconds: what the state classes take as `now` and what Raft commands carry."""
        return time.time()

    def control(self, service: str) -> Failover:
        """A failover client to a control service (registry, counting, placement), own node first."""
        failover = self._failovers.get(service)
        if failover is None:
            failover = Failover(self.pool, self.config.control_endpoints(service))
            self._failovers[service] = failover
        return failover

    def at_leader(self, group: str, service: str, handler: Handler) -> Handler:
        """Wrap a handler that commits to `group`, or reads what must be up to date: on a follower that knows
        the leader, the whole request goes to the leader's `service` (one ZeroMQ hop) and its reply comes back
        verbatim, rather than a command crossing pysyncobj's forwarding and waiting for the commit index to reach
        this replica, or a read missing a commit the caller was already told of. The request id is kept, so a
        retry anywhere is applied at most once. If the leader cannot be reached that way, the handler runs here
        (pysyncobj forwards a command; a read sees this replica)."""

        async def wrapped(req: Request) -> Message | None:
            raft = self.groups.get(group)
            leader = raft.leader_host() if raft is not None else None
            if leader is not None:
                try:
                    return await self.pool.call(
                        self.config.endpoint(service, leader), req.msg, request_id=req.id,
                        timeout_s=max(0.05, min(req.remaining_s(3.0), 3.0)),
                    )
                except PeerUnavailable:
                    pass
            return await handler(req)

        return wrapped

    def server(
        self,
        service: str,
        handlers: dict[type[Message], Handler],
        *,
        zap_domain: str = "cluster",
        allowed: Callable[[Caller], bool] = cluster_only,
    ) -> Server:
        server = Server(
            self.ctx,
            self.config.bind_endpoint(service),
            self.keys,
            handlers,
            name=service,
            zap_domain=zap_domain,
            allowed=allowed,
        )
        self.servers[service] = server
        return server

    def on_stop(self, role: str, hand_back: Callable[[], Awaitable[None]]) -> None:
        """What `role` gives back when its node stops gracefully, after the drain (its latest run's)."""
        self._on_stop[role] = hand_back

    async def hand_back(self, timeout_s: float) -> None:
        """Run every role's hand-back, together, within `timeout_s`; what fails or is late is logged, the stop
        goes on (what is not handed back expires)."""
        names = list(self._on_stop)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self._on_stop[n]() for n in names), return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            log.warning("node.hand_back_late", roles=names, timeout_s=timeout_s)
            return
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                log.warning("node.hand_back_failed", role=name, **error_fields(result))

    async def drain(self, grace_s: float) -> int:
        """A graceful stop: every service refuses new requests and those in hand get up to `grace_s` to finish
        (an invoke running in a sandbox here, one this node's frontend is waiting on). Returns how many did
        not finish in time."""
        left = await asyncio.gather(*(s.drain(grace_s) for s in self.servers.values()))
        return sum(left)

    def close(self) -> None:
        self.pool.close()
        self.auth.close()
        for group in self.groups.values():
            group.close()
        self.ctx.destroy(linger=0)
