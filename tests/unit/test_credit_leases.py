"""The ledger and the frontends' wallets together, on a simulated clock: whatever the sequence of grants,
renewals, returns, expiries, limit and reservation changes, clock skews, crashed and paused frontends and
counting outages, no admission ever takes the executions in flight in a pool past its capacity.

One stated bound: a frontend that misses the push announcing a lower limit (it was paused) learns of it at its
next renewal, so for at most one lease after the change the bound is the higher of the old and new capacity."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from counting.state import UNRESERVED, Ledger
from frontend.credits import (
    MAX_ASKS,
    RECLAIM_WAITS_S,
    AdmissionRule,
    AskAgain,
    CreditWallet,
    Throttle,
    WaitFor,
)
from wire.errors import InvalidParameterValueException, Reason
from wire.messages import CreditGrant

LEASE_S = 3.0
TIMEOUT_S = 2.0


@dataclasses.dataclass
class Execution:
    holder: int
    pool: str
    ends_at: float
    ticket: object
    released: bool = False


class Region:
    """Frontends, the ledger, and executions, driven step by step."""

    def __init__(self, limit: int, unreserved_min: int = 1):
        self.ledger = Ledger(default_limit=limit, unreserved_min=unreserved_min, cold_start_allowance_s=0.0)
        self.now = 100.0
        self.wallets = {i: CreditWallet(f"fe{i}", lease_s=LEASE_S) for i in range(3)}
        self.generation = {i: 0 for i in range(3)}
        self.paused: set[int] = set()
        self.executions: list[Execution] = []
        self.admitted = 0
        self.skew = 0.0
        self.outage = False  # the counting service is unreachable: frontends live on the credits they hold
        self.history: list[tuple[float, str, int]] = []  # (when, pool, capacity) at each change
        self.missed_push_at: float | None = None

    # the ledger sees the proposer's clock, a little off from the frontends' (within the skew margin)
    def ledger_now(self) -> float:
        return self.now + self.skew

    def endpoint_of(self, i: int) -> str:
        return f"fe{i}"

    def send(self, i: int, request) -> dict | None:
        if self.outage:
            return None
        grant = self.ledger.cmd_lease(
            self.ledger_now(), request.lease_id, f"fe{i}", self.endpoint_of(i), "t", request.function,
            request.want, request.in_use, request.max_timeout_s, LEASE_S,
        )
        typed = CreditGrant.from_fields({k: v for k, v in grant.items() if k != "revise"})
        self.wallets[i].apply(request, typed, self.now)
        self.deliver(grant.get("revise", ()))
        return grant

    def deliver(self, endpoints) -> None:
        for endpoint in endpoints:
            i = int(endpoint[2:])
            if i in self.paused:
                self.missed_push_at = self.now  # a paused frontend misses the push
                continue
            self.wallets[i].revise("t")
            self.tick_holder(i)

    def tick_holder(self, i: int) -> None:
        renew, release = self.wallets[i].due(self.now)
        for r in renew:
            self.send(i, r)
        for r in release:
            if not self.outage:
                self.ledger.cmd_release(self.ledger_now(), r.lease_id, r.in_use)

    def in_flight(self, pool: str) -> int:
        return sum(1 for e in self.executions if e.pool == pool and e.ends_at > self.now)

    def admit(self, i: int, function: str, duration: float) -> None:
        if i in self.paused:
            return
        wallet = self.wallets[i]
        for _ in range(4):
            ticket = wallet.try_admit("t", function, TIMEOUT_S, self.now)
            if ticket is not None:
                break
            self.send(i, wallet.grow("t", function, TIMEOUT_S, 1, self.now))
        else:
            return  # throttled
        pool = self.ledger.pool_for("t", function)
        self.executions.append(Execution(i, pool, self.now + duration, ticket))
        self.admitted += 1
        capacity = self.ledger.capacity("t", pool)
        if self.missed_push_at is not None and self.now - self.missed_push_at <= LEASE_S:
            window = [c for (t, p, c) in self.history if p == pool and self.now - t <= LEASE_S + 0.5]
            capacity = max([capacity, *window])
        assert self.in_flight(pool) <= capacity, f"{self.in_flight(pool)} executions in pool {pool!r} > {capacity}"

    def record(self) -> None:
        for pool in {"", "r", *self.ledger.reserved.get("t", {})}:
            self.history.append((self.now, pool, self.ledger.capacity("t", pool)))

    def advance(self, dt: float) -> None:
        self.now += dt
        for e in self.executions:
            if e.ends_at <= self.now and not e.released and e.holder not in self.paused:
                if self.generation_of(e) == self.generation[e.holder]:
                    final = self.wallets[e.holder].release(e.ticket, self.now)
                    if final is not None and not self.outage:
                        self.ledger.cmd_release(self.ledger_now(), final.lease_id, 0)
                e.released = True
        for i in self.wallets:
            if i not in self.paused:
                self.tick_holder(i)

    def generation_of(self, e: Execution) -> int:
        return e.ticket.lease_id.count("!")  # a crashed holder's tickets belong to its old wallet

    def crash(self, i: int) -> None:
        """SIGKILL: the frontend's credits are simply gone; its executions run to their end on the workers."""
        self.generation[i] += 1
        for e in self.executions:
            if e.holder == i:
                e.released = True
        self.wallets[i] = CreditWallet(f"fe{i}" + "!" * self.generation[i], lease_s=LEASE_S)
        self.paused.discard(i)


