"""asyncio ZeroMQ helpers: a ROUTER server loop, a DEALER client with deadlines, and the ZAP handler.

Every socket uses CURVE. A server has a key pair and a ZAP domain; the process's `Authenticator` decides, per
domain, which client keys get in and under which principal ("cluster", "tenant:NAME"). The principal reaches the
handler as `Request.principal`, read from the message's ZMQ `User-Id` property, so no handler trusts a header
to say who is calling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils import z85

from wire import codec
from wire.errors import (
    AccessDeniedException,
    FlintError,
    InvalidRequestContentException,
    PeerUnavailable,
    RequestTooLargeException,
    ServiceException,
    from_reply,
)
from wire.keys import KeyPair
from wire.schema import OPS, Message

log = structlog.get_logger("wire")

# A hard cap enforced inside libzmq: a peer that sends more is disconnected before Python sees a byte. Anything
# under it is answered with RequestTooLargeException by the server's own, per-operation check.
HARD_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 2000
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# With IMMEDIATE set, a send waits only while no connection to the peer exists; a live peer takes it at once.
SEND_TIMEOUT_S = 1.0
DOWN_SEND_TIMEOUT_S = 0.25

CLUSTER = "cluster"
TENANT_PREFIX = "tenant:"
OPERATOR = "operator"

_ids = itertools.count()
_id_prefix = f"{os.getpid():x}-{int(time.time() * 1000) & 0xFFFFFF:x}"


def new_request_id() -> str:
    """Unique per process and run; also the idempotency key of whatever the request causes."""
    return f"{_id_prefix}-{next(_ids):x}"


def now_ms() -> int:
    return int(time.time() * 1000)


# --- ZAP ---------------------------------------------------------------------------------------------------------

KeyLookup = Callable[[bytes], Awaitable[str | None]]  # public key -> "tenant:NAME", "operator", or None


class Authenticator:
    """Answers ZAP requests for every CURVE server socket of this process's context.

    The cluster key is accepted in every domain; in the `tenant` domain a key may also belong to a tenant,
    resolved through `tenant_lookup` (a registry cache). Unknown keys are refused with 400.
    """

    def __init__(self, ctx: zmq.asyncio.Context, cluster_public: bytes):
        self.ctx = ctx
        self.cluster_public = cluster_public
        self.tenant_lookup: KeyLookup | None = None
        self.refused = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        # A ROUTER, not a REP: each request is answered in its own task, so a tenant lookup that needs a new
        # CURVE connection (which itself goes through ZAP) cannot deadlock the handler.
        self._sock = self.ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="zap")
        self._pending: set[asyncio.Task] = set()

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            task = asyncio.get_running_loop().create_task(self._answer(frames))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _answer(self, frames: list[bytes]) -> None:
        try:
            delimiter = frames.index(b"")
        except ValueError:
            return  # not a REQ envelope: libzmq never sends these
        envelope, body = frames[: delimiter + 1], frames[delimiter + 1 :]
        if len(body) < 6:
            return
        version, request_id, domain, _address, _identity, mechanism = body[:6]
        credentials = body[6:]
        status, text, user = b"400", b"not allowed", b""
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            principal = await self._principal(domain.decode(errors="replace"), key)
            if principal is not None:
                status, text, user = b"200", b"OK", principal.encode()
        if status != b"200":
            self.refused += 1
        assert self._sock is not None
        await self._sock.send_multipart([*envelope, version, request_id, status, text, user, b""])

    async def _principal(self, domain: str, key: bytes) -> str | None:
        if key == self.cluster_public:
            return CLUSTER
        if domain == "tenant" and self.tenant_lookup is not None:
            try:
                principal = await asyncio.wait_for(self.tenant_lookup(key), 2.0)
            except Exception as exc:  # a registry outage must not take the door down: refuse, say why
                log.warning("zap.lookup_failed", error=str(exc))
                return None
            # the key rides along, so a request on an open connection can be checked against revocation
            return None if principal is None else f"{principal}|{key.decode()}"
        return None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close(0)


# --- server ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Request:
    msg: Message
    id: str
    deadline_ms: int | None
    payload: bytes | None
    principal: str

    def remaining_s(self, default: float = 30.0) -> float:
        if self.deadline_ms is None:
            return default
        return max(0.0, (self.deadline_ms - now_ms()) / 1000)

    @property
    def tenant(self) -> str | None:
        if not self.principal.startswith(TENANT_PREFIX):
            return None
        return self.principal[len(TENANT_PREFIX):].split("|", 1)[0]

    @property
    def role(self) -> str:
        """cluster, tenant or operator."""
        return self.principal.split("|", 1)[0].split(":", 1)[0]

    @property
    def key(self) -> str | None:
        """The client's public key (tenants and operators), as its CURVE handshake proved it."""
        return self.principal.split("|", 1)[1] if "|" in self.principal else None


