"""Who may call a frontend: the key map ZAP decides connections on, and the per-request revocation check.

A tenant's or operator's key is looked up in the registry's key map (at the control leader). A new connection
is decided on a map fetched after it asked, so a key revoked or added through any frontend counts here at once;
a request on an open connection is checked against a map at most PRINCIPALS_TTL_S old, so a revocation reaches
open connections within about that long. When the registry cannot be reached, what was known stands (static
stability): a registry outage does not lock every tenant out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from registry.client import RegistryClient
from wire.errors import AccessDeniedException, FlintError, error_fields
from wire.principal import Role
from wire.server import Handler, Request

log = structlog.get_logger("frontend.keys")

PRINCIPALS_TTL_S = 1.0  # a revoked key stops working on open connections within about this long


class KeyMap:
    def __init__(self, registry: RegistryClient):
        self.registry = registry
        self._principals: dict[str, str] = {}  # public key -> "tenant:NAME" or "operator"
        self._fetched_at = float("-inf")  # when the fetch of the map we hold began (monotonic)
        self._lock = asyncio.Lock()

    async def lookup(self, public_key: bytes) -> str | None:
        """ZAP: whose key opens this connection. Connections opening together share one fetch."""
        asked = time.monotonic()
        try:
            await self._refresh(newer_than=asked)
        except FlintError as err:  # the registry is unreachable: decide on what we knew
            log.warning("keys.refresh_failed", **error_fields(err))
        return self._principals.get(public_key.decode())

    def changed(self) -> None:
        """A key was added or revoked through this frontend: the next check fetches the map again."""
        self._fetched_at = float("-inf")

    async def _refresh(self, newer_than: float) -> None:
        """Make sure the key map was fetched no earlier than `newer_than` (monotonic)."""
        if self._fetched_at >= newer_than:
            return
        async with self._lock:
            if self._fetched_at >= newer_than:
                return  # a fetch that began after we asked finished while we waited
            started = time.monotonic()
            self._principals = await self.registry.principals()
            self._fetched_at = started

    async def check(self, req: Request) -> None:
        """The key that opened this connection must still be active: revocation reaches open connections."""
        try:
            await self._refresh(newer_than=time.monotonic() - PRINCIPALS_TTL_S)
        except FlintError as err:  # keep serving on what we knew
            log.warning("keys.refresh_failed", **error_fields(err))
            return
        if self._principals.get(req.caller.key or "") != req.caller.who:
            raise AccessDeniedException("this key was revoked; ask your operator for a new one")

    def only(self, role: Role) -> Callable[[Handler], Handler]:
        """Wrap a handler that only `role` (a tenant or an operator) may call, with a still-valid key."""

        def wrap(handler: Callable[[Request], Awaitable]) -> Handler:
            async def wrapped(req: Request):
                if req.role is not role:
                    raise AccessDeniedException(f"{req.msg.op} needs {'a tenant' if role is Role.TENANT else 'an operator'} key")
                await self.check(req)
                return await handler(req)

            return wrapped

        return wrap
