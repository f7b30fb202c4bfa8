"""A ROUTER server loop: decode, validate and dispatch each request to its handler, in its own task.

Bad input never reaches a handler: it gets an error reply (InvalidRequestContentException,
RequestTooLargeException) or, when nothing can be answered, is dropped and counted in `stats`. A handler gets a
`Request` (the typed message, its id, deadline and caller) and returns an instance of the message type's declared
reply (or None when that type has no required field).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio

from wire import codec
from wire.errors import (
    AccessDeniedException,
    FlintError,
    InvalidRequestContentException,
    Reason,
    ServiceException,
    error_fields,
)
from wire.ids import now_ms
from wire.keys import KeyPair
from wire.principal import Caller, Role
from wire.schema import OPS, Message
from wire.tasks import Background
from wire.transport import HARD_MAX_MESSAGE_BYTES, tune

log = structlog.get_logger("wire.server")


@dataclasses.dataclass(slots=True)
class Request:
    msg: Any  # the op's Message type, validated
    id: str
    deadline_ms: int | None
    caller: Caller

    def remaining_s(self, default: float = 30.0) -> float:
        if self.deadline_ms is None:
            return default
        return max(0.0, (self.deadline_ms - now_ms()) / 1000)

    @property
    def tenant(self) -> str | None:
        return self.caller.tenant

    @property
    def role(self) -> Role:
        return self.caller.role


Handler = Callable[[Request], Awaitable[Message | None]]


@dataclasses.dataclass
class ServerStats:
    received: int = 0
    replied: int = 0
    error_replies: int = 0
    dropped: int = 0
    internal_errors: int = 0


def cluster_only(caller: Caller) -> bool:
    return caller.role is Role.CLUSTER


class Server:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        keys: KeyPair,
        handlers: dict[type[Message], Handler],
        *,
        name: str,
        zap_domain: str = "cluster",
        allowed: Callable[[Caller], bool] = cluster_only,
    ):
        self.ctx = ctx
        self.endpoint = endpoint
        self.name = name
        self.handlers = {cls.op: h for cls, h in handlers.items()}
        self.allowed = allowed
        self.stats = ServerStats()
        self.accepting = True  # False once draining: new requests are refused, those in hand finish
        self._tasks = Background(f"server:{name}")
        sock = ctx.socket(zmq.ROUTER)
        tune(sock)
        sock.curve_server = True
        sock.curve_secretkey = keys.require_secret()
        sock.curve_publickey = keys.public
        sock.zap_domain = zap_domain.encode()
        sock.bind(endpoint)
        self.sock = sock

    async def serve(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=False)
                self.stats.received += 1
                self._dispatch(frames)
        finally:
            self._tasks.cancel()
            self.sock.close(0)

    def close(self) -> None:
        self.sock.close(0)

    async def drain(self, grace_s: float) -> int:
        """Stop taking new requests (each gets ServiceException ShuttingDown: nothing of it ran, so its caller
        may go elsewhere at once) and wait up to `grace_s` for the requests in hand to be answered. Returns how
        many were still running when the grace ran out."""
        self.accepting = False
        return await self._tasks.wait(grace_s)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.stats.dropped += 1  # an identity with nothing after it: nothing to answer
            return
        identity = frames[0].bytes
        try:
            user_id = frames[1].get("User-Id") or ""
        except zmq.ZMQError:
            user_id = ""
        caller = Caller.parse(user_id)
        request_id = ""
        try:
            # the header first, whatever the payload's size: an error reply must carry the request's id
            header, payload = codec.decode([f.bytes for f in frames[1:]], max_payload_bytes=HARD_MAX_MESSAGE_BYTES)
            request_id = _request_id(header)
            msg_cls, handler, deadline = self._route(header, caller)
            msg = msg_cls.from_wire(header, payload)
        except FlintError as err:
            self._send_error(identity, request_id, err)
            return
        if deadline is not None and deadline < now_ms():
            self.stats.dropped += 1  # the caller has given up already
            return
        if not self.accepting:
            self._send_error(identity, request_id, ServiceException(
                f"the {self.name} service on this node is shutting down; nothing ran. Retry on another node.",
                reason=Reason.SHUTTING_DOWN))
            return
        self._tasks.spawn(self._handle(identity, handler, Request(msg, request_id, deadline, caller)))

    def _route(self, header: dict[str, Any], caller: Caller) -> tuple[type[Message], Handler, int | None]:
        v = header.get("v")
        if v != codec.PROTOCOL_VERSION:
            raise InvalidRequestContentException(
                f"unsupported protocol version {v!r:.20}; this node speaks v{codec.PROTOCOL_VERSION}"
            )
        op = header.get("op")
        if not isinstance(op, str) or op not in self.handlers:
            raise InvalidRequestContentException(f"unknown operation {op!r:.80} for the {self.name} service")
        if not self.allowed(caller):
            raise AccessDeniedException(f"this key may not call {op}")
        deadline = header.get("deadline")
        if deadline is not None and (not isinstance(deadline, int) or isinstance(deadline, bool) or deadline < 0):
            raise InvalidRequestContentException("field 'deadline' must be a non-negative integer (ms since epoch)")
        return OPS[op], self.handlers[op], deadline

    async def _handle(self, identity: bytes, handler: Handler, req: Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id)
        reply_cls = type(req.msg).reply
        try:
            result = await handler(req)
            if result is None:
                result = reply_cls()
            elif not isinstance(result, reply_cls):
                raise TypeError(f"{req.msg.op} answered {type(result).__name__}, not {reply_cls.__name__}")
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
        header = {"v": codec.PROTOCOL_VERSION, "id": req.id, "ok": True, **result.to_fields()}
        raw = result.raw_frame
        try:
            if raw is not None and not isinstance(raw, bytes):
                raise TypeError(f"its raw frame is {type(raw).__name__}, not bytes")
            frames = codec.encode(header, raw)
        except (TypeError, ValueError, OverflowError) as exc:  # a reply msgpack cannot carry: answer, never hang
            self.stats.internal_errors += 1
            log.error("server.reply_unencodable", service=self.name, op=req.msg.op, **error_fields(exc))
            self._send_error(identity, req.id, ServiceException(f"internal error in {self.name}: its reply to "
                                                                f"{req.msg.op} could not be encoded ({exc})"))
            return
        self._send(identity, frames)

    def _send_error(self, identity: bytes, request_id: str, err: FlintError) -> None:
        self.stats.error_replies += 1
        header = {"v": codec.PROTOCOL_VERSION, "id": request_id, "ok": False, "error": err.to_wire()}
        self._send(identity, codec.encode(header))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
            self.stats.replied += 1
        except zmq.ZMQError:  # zmq.Again included: the peer's queue is full; it will time out and retry
            self.stats.dropped += 1


def _request_id(header: dict[str, Any]) -> str:
    rid = header.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise InvalidRequestContentException("field 'id' must be a string of 1 to 64 characters")
    return rid