actions = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 2), st.sampled_from(["f", "g", "r"]), st.floats(0.01, TIMEOUT_S)),
        st.tuples(st.just("advance"), st.floats(0.01, 4.0)),
        st.tuples(st.just("limit"), st.integers(3, 12)),
        st.tuples(st.just("reserve"), st.integers(0, 3)),
        st.tuples(st.just("unreserve")),
        st.tuples(st.just("crash"), st.integers(0, 2)),
        st.tuples(st.just("pause"), st.integers(0, 2)),
        st.tuples(st.just("resume"), st.integers(0, 2)),
        st.tuples(st.just("skew"), st.floats(-0.2, 0.2)),
        st.tuples(st.just("outage"), st.booleans()),
        st.tuples(st.just("burst"), st.integers(0, 2), st.integers(1, 8)),
    ),
    max_size=150,
)


@settings(max_examples=1500, deadline=None)
@given(actions)
def test_no_admission_ever_takes_a_pool_past_its_capacity(steps):
    region = Region(limit=6)
    for step in steps:
        kind = step[0]
        if kind == "admit":
            region.admit(step[1], step[2], step[3])
        elif kind == "advance":
            region.advance(step[1])
        elif kind == "limit":
            region.record()
            try:
                region.deliver(region.ledger.cmd_set_limit(region.ledger_now(), "t", step[1])["revise"])
            except InvalidParameterValueException:
                pass
        elif kind == "reserve":
            region.record()
            try:
                region.deliver(region.ledger.cmd_set_reserved(region.ledger_now(), "t", "r", step[1])["revise"])
            except InvalidParameterValueException:
                pass
        elif kind == "unreserve":
            region.record()
            if "r" in region.ledger.reserved.get("t", {}):
                region.deliver(region.ledger.cmd_set_reserved(region.ledger_now(), "t", "r", None)["revise"])
        elif kind == "crash":
            region.crash(step[1])
        elif kind == "outage":
            region.outage = step[1]
        elif kind == "burst":  # many executions that run to the function's timeout
            for _ in range(step[2]):
                region.admit(step[1], "f", TIMEOUT_S)
        elif kind == "pause":
            region.paused.add(step[1])
        elif kind == "resume":
            region.paused.discard(step[1])
        else:
            region.skew = step[1]


