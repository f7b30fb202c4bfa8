"""The calling side: a DEALER client with deadlines, a pool of them, and failover between equivalent endpoints.

`call(msg)` sends a typed request and returns its typed reply (the type the request declares), validated as a
server validates requests; an error reply is raised as the Lambda-named error the peer sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from wire import codec
from wire.errors import (
    AccessDeniedException,
    FlintError,
    PeerUnavailable,
    Reason,
    ServiceException,
    error_fields,
    from_reply,
)
from wire.ids import new_request_id, now_ms
from wire.keys import KeyPair
from wire.schema import Message
from wire.tasks import Background
from wire.transport import HARD_MAX_MESSAGE_BYTES, tune

log = structlog.get_logger("wire.client")

# With IMMEDIATE set, a send waits only while no connection to the peer exists; a live peer takes it at once.
SEND_TIMEOUT_S = 1.0
DOWN_SEND_TIMEOUT_S = 0.25


class Client:
    """A DEALER to one endpoint; many requests in flight, each matched to its reply by request id.

    A request that cannot be sent (the peer is down: IMMEDIATE keeps messages off dead connections) fails with
    PeerUnavailable reason NotSent, so the caller knows it never started. One sent but unanswered fails with
    reason Timeout or ConnectionLost: it may have run.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        *,
        keys: KeyPair,
        server_public: bytes,
        timeout_s: float = 5.0,
    ):
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.unmatched_replies = 0
        self._pending: dict[str, asyncio.Future] = {}
        self._tasks: Background | None = None
        sock = ctx.socket(zmq.DEALER)
        tune(sock)
        sock.curve_serverkey = server_public
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.require_secret()
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(endpoint)
        self.sock = sock
        self.up = False  # a CURVE handshake has succeeded and no disconnect came after it
        self.down_since: float | None = None
        self._refused: asyncio.Future | None = None  # set when the server turns our key away at the handshake
        self.auth_refused = False  # the last handshake attempt was refused (libzmq keeps retrying)

    def _start(self) -> None:
        self._tasks = Background(f"client:{self.endpoint}")
        self._tasks.spawn(self._read(), name=f"client-read {self.endpoint}")
        self._tasks.spawn(self._watch(), name=f"client-monitor {self.endpoint}")

    async def call(self, msg: Message, *, timeout_s: float | None = None, request_id: str | None = None) -> Any:
        """Send `msg` and return its reply (an instance of `type(msg).reply`)."""
        if self._tasks is None:
            self._start()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid = request_id or new_request_id()
        deadline = now_ms() + int(timeout * 1000)
        header = {"v": codec.PROTOCOL_VERSION, "op": msg.op, "id": rid, "deadline": deadline, **msg.to_fields()}
        fut = asyncio.get_running_loop().create_future()
        if rid in self._pending:
            raise ServiceException(f"request id {rid} is already in flight on {self.endpoint}")
        self._pending[rid] = fut
        # a peer seen to drop gets a short wait: it is probably dead, and the caller has elsewhere to go
        send_timeout = min(timeout, SEND_TIMEOUT_S if self.down_since is None else DOWN_SEND_TIMEOUT_S)
        try:
            frames = codec.encode(header, msg.raw_frame)
            try:
                if self.up:
                    await asyncio.wait_for(self.sock.send_multipart(frames), send_timeout)
                else:  # no handshake yet: the server may be turning our key away, which should not wait it out
                    await self._first_send(frames, send_timeout)
            except (asyncio.TimeoutError, zmq.ZMQError):
                raise PeerUnavailable(
                    f"could not reach {self.endpoint} within {send_timeout:.1f}s", reason=Reason.NOT_SENT
                ) from None
            try:
                header, payload = await asyncio.wait_for(fut, max(0.0, (deadline - now_ms()) / 1000))
            except asyncio.TimeoutError:
                raise PeerUnavailable(
                    f"{self.endpoint} did not answer {msg.op} within {timeout:.1f}s", reason=Reason.TIMEOUT
                ) from None
        finally:
            self._pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # consumed here, so asyncio does not warn about a failure nobody awaited
        if header.get("ok") is not True:
            err = from_reply(header.get("error"))
            if err.reason == Reason.SHUTTING_DOWN:  # refused before anything ran: the same as never sent
                raise PeerUnavailable(err.message, reason=Reason.NOT_SENT)
            raise err
        reply_cls = type(msg).reply
        try:
            return reply_cls.from_wire(header, payload)
        except FlintError as err:  # the peer's fault, not the caller's: not an InvalidRequest of ours
            raise ServiceException(f"{self.endpoint} sent a malformed reply to {msg.op}: {err.message}") from None

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                header, payload = codec.decode(frames, max_payload_bytes=HARD_MAX_MESSAGE_BYTES,
                                               max_header_bytes=codec.MAX_REPLY_HEADER_BYTES)
            except FlintError as err:
                self.unmatched_replies += 1
                log.warning("client.undecodable_reply", endpoint=self.endpoint, **error_fields(err))
                continue
            fut = self._pending.get(header.get("id"))  # type: ignore[arg-type]
            if fut is None or fut.done():
                self.unmatched_replies += 1  # a late reply after a timeout, or an error to a frame we never sent
                continue
            fut.set_result((header, payload))

    async def _first_send(self, frames: list, send_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._refused is None or self._refused.done():
            self._refused = loop.create_future()
        send = asyncio.ensure_future(self.sock.send_multipart(frames))
        done, _ = await asyncio.wait({send, self._refused}, timeout=send_timeout, return_when=asyncio.FIRST_COMPLETED)
        if send in done:
            send.result()
            return
        send.cancel()
        if self._refused.done() or self.auth_refused:
            raise AccessDeniedException(
                f"{self.endpoint} refused this key at the handshake: it is unknown there or was revoked. "
                "Check the key file you used, or ask your operator for a key.")
        raise asyncio.TimeoutError

    async def _watch(self) -> None:
        while True:
            try:
                event = await recv_monitor_message(self._monitor)
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.down_since, self.auth_refused = True, None, False
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_refused = True
                if self._refused is not None and not self._refused.done():
                    self._refused.set_result(event.get("value"))
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.up = False
                self.down_since = self.down_since or time.monotonic()
                err = PeerUnavailable(f"connection to {self.endpoint} was lost", reason=Reason.CONNECTION_LOST)
                for fut in list(self._pending.values()):
                    if not fut.done():
                        fut.set_exception(err)

    def close(self) -> None:
        if self._tasks is not None:
            self._tasks.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)


