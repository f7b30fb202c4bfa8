"""The frontend's admission path: local credits first (microseconds), the counting service when they run out.

One request per credit lease is in flight at a time; admissions that find no credit wait for that request
together rather than each sending their own. A background loop renews leases in use, gives back idle ones, and
answers the ledger's revisions. What an admission does with each answer is frontend.credits.AdmissionRule.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from counting.client import CountingClient
from frontend.credits import AdmissionRule, AskAgain, CreditWallet, LeaseRequest, Throttle, Ticket, WaitFor
from wire import messages as m
from wire.errors import FlintError, error_fields
from wire.tasks import Background

log = structlog.get_logger("frontend.admission")

TICK_S = 0.05


class Admission:
    def __init__(self, counting: CountingClient, holder: str, endpoint: str, wallet: CreditWallet | None = None):
        self.counting = counting
        self.holder = holder
        self.endpoint = endpoint
        self.wallet = wallet or CreditWallet(holder)
        self._inflight: dict[str, asyncio.Future] = {}  # lease id or "new:tenant/function" -> the grant coming
        self._waiting: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._background = Background("admission")
        self.stats = {"local": 0, "remote": 0, "throttled": 0}

    async def admit(self, tenant: str, function: str, timeout_s: float) -> Ticket:
        ticket = self.wallet.try_admit(tenant, function, timeout_s, time.monotonic())
        if ticket is not None:
            self.stats["local"] += 1
            return ticket
        key = (tenant, function)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        rule = AdmissionRule(function)
        try:
            while True:
                request, grant = await self._grow(tenant, function, timeout_s)
                ticket = self.wallet.try_admit(tenant, function, timeout_s, time.monotonic())
                if ticket is not None:
                    self.stats["remote"] += 1
                    return ticket
                step = rule.after(grant, request.want)
                if isinstance(step, WaitFor):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, Throttle):
                    self.stats["throttled"] += 1
                    raise step.error
                else:
                    assert isinstance(step, AskAgain)
        finally:
            self._waiting[key] -= 1

    def release(self, ticket: Ticket) -> None:
        final = self.wallet.release(ticket, time.monotonic())
        if final is not None:
            self._background.spawn(self._send_release(final), name="credit-lease-release")
        lease = self.wallet.by_id.get(ticket.lease_id)
        if lease is not None and lease.target is not None:
            self._wake.set()  # someone waits for credits we were asked to give back: shrink now

    async def _grow(self, tenant: str, function: str, timeout_s: float) -> tuple[LeaseRequest, m.CreditGrant]:
        lease = self.wallet.lease_for(tenant, function)
        key = lease.lease_id if lease is not None else f"new:{tenant}/{function}"
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        request = self.wallet.grow(tenant, function, timeout_s, self._waiting.get((tenant, function), 1),
                                   time.monotonic())
        return await self._send(key, request)

    async def _send(self, key: str, request: LeaseRequest) -> tuple[LeaseRequest, m.CreditGrant]:
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        if key != request.lease_id:
            self._inflight[request.lease_id] = fut
        sent_at = time.monotonic()
        try:
            grant = await self.counting.lease(m.LeaseCredits(
                lease_id=request.lease_id, holder=self.holder, endpoint=self.endpoint, tenant=request.tenant,
                function=request.function, want=request.want, in_use=request.in_use,
                max_timeout_s=request.max_timeout_s, duration_s=self.wallet.lease_s,
            ))
            self.wallet.apply(request, grant, sent_at)
            fut.set_result((request, grant))
            return request, grant
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
        except FlintError as err:  # it expires anyway
            log.warning("credit_lease.release_failed", lease_id=request.lease_id, **error_fields(err))

    async def hand_back(self) -> None:
        """On a graceful stop: give the ledger back every credit lease nothing runs under, so the tenant's limit
        is whole again at once rather than after the leases expire."""
        releases = self.wallet.close_all()
        await asyncio.gather(*(self._send_release(r) for r in releases))
        log.info("credit_lease.handed_back", leases=len(releases))

    def revise(self, tenant: str) -> None:
        self.wallet.revise(tenant)
        self._wake.set()

    async def run(self) -> None:
        """Renew, shrink and return credit leases; never lets one lapse while it is in use and the ledger
        answers."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                renew, release = self.wallet.due(time.monotonic(), busy=set(self._inflight))
                for request in renew:
                    self._background.spawn(self._renew(request), name="credit-lease-renew")
                for request in release:
                    self._background.spawn(self._send_release(request), name="credit-lease-release")
        finally:
            self._background.cancel()

    async def _renew(self, request: LeaseRequest) -> None:
        try:
            await self._send(request.lease_id, request)
        except FlintError as err:
            log.warning("credit_lease.renew_failed", lease_id=request.lease_id, **error_fields(err))