@dataclasses.dataclass(slots=True)
class Reply:
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    payload: bytes | None = None


Handler = Callable[[Request], Awaitable[Reply | dict[str, Any] | None]]


@dataclasses.dataclass
class ServerStats:
    received: int = 0
    replied: int = 0
    error_replies: int = 0
    dropped: int = 0
    internal_errors: int = 0


class Server:
    """A ROUTER socket that decodes, validates and dispatches each request to its handler in its own task.

    Bad input never reaches a handler: it gets an error reply (InvalidRequestContentException,
    RequestTooLargeException) or, when nothing can be answered, is dropped and counted in `stats`.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        keys: KeyPair,
        handlers: dict[type[Message], Handler],
        *,
        name: str,
        zap_domain: str = CLUSTER,
        allowed: Callable[[str], bool] | None = None,
    ):
        self.ctx = ctx
        self.endpoint = endpoint
        self.name = name
        self.handlers = {cls.op: h for cls, h in handlers.items()}
        self.allowed = allowed or (lambda principal: principal == CLUSTER)
        self.stats = ServerStats()
        self._tasks: set[asyncio.Task] = set()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = keys.require_secret()
        sock.curve_publickey = keys.public
        sock.zap_domain = zap_domain.encode()
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(endpoint)
        self.sock = sock

    async def serve(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=False)
                self.stats.received += 1
                self._dispatch(frames)
        finally:
            for t in list(self._tasks):
                t.cancel()
            self.sock.close(0)

    def close(self) -> None:
        self.sock.close(0)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.stats.dropped += 1  # an identity with nothing after it: nothing to answer
            return
        identity = frames[0].bytes
        try:
            principal = frames[1].get("User-Id") or ""
        except zmq.ZMQError:
            principal = ""
        request_id = ""
        try:
            # the header first, whatever the payload's size: an error reply must carry the request's id
            header, payload = codec.decode([f.bytes for f in frames[1:]], max_payload_bytes=HARD_MAX_MESSAGE_BYTES)
            request_id = _request_id(header)
            msg_cls, handler, deadline = self._route(header, principal)
            if payload is not None and len(payload) > msg_cls.max_payload_bytes:
                raise _too_large(len(payload), msg_cls)
            msg = msg_cls.from_fields(header)
        except FlintError as err:
            self._send_error(identity, request_id, err)
            return
        if deadline is not None and deadline < now_ms():
            self.stats.dropped += 1  # the caller has given up already
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(identity, handler, Request(msg, request_id, deadline, payload, principal))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _route(self, header: dict[str, Any], principal: str) -> tuple[type[Message], Handler, int | None]:
        v = header.get("v")
        if v != codec.PROTOCOL_VERSION:
            raise InvalidRequestContentException(
                f"unsupported protocol version {v!r:.20}; this node speaks v{codec.PROTOCOL_VERSION}"
            )
        op = header.get("op")
        if not isinstance(op, str) or op not in self.handlers:
            raise InvalidRequestContentException(f"unknown operation {op!r:.80} for the {self.name} service")
        if not self.allowed(principal):
            raise AccessDeniedException(f"this key may not call {op}")
        deadline = header.get("deadline")
        if deadline is not None and (not isinstance(deadline, int) or isinstance(deadline, bool) or deadline < 0):
            raise InvalidRequestContentException("field 'deadline' must be a non-negative integer (ms since epoch)")
        return OPS[op], self.handlers[op], deadline

    async def _handle(self, identity: bytes, handler: Handler, req: Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id)
        try:
            result = await handler(req)
        except FlintError as err:
            self._send_error(identity, req.id, err)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.internal_errors += 1
            log.exception("server.handler_failed", service=self.name, op=req.msg.op)
            self._send_error(identity, req.id, ServiceException(f"internal error in {self.name}: {exc}"))
            return
        if result is None:
            reply = Reply()
        elif isinstance(result, Reply):
            reply = result
        else:
            reply = Reply(result)
        header = {"v": codec.PROTOCOL_VERSION, "id": req.id, "ok": True, **reply.fields}
        self._send(identity, codec.encode(header, reply.payload))

    def _send_error(self, identity: bytes, request_id: str, err: FlintError) -> None:
        self.stats.error_replies += 1
        header = {"v": codec.PROTOCOL_VERSION, "id": request_id, "ok": False, "error": err.to_wire()}
        self._send(identity, codec.encode(header))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
            self.stats.replied += 1
        except zmq.Again:
            self.stats.dropped += 1  # the peer's queue is full; it will time out and retry
        except zmq.ZMQError:
            self.stats.dropped += 1


def _request_id(header: dict[str, Any]) -> str:
    rid = header.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise InvalidRequestContentException("field 'id' must be a string of 1 to 64 characters")
    return rid


def _too_large(size: int, cls: type[Message]) -> FlintError:
    return RequestTooLargeException(
        f"payload of {size} bytes exceeds the {cls.max_payload_bytes}-byte limit of {cls.op}"
    )


# --- client ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Response:
    fields: dict[str, Any]
    payload: bytes | None


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
        self._reader: asyncio.Task | None = None
        self._monitor_task: asyncio.Task | None = None
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = server_public
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.require_secret()
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE_BYTES)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(endpoint)
        self.sock = sock
        self.up = False  # a CURVE handshake has succeeded and no disconnect came after it
        self.down_since: float | None = None
        self._refused: asyncio.Future | None = None  # set when the server turns our key away at the handshake
        self.auth_refused = False  # the last handshake attempt was refused (libzmq keeps retrying)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(), name=f"client-read {self.endpoint}")
        self._monitor_task = loop.create_task(self._watch(), name=f"client-monitor {self.endpoint}")

    async def call(
        self,
        msg: Message,
        payload: bytes | None = None,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Response:
        if self._reader is None:
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
            frames = codec.encode(header, payload)
            try:
                if self.up:
                    await asyncio.wait_for(self.sock.send_multipart(frames), send_timeout)
                else:  # no handshake yet: the server may be turning our key away, which should not wait it out
                    await self._first_send(frames, send_timeout)
            except (asyncio.TimeoutError, zmq.ZMQError):
                raise PeerUnavailable(
                    f"could not reach {self.endpoint} within {send_timeout:.1f}s", reason="NotSent"
                ) from None
            try:
                header, payload = await asyncio.wait_for(fut, max(0.0, (deadline - now_ms()) / 1000))
            except asyncio.TimeoutError:
                raise PeerUnavailable(
                    f"{self.endpoint} did not answer {msg.op} within {timeout:.1f}s", reason="Timeout"
                ) from None
        finally:
            self._pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # consumed here, so asyncio does not warn about a failure nobody awaited
        if header.get("ok") is True:
            header.pop("v", None)
            header.pop("id", None)
            header.pop("ok", None)
            return Response(header, payload)
        raise from_reply(header.get("error"))

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                header, payload = codec.decode(frames, max_payload_bytes=HARD_MAX_MESSAGE_BYTES,
                                               max_header_bytes=codec.MAX_REPLY_HEADER_BYTES)
            except FlintError as err:
                self.unmatched_replies += 1
                log.warning("client.undecodable_reply", endpoint=self.endpoint, error=str(err))
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
        from zmq.utils.monitor import recv_monitor_message

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
                err = PeerUnavailable(f"connection to {self.endpoint} was lost", reason="ConnectionLost")
                for fut in list(self._pending.values()):
                    if not fut.done():
                        fut.set_exception(err)

    def close(self) -> None:
        for task in (self._reader, self._monitor_task):
            if task is not None:
                task.cancel()
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

    async def call(self, endpoint: str, msg: Message, payload: bytes | None = None, **kw: Any) -> Response:
        return await self.get(endpoint).call(msg, payload, **kw)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


# Answers that mean "ask another of the equivalent endpoints": this node holds no replica of the group, or its
# replica is cut off from a majority while another node's may not be.
MOVE_ON_REASONS = {"NotAReplica", "NoQuorum"}


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
        payload: bytes | None = None,
        *,
        timeout_s: float = 5.0,
        request_id: str | None = None,
        idempotent: bool = True,
    ) -> Response:
        """With `idempotent` False (an invoke), only a request that never left moves on to the next endpoint:
        one that may have run there is the caller's to retry or not."""
        rid = request_id or new_request_id()
        last: PeerUnavailable | None = None
        n = len(self.endpoints)
        start = self._preferred
        for i in range(n):
            index = (start + i) % n
            try:
                response = await self.pool.call(
                    self.endpoints[index], msg, payload, timeout_s=timeout_s, request_id=rid
                )
            except FlintError as err:
                if not (isinstance(err, PeerUnavailable) or err.reason in MOVE_ON_REASONS):
                    raise
                if not idempotent and err.reason != "NotSent":
                    raise
                last = PeerUnavailable(err.message, reason=err.reason) if not isinstance(err, PeerUnavailable) else err
                continue
            self._preferred = index
            return response
        assert last is not None
        raise PeerUnavailable(f"no {msg.op.split('.')[0]} endpoint answered: {last.message}", reason=last.reason)