class ClientPool:
    """One Client per endpoint, shared by everything in a process that talks to that endpoint."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: KeyPair, server_public: bytes, timeout_s: float = 5.0):
        self.ctx = ctx
        self.keys = keys
        self.server_public = server_public
        self.timeout_s = timeout_s
        self._clients: dict[str, Client] = {}

    def get(self, endpoint: str) -> Client:
        client = self._clients.get(endpoint)
        if client is None:
            client = Client(
                self.ctx, endpoint, keys=self.keys, server_public=self.server_public, timeout_s=self.timeout_s
            )
            self._clients[endpoint] = client
        return client

    async def call(self, endpoint: str, msg: Message, **kw: Any) -> Any:
        return await self.get(endpoint).call(msg, **kw)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


# Answers that mean "ask another of the equivalent endpoints": this node holds no replica of the group, or its
# replica is cut off from a majority while another node's may not be.
MOVE_ON_REASONS = {Reason.NOT_A_REPLICA, Reason.NO_QUORUM}


class Failover:
    """Calls one of several equivalent endpoints (the control nodes), moving on when one is unreachable.

    The same request id goes to every endpoint tried, so a Raft-backed operation that did run on a node that
    then vanished is not applied twice.
    """

    def __init__(self, pool: ClientPool, endpoints: list[str]):
        if not endpoints:
            raise ValueError("Failover needs at least one endpoint")
        self.pool = pool
        self.endpoints = list(endpoints)
        self._preferred = 0

    async def call(
        self,
        msg: Message,
        *,
        timeout_s: float = 5.0,
        request_id: str | None = None,
        idempotent: bool = True,
    ) -> Any:
        """With `idempotent` False (an invoke), only a request that never left moves on to the next endpoint:
        one that may have run there is the caller's to retry or not."""
        rid = request_id or new_request_id()
        last: PeerUnavailable | None = None
        n = len(self.endpoints)
        start = self._preferred
        for i in range(n):
            index = (start + i) % n
            try:
                response = await self.pool.call(self.endpoints[index], msg, timeout_s=timeout_s, request_id=rid)
            except FlintError as err:
                if not (isinstance(err, PeerUnavailable) or err.reason in MOVE_ON_REASONS):
                    raise
                if not idempotent and err.reason != Reason.NOT_SENT:
                    raise
                last = PeerUnavailable(err.message, reason=err.reason) if not isinstance(err, PeerUnavailable) else err
                continue
            self._preferred = index
            return response
        assert last is not None
        raise PeerUnavailable(f"no {msg.op.split('.')[0]} endpoint answered: {last.message}", reason=last.reason)
