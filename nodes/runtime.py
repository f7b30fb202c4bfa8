"""What every role on a node shares: its config, the ZeroMQ context, the cluster keys, clients, Raft groups."""

from __future__ import annotations

import time
from typing import Any

import zmq.asyncio

from nodes.config import NodeConfig
from wire.keys import KeyPair
from wire.raft import RaftGroup
from wire.schema import Message
from wire.errors import PeerUnavailable
from wire.sockets import CLUSTER, Authenticator, ClientPool, Failover, Handler, Reply, Server


class Runtime:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.ctx = zmq.asyncio.Context()
        self.keys = KeyPair.load(config.keys_dir / "cluster.key_secret")
        self.pool = ClientPool(self.ctx, self.keys, self.keys.public)
        self.auth = Authenticator(self.ctx, self.keys.public)
        self.groups: dict[str, RaftGroup] = {}
        self.facts: dict[str, Any] = {}  # things one role tells the others: e.g. the worker's isolation level
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

        async def wrapped(req: Any) -> Any:
            raft = self.groups.get(group)
            leader = raft.leader_host() if raft is not None else None
            if leader is not None:
                try:
                    resp = await self.pool.call(
                        self.config.endpoint(service, leader), req.msg, req.payload, request_id=req.id,
                        timeout_s=max(0.05, min(req.remaining_s(3.0), 3.0)),
                    )
                    return Reply(resp.fields, resp.payload)
                except PeerUnavailable:
                    pass
            return await handler(req)

        return wrapped

    def server(
        self,
        service: str,
        handlers: dict[type[Message], Handler],
        *,
        zap_domain: str = CLUSTER,
        allowed: Any = None,
    ) -> Server:
        return Server(
            self.ctx,
            self.config.bind_endpoint(service),
            self.keys,
            handlers,
            name=service,
            zap_domain=zap_domain,
            allowed=allowed,
        )

    def close(self) -> None:
        self.pool.close()
        self.auth.close()
        for group in self.groups.values():
            group.close()
        self.ctx.destroy(linger=0)
