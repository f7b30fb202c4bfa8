"""The async event queue: at least once, retries, age, dead letters, redrive, and what it keeps: per-tenant quotas
on events not yet run and on dead letters, payloads gone when done, retention of finished events."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from registry.events import DLQ, DONE, EVENT_RECORD_BYTES, INFLIGHT, QUEUED, EventLimits, EventQueue
from registry.state import ControlState
from wire.errors import Reason, TooManyRequestsException

KB = 1024
LIMITS = EventLimits(queued_bytes=100 * KB, dlq_bytes=50 * KB, done_retention_s=60, dlq_retention_s=600,
                     retry_backoff_s=1.0)


def put(q, now, event_id, retries=2, max_age=3600.0, tenant="t", size=2):
    return q.put(now, event_id=event_id, tenant=tenant, function="f", qualifier=None, payload=b"x" * size,
                 max_retries=retries, max_age_s=max_age)


def fail(q, now, event_id):
    q.take(now, "p", 100, 30)
    q.settle(now, "p", [{"event_id": event_id, "outcome": "function_error", "error": {"errorType": "E"}}])


def test_put_is_idempotent_and_take_hides_an_event_until_its_visibility_passes():
    q = EventQueue(LIMITS)
    put(q, 0, "e1")
    put(q, 0, "e1")
    assert len(q.events) == 1
    assert [e["event_id"] for e in q.take(0, "p1", 10, visibility_s=5)] == ["e1"]
    assert q.take(1, "p2", 10, visibility_s=5) == []
    again = q.take(5.0, "p2", 10, visibility_s=5)  # p1 went quiet: delivered again (at least once)
    assert [e["event_id"] for e in again] == ["e1"] and q.events["e1"].deliveries == 2
    q.settle(6, "p1", [{"event_id": "e1", "outcome": "function_error"}])  # p1 is not the holder any more
    assert q.events["e1"].state == INFLIGHT and q.events["e1"].attempts == 0
    q.settle(6, "p1", [{"event_id": "e1", "outcome": "ok"}])  # but its success counts
    assert q.events["e1"].state == DONE and q.events["e1"].payload == b""


def test_function_errors_use_retries_with_backoff_then_dead_letter():
    q = EventQueue(LIMITS)
    put(q, 0, "e1", retries=2)
    now = 0.0
    for attempt, wait in ((1, 1.0), (2, 2.0)):
        fail(q, now, "e1")
        assert q.events["e1"].state == QUEUED and q.events["e1"].attempts == attempt
        assert q.take(now + wait - 0.01, "p", 1, 30) == []  # waits its backoff
        now += wait
    fail(q, now, "e1")
    assert q.events["e1"].state == DLQ and q.events["e1"].last_error == {"errorType": "E"}


def test_throttles_and_system_errors_wait_without_using_retries_but_age_still_counts():
    q = EventQueue(LIMITS, throttle_backoff_s=0.1)
    put(q, 0, "e1", retries=0, max_age=10)
    now = 0.0
    for _ in range(5):
        taken = q.take(now, "p", 1, 30)
        if taken:
            q.settle(now, "p", [{"event_id": "e1", "outcome": "throttled"}])
        now += 1.0
    assert q.events["e1"].state == QUEUED and q.events["e1"].attempts == 0
    assert q.take(11.0, "p", 1, 30) == [] and q.events["e1"].state == DLQ
    assert q.events["e1"].last_error["errorType"] == "EventAgeExceeded"


def test_redrive_brings_dead_letters_back_with_fresh_retries():
    q = EventQueue(LIMITS)
    put(q, 0, "e1", retries=0)
    fail(q, 0, "e1")
    assert q.events["e1"].state == DLQ
    assert q.redrive(5, "other-tenant") == 0
    assert q.redrive(5, "t") == 1
    assert q.events["e1"].state == QUEUED and q.events["e1"].attempts == 0
    assert [e["event_id"] for e in q.take(5, "p", 1, 30)] == ["e1"]


def test_a_tenant_at_its_quota_is_refused_and_another_is_not():
    q = EventQueue(LIMITS)
    cost = 30 * KB + EVENT_RECORD_BYTES
    for i in range(3):  # 3 x 31 KB of 100 KB
        put(q, 0, f"a{i}", tenant="a", size=30 * KB)
    with pytest.raises(TooManyRequestsException) as refused:
        put(q, 0, "a3", tenant="a", size=30 * KB)
    assert refused.value.reason == Reason.EVENT_QUEUE_FULL and "93 KB" in refused.value.message
    assert "a3" not in q.events and q.counts("a")["queued_bytes"] == 3 * cost
    put(q, 0, "b0", tenant="b", size=30 * KB)  # another tenant's queue is its own
    put(q, 0, "a0", tenant="a", size=30 * KB)  # a retry of an accepted event is that event, full or not
    put(q, 0, "a-small", tenant="a", size=5 * KB)  # what still fits is taken
    q.take(0, "p", 100, 30)
    q.settle(1, "p", [{"event_id": "a0", "outcome": "ok"}])  # run: its room is free again
    put(q, 1, "a3", tenant="a", size=30 * KB)


def test_a_done_event_keeps_no_payload_and_a_take_carries_none():
    q = EventQueue(LIMITS)
    put(q, 0, "e1", size=10 * KB)
    taken = q.take(0, "p", 1, 30)
    assert "payload" not in taken[0] and taken[0]["payload_bytes"] == 10 * KB
    assert q.payload("e1") == b"x" * 10 * KB  # what the registry service reads for the poller
    q.settle(1, "p", [{"event_id": "e1", "outcome": "ok"}])
    assert q.events["e1"].payload == b"" and q.payload("e1") is None
    assert q.get("t", "e1")["payload_bytes"] == 10 * KB and q.counts("t")["queued_bytes"] == 0


def test_past_its_quota_a_tenants_oldest_dead_letters_go():
    q = EventQueue(LIMITS)  # 50 KB of dead letters: four of 11 KB
    for i in range(6):
        put(q, i, f"d{i}", retries=0, size=10 * KB)
        fail(q, i, f"d{i}")
    put(q, 0, "other", retries=0, tenant="u", size=10 * KB)
    fail(q, 10, "other")
    dead = [e["event_id"] for e in q.list("t", DLQ)]
    assert sorted(dead) == ["d2", "d3", "d4", "d5"] and q.counts("t")["dlq_dropped"] == 2
    assert q.counts("t")["dlq_bytes"] <= LIMITS.dlq_bytes and q.events["d5"].payload  # kept whole, to redrive
    assert q.list("u", DLQ)[0]["event_id"] == "other"  # another tenant's dead letters are its own


def test_finished_events_go_after_their_retention_and_unfinished_ones_never():
    q = EventQueue(EventLimits(done_retention_s=60, dlq_retention_s=600))
    for i in range(100):
        put(q, 0, f"done{i}")
    put(q, 0, "pending")
    put(q, 0, "dead", retries=0)
    q.take(0, "p", 102, 30)
    q.settle(1, "p", [{"event_id": f"done{i}", "outcome": "ok"} for i in range(100)])
    q.settle(2, "p", [{"event_id": "dead", "outcome": "function_error"}])
    assert not q.expiring(61) and q.expire(61) == 0
    assert q.expiring(61.5)
    assert q.expire(61.5) == 100 and set(q.events) == {"pending", "dead"}
    assert not q.expiring(602) and q.expiring(602.5)
    put(q, 602.5, "new")  # an accept expires what is due too
    assert set(q.events) == {"pending", "new"} and q.events["pending"].state == INFLIGHT
    assert q.counts("t")["dlq_bytes"] == 0


def test_a_redrive_takes_what_the_quota_has_room_for_and_refuses_when_none():
    q = EventQueue(EventLimits(queued_bytes=50 * KB, dlq_bytes=100 * KB))
    for i in range(4):
        put(q, i, f"d{i}", retries=0, size=20 * KB)
        fail(q, i, f"d{i}")
    put(q, 10, "busy", size=20 * KB)
    assert q.redrive(11, "t") == 1  # room for one more of 21 KB beside the 21 KB queued
    assert q.events["d0"].state == QUEUED  # the oldest first
    with pytest.raises(TooManyRequestsException):
        q.redrive(11, "t")
    assert q.counts("t")[DLQ] == 3


def test_a_batch_of_accepts_refuses_each_on_its_own_and_limits_are_replicated():
    state = ControlState()
    state.cmd_set_limits(0, events={**LIMITS.__dict__, "queued_bytes": 10 * KB}, code_storage_bytes=KB)
    assert state.limits()["events"]["queued_bytes"] == 10 * KB and state.code.quota_bytes == KB
    item = {"tenant": "a", "function": "f", "payload": b"x" * 8 * KB}
    out = state.cmd_events_put_many(0, [{**item, "event_id": "a1"}, {**item, "event_id": "a2"},
                                        {**item, "event_id": "b1", "tenant": "b"}])
    assert out[0]["event"]["event_id"] == "a1" and out[2]["event"]["event_id"] == "b1"
    assert out[1]["error"]["type"] == "TooManyRequestsException"
    assert out[1]["error"]["reason"] == "EventQueueLimitExceeded"


# --- any sequence of accepts, takes, outcomes, redrives and time keeps the books and the bounds --------------------

TENANTS = ("a", "b", "c")


class QueueMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.q = EventQueue(EventLimits(queued_bytes=40 * KB, dlq_bytes=25 * KB, done_retention_s=30,
                                        dlq_retention_s=90, retry_backoff_s=1.0), throttle_backoff_s=0.5)
        self.now = 0.0
        self.ids = 0

    def _usage(self, tenant, states):
        return sum(e.cost for e in self.q.events.values() if e.tenant == tenant and e.state in states)

    @rule(tenant=st.sampled_from(TENANTS), kb=st.sampled_from([0, 1, 4, 12, 20]), retries=st.integers(0, 2))
    def accept(self, tenant, kb, retries):
        self.ids += 1
        before = {t: self._usage(t, (QUEUED, INFLIGHT)) for t in TENANTS}
        self.q.expire(self.now)  # what an accept does first
        fits = before[tenant] + kb * KB + EVENT_RECORD_BYTES <= self.q.limits.queued_bytes
        try:
            put(self.q, self.now, f"e{self.ids}", retries=retries, max_age=200, tenant=tenant, size=kb * KB)
            assert fits, "accepted past the quota"
        except TooManyRequestsException:
            assert not fits, f"refused with room: {before}"
        for other in set(TENANTS) - {tenant}:  # one tenant's accept never changes another's room
            assert self._usage(other, (QUEUED, INFLIGHT)) == before[other]

    @rule(limit=st.integers(1, 5))
    def take(self, limit):
        for view in self.q.take(self.now, "p", limit, visibility_s=10):
            assert "payload" not in view and self.q.payload(view["event_id"]) is not None

    @rule(outcome=st.sampled_from(["ok", "function_error", "throttled", "fatal", "extend"]), pick=st.integers(0, 50))
    def settle(self, outcome, pick):
        inflight = sorted(e for e, ev in self.q.events.items() if ev.state == INFLIGHT)
        if inflight:
            self.q.settle(self.now, "p", [{"event_id": inflight[pick % len(inflight)], "outcome": outcome,
                                           "visibility_s": 10}])

    @rule(tenant=st.sampled_from(TENANTS))
    def redrive(self, tenant):
        dead = self._usage(tenant, (DLQ,))
        try:
            moved = self.q.redrive(self.now, tenant)
            assert moved > 0 or dead == 0
        except TooManyRequestsException:
            assert dead > 0

    @rule(seconds=st.sampled_from([0.5, 3, 20, 45]))
    def time_passes(self, seconds):
        self.now += seconds

    @rule()
    def expire(self):
        self.q.expire(self.now)
        assert not self.q.expiring(self.now)
        for e in self.q.events.values():
            if e.state == DONE:
                assert self.now - e.settled_at <= self.q.limits.done_retention_s
            if e.state == DLQ:
                assert self.now - e.settled_at <= self.q.limits.dlq_retention_s

    @invariant()
    def books_match_the_events_and_stay_within_the_quotas(self):
        for t in TENANTS:
            queued, dead = self._usage(t, (QUEUED, INFLIGHT)), self._usage(t, (DLQ,))
            assert self.q.queued_bytes.get(t, 0) == queued <= self.q.limits.queued_bytes
            assert self.q.dlq_bytes.get(t, 0) == dead <= self.q.limits.dlq_bytes
            dlq_ids = {e.event_id for e in self.q.events.values() if e.tenant == t and e.state == DLQ}
            assert set(self.q._dead_letters.get(t, {})) == dlq_ids

    @invariant()
    def a_done_event_holds_no_payload(self):
        assert all(e.payload == b"" for e in self.q.events.values() if e.state == DONE)


QueueMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_any_sequence_keeps_the_books_and_the_bounds = QueueMachine.TestCase