@settings(max_examples=200, deadline=None)
@given(actions)
def test_after_the_storm_every_credit_comes_back(steps):
    region = Region(limit=6)
    for step in steps:
        if step[0] == "admit":
            region.admit(step[1], step[2], step[3])
        elif step[0] == "advance":
            region.advance(step[1])
        elif step[0] == "crash":
            region.crash(step[1])
        elif step[0] == "pause":
            region.paused.add(step[1])
        elif step[0] == "outage":
            region.outage = step[1]
    region.paused.clear()
    region.outage = False
    # quiet: every execution ends, every frontend gives back idle leases, dead ones' leases pass free_at
    for _ in range(40):
        region.advance(0.5)
    ledger = region.ledger
    assert ledger.held("t", UNRESERVED, region.ledger_now()) == 0
    assert all(w.held()["credits"] == 0 for w in region.wallets.values())
    assert all(lease.free_at <= region.ledger_now() for lease in ledger.leases.values())  # only dead leftovers


# --- specific behaviours -------------------------------------------------------------------------------------------


def test_a_second_frontend_is_not_starved_by_idle_credits_elsewhere():
    region = Region(limit=10)
    for _ in range(10):
        region.admit(0, "f", 1.0)
    region.advance(1.5)  # all ten end; frontend 0 still holds the credits, idle
    assert region.wallets[0].held()["credits"] == 10
    region.admit(1, "f", 1.0)
    assert region.wallets[1].held()["in_use"] == 1, "the ledger asked frontend 0 to give back its idle credits"


def test_reserved_pool_throttles_with_its_own_reason_and_zero_means_off():
    ledger = Ledger(default_limit=1000, unreserved_min=100)
    ledger.cmd_set_reserved(0, "t", "r", 2)
    grant = ledger.cmd_lease(0, "L1", "fe", "e", "t", "r", 5, 0, 3, 3)
    assert grant["pool"] == "r" and grant["credits"] == 2
    assert ledger.capacity("t", UNRESERVED) == 998
    ledger.cmd_set_reserved(0, "t", "off", 0)
    assert ledger.cmd_lease(0, "L2", "fe", "e", "t", "off", 5, 0, 3, 3)["credits"] == 0


def test_reservations_keep_the_unreserved_minimum():
    ledger = Ledger(default_limit=1000, unreserved_min=100)
    ledger.cmd_set_reserved(0, "t", "a", 850)
    with pytest.raises(InvalidParameterValueException, match=r"minimum value of \[100\]"):
        ledger.cmd_set_reserved(0, "t", "b", 51)
    with pytest.raises(InvalidParameterValueException, match="fewer than 100 unreserved"):
        ledger.cmd_set_limit(0, "t", 900)


def test_lowering_the_limit_admits_nothing_new_until_use_falls_under_it():
    region = Region(limit=6)
    for _ in range(6):
        region.admit(0, "f", 1.9)
    region.deliver(region.ledger.cmd_set_limit(region.ledger_now(), "t", 2)["revise"])
    before = region.admitted
    region.admit(1, "f", 0.1)
    region.admit(0, "f", 0.1)
    assert region.admitted == before
    region.advance(2.0)  # all six end
    region.admit(1, "f", 0.1)
    assert region.admitted == before + 1


def test_a_dead_frontends_credits_return_only_after_expiry_plus_timeout():
    ledger = Ledger(default_limit=4, unreserved_min=0, cold_start_allowance_s=1.0)
    ledger.cmd_lease(0, "dead.1", "dead", "e", "t", "f", 4, 0, 5.0, 3.0)
    assert ledger.cmd_lease(2.0, "live.1", "live", "e2", "t", "f", 4, 0, 5.0, 3.0)["credits"] == 0
    assert ledger.cmd_lease(8.9, "live.2", "live", "e2", "t", "f", 4, 0, 5.0, 3.0)["credits"] == 0
    assert ledger.cmd_lease(9.0, "live.3", "live", "e2", "t", "f", 4, 0, 5.0, 3.0)["credits"] == 4  # 0+3+5+1


def test_a_lapsed_lease_is_not_renewed():
    ledger = Ledger()
    ledger.cmd_lease(0, "L", "fe", "e", "t", "f", 4, 0, 3, 3)
    assert ledger.cmd_lease(3.0, "L", "fe", "e", "t", "f", 4, 0, 3, 3)["renewed"] is False


