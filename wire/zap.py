"""The ZAP handler: decides, per CURVE connection, which client keys get in and as whom.

Every server socket of a process shares its context's ZAP endpoint. The cluster key is accepted in every domain;
in the `tenant` domain a key may also belong to a tenant or an operator, resolved through `key_lookup` (the
frontend's copy of the registry's key map). Unknown keys are refused with 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
import zmq
import zmq.asyncio
from zmq.utils import z85

from wire.errors import error_fields
from wire.principal import CLUSTER, Caller
from wire.tasks import Background

log = structlog.get_logger("wire.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
TENANT_DOMAIN = "tenant"
LOOKUP_TIMEOUT_S = 2.0

KeyLookup = Callable[[bytes], Awaitable[str | None]]  # public key -> "tenant:NAME", "operator", or None


class Authenticator:
    """Answers ZAP requests for every CURVE server socket of this process's context."""

    def __init__(self, ctx: zmq.asyncio.Context, cluster_public: bytes):
        self.ctx = ctx
        self.cluster_public = cluster_public
        self.key_lookup: KeyLookup | None = None
        self.refused = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._answers = Background("zap")

    def start(self) -> None:
        # A ROUTER, not a REP: each request is answered in its own task, so a key lookup that needs a new CURVE
        # connection (which itself goes through ZAP) cannot deadlock the handler.
        self._sock = self.ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._answers.spawn(self._serve(), name="zap")

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            self._answers.spawn(self._answer(frames), name="zap-answer")

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
            caller = await self._caller(domain.decode(errors="replace"), key)
            if caller is not None:
                status, text, user = b"200", b"OK", caller.user_id().encode()
        if status != b"200":
            self.refused += 1
        assert self._sock is not None
        await self._sock.send_multipart([*envelope, version, request_id, status, text, user, b""])

    async def _caller(self, domain: str, key: bytes) -> Caller | None:
        if key == self.cluster_public:
            return CLUSTER
        if domain == TENANT_DOMAIN and self.key_lookup is not None:
            try:
                who = await asyncio.wait_for(self.key_lookup(key), LOOKUP_TIMEOUT_S)
            except Exception as exc:  # a registry outage must not take the door down: refuse, say why
                log.warning("zap.lookup_failed", **error_fields(exc))
                return None
            return None if who is None else Caller.from_who(who, key.decode())
        return None

    def close(self) -> None:
        self._answers.cancel()
        if self._sock is not None:
            self._sock.close(0)
