"""The frontend's admission path: local credits first (microseconds), the counting service when they run out.

One request per lease is in flight at a time; admissions that find no credit wait for that request together
rather than each sending their own. A background loop renews leases in use, gives back idle ones, and answers
the ledger's revisions.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from counting.client import CountingClient
from frontend.state import CreditWallet, LeaseRequest, Ticket
from wire.errors import FlintError, TooManyRequestsException

log = structlog.get_logger("frontend.admission")

TICK_S = 0.05
RECLAIM_WAITS = (0.02, 0.04, 0.08, 0.16, 0.32)  # how long an admission waits while idle credits elsewhere come back
MAX_ATTEMPTS = 12


class Admission:
    def __init__(self, counting: CountingClient, holder: str, endpoint: str, wallet: CreditWallet | None = None):
        self.counting = counting
        self.holder = holder
        self.endpoint = endpoint
        self.wallet = wallet or CreditWallet(holder)
        self._inflight: dict[str, asyncio.Future] = {}  # lease id or (tenant, function) key -> grant future
        self._waiting: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self.stats = {"local": 0, "remote": 0, "throttled": 0}

    async def admit(self, tenant: str, function: str, timeout_s: float) -> Ticket:
        ticket = self.wallet.try_admit(tenant, function, timeout_s, time.monotonic())
        if ticket is not None:
            self.stats["local"] += 1
            return ticket
        key = (tenant, function)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        waits = 0
        try:
            for _ in range(MAX_ATTEMPTS):
                grant = await self._grow(tenant, function, timeout_s)
                ticket = self.wallet.try_admit(tenant, function, timeout_s, time.monotonic())
                if ticket is not None:
                    self.stats["remote"] += 1
                    return ticket
                if grant.get("renewed", True) and grant["credits"] >= grant["want"]:
                    continue  # we got all we asked for, but other admissions here took it: ask again
                if grant.get("reclaimable") or grant.get("target") is not None or not grant.get("renewed", True):
                    # idle credits elsewhere are on their way back, or our own lease is being reshaped
                    if waits < len(RECLAIM_WAITS):
                        await asyncio.sleep(RECLAIM_WAITS[waits])
                        waits += 1
                        continue
                break  # the ledger had nothing more to give: the limit really is in use
        finally:
            self._waiting[key] -= 1
        self.stats["throttled"] += 1
        pool = self.wallet.pools.get(key, "")
        if pool:
            raise TooManyRequestsException(
                f"Rate Exceeded. Function {function} is at its reserved concurrency.",
                reason="ReservedFunctionConcurrentInvocationLimitExceeded",
            )
        raise TooManyRequestsException(
            "Rate Exceeded. The tenant's concurrency limit is in use.", reason="ConcurrentInvocationLimitExceeded"
        )

    def release(self, ticket: Ticket) -> None:
        final = self.wallet.release(ticket, time.monotonic())
        if final is not None:
            asyncio.get_running_loop().create_task(self._send_release(final))
        lease = self.wallet.by_id.get(ticket.lease_id)
        if lease is not None and lease.target is not None:
            self._wake.set()  # someone waits for credits we were asked to give back: shrink now

    async def _grow(self, tenant: str, function: str, timeout_s: float) -> dict:
        lease = self.wallet.lease_for(tenant, function)
        key = lease.lease_id if lease is not None else f"new:{tenant}/{function}"
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        request = self.wallet.grow(tenant, function, timeout_s, self._waiting.get((tenant, function), 1),
                                   time.monotonic())
        return await self._send(key, request)

    async def _send(self, key: str, request: LeaseRequest) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        if key != request.lease_id:
            self._inflight[request.lease_id] = fut
        sent_at = time.monotonic()
        try:
            grant = await self.counting.lease(
                lease_id=request.lease_id, holder=self.holder, endpoint=self.endpoint, tenant=request.tenant,
                function=request.function, want=request.want, in_use=request.in_use,
                max_timeout_s=request.max_timeout_s, duration_s=self.wallet.lease_s,
            )
            self.wallet.apply(request, grant, sent_at)
            grant["want"] = request.want
            fut.set_result(grant)
            return grant
        except FlintError as err:
            fut.set_exception(err)
            raise
        finally:
            self._inflight.pop(key, None)
            self._inflight.pop(request.lease_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()

    async def _send_release(self, request: LeaseRequest) -> None:
        try:
            await self.counting.release_lease(request.lease_id, request.in_use)
        except FlintError as err:
            log.warning("lease.release_failed", lease_id=request.lease_id, error=str(err))  # it expires anyway

    def revise(self, tenant: str) -> None:
        self.wallet.revise(tenant)
        self._wake.set()

    async def run(self) -> None:
        """Renew, shrink and return leases; never lets one lapse while it is in use and the ledger answers."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            renew, release = self.wallet.due(time.monotonic(), busy=set(self._inflight))
            for request in renew:
                asyncio.get_running_loop().create_task(self._renew(request))
            for request in release:
                asyncio.get_running_loop().create_task(self._send_release(request))

    async def _renew(self, request: LeaseRequest) -> None:
        try:
            await self._send(request.lease_id, request)
        except FlintError as err:
            log.warning("lease.renew_failed", lease_id=request.lease_id, error=str(err))