def test_wallet_stops_admitting_before_the_ledgers_expiry():
    w = CreditWallet("fe", lease_s=3.0, skew_margin_s=0.25)
    req = w.grow("t", "f", 1.0, 1, now=10.0)
    w.apply(req, CreditGrant(lease_id=req.lease_id, renewed=True, pool="", credits=5, expires_at=13.0), sent_at=10.0)
    assert w.try_admit("t", "f", 1.0, 12.74) is not None
    assert w.try_admit("t", "f", 1.0, 12.75) is None
    assert w.try_admit("t", "f", 5.0, 11.0) is None  # a longer timeout than the lease declared needs a renewal


def test_a_frontend_cut_off_from_the_ledger_stops_admitting_before_its_lease_ends():
    region = Region(limit=4)
    region.admit(0, "f", 0.1)
    region.outage = True
    admitted = region.admitted
    region.advance(0.5)
    region.admit(0, "f", 0.1)
    assert region.admitted == admitted + 1  # static stability: it keeps admitting on credits it holds
    region.advance(LEASE_S)
    region.admit(0, "f", 0.1)
    assert region.admitted == admitted + 1  # ... but not once its lease could have lapsed at the ledger


def test_executions_of_a_frontend_that_dies_cut_off_keep_their_credits_until_they_must_have_ended():
    region = Region(limit=2)
    region.admit(0, "f", 0.1)  # frontend 0 takes a lease on the whole limit (a block of 2)
    region.outage = True
    region.advance(2.5)  # close to the end of the lease, which cannot be renewed
    for _ in range(2):
        region.admit(0, "f", TIMEOUT_S)  # these run past the lease's expiry
    region.crash(0)
    region.outage = False
    region.advance(0.6)  # the lease has expired at the ledger; the executions still run
    before = region.admitted
    region.admit(1, "f", 0.1)
    assert region.admitted == before, "credits of running executions were handed out again"


def test_when_every_frontend_hears_a_lower_limit_it_holds_at_once():
    region = Region(limit=6)
    for i in range(3):
        region.admit(i, "f", 1.9)
        region.admit(i, "f", 1.9)
    region.deliver(region.ledger.cmd_set_limit(region.ledger_now(), "t", 3)["revise"])
    before = region.admitted
    region.advance(0.5)
    for i in range(3):
        region.admit(i, "f", 0.1)
    assert region.admitted == before  # six still run under a limit of three: nothing new
    region.advance(1.5)  # all six have ended
    for i in range(3):
        region.admit(i, "f", 0.1)
    assert region.admitted == before + 3


# --- what an admission does with each answer from the ledger -------------------------------------------------------

grants = st.builds(
    lambda renewed, pool, credits, reclaimable, target: CreditGrant(
        lease_id="L", renewed=renewed, pool=pool, credits=credits, expires_at=0.0, reclaimable=reclaimable,
        target=target),
    st.booleans(), st.sampled_from(["", "reserved-fn"]), st.integers(0, 20), st.integers(0, 5),
    st.one_of(st.none(), st.integers(0, 20)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(grants, st.integers(1, 20)), min_size=1, max_size=40))
def test_an_admission_asks_again_waits_for_reclaimed_credits_or_throttles_and_never_loops_forever(answers):
    rule = AdmissionRule("fn")
    waited = 0.0
    for asks, (grant, wanted) in enumerate(answers, start=1):
        step = rule.after(grant, wanted)
        if isinstance(step, Throttle):
            # a throttle names the pool that is full, as Lambda does
            assert step.error.reason == (Reason.RESERVED_LIMIT if grant.pool else Reason.CONCURRENT_LIMIT)
            got_all = grant.renewed and grant.credits >= wanted
            coming_back = grant.reclaimable or grant.target is not None or not grant.renewed
            assert asks == MAX_ASKS or (not got_all and (not coming_back or rule.waits == len(RECLAIM_WAITS_S)))
            return
        assert asks < MAX_ASKS  # bounded: at most MAX_ASKS commits per admission
        if isinstance(step, WaitFor):
            assert not (grant.renewed and grant.credits >= wanted)
            waited += step.seconds
        else:
            assert isinstance(step, AskAgain) and grant.renewed and grant.credits >= wanted
    assert waited <= sum(RECLAIM_WAITS_S)  # never waits longer than the reclaim ladder
