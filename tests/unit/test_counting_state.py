"""The concurrency ledger: never more slots than the limit, whatever the order of events."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from counting.state import CountingState
from wire.errors import TooManyRequestsException


def test_admits_up_to_the_limit_then_throttles_with_the_lambda_reason():
    s = CountingState()
    s.cmd_set_limit(0, "t", 2)
    s.cmd_acquire(0, "t", "a", 10)
    s.cmd_acquire(0, "t", "b", 10)
    with pytest.raises(TooManyRequestsException) as err:
        s.cmd_acquire(0, "t", "c", 10)
    assert err.value.reason == "ConcurrentInvocationLimitExceeded"
    s.cmd_release(1, "t", "a")
    assert s.cmd_acquire(1, "t", "c", 10) == 2


def test_acquire_is_idempotent_per_slot_id():
    s = CountingState(default_limit=1)
    assert s.cmd_acquire(0, "t", "a", 10) == 1
    assert s.cmd_acquire(0, "t", "a", 10) == 1  # a retried command must not take a second slot


def test_tenants_are_counted_apart():
    s = CountingState(default_limit=1)
    s.cmd_acquire(0, "t1", "a", 10)
    s.cmd_acquire(0, "t2", "a", 10)
    assert s.in_use("t1", 0) == 1 and s.in_use("t2", 0) == 1


def test_a_lost_release_frees_the_slot_only_after_its_hold_time():
    s = CountingState(default_limit=1)
    s.cmd_acquire(0, "t", "a", hold_s=5)
    with pytest.raises(TooManyRequestsException):
        s.cmd_acquire(4.9, "t", "b", 5)
    assert s.cmd_acquire(5.0, "t", "b", 5) == 1


def test_lowering_the_limit_below_use_admits_nothing_new():
    s = CountingState()
    for i in range(5):
        s.cmd_acquire(0, "t", f"s{i}", 100)
    s.cmd_set_limit(0, "t", 3)
    with pytest.raises(TooManyRequestsException):
        s.cmd_acquire(0, "t", "new", 100)
    for i in range(3):
        s.cmd_release(0, "t", f"s{i}")
    assert s.cmd_acquire(0, "t", "new", 100) == 3


ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 30), st.floats(0.1, 20)),
        st.tuples(st.just("release"), st.integers(0, 30), st.just(0.0)),
        st.tuples(st.just("limit"), st.integers(0, 12), st.just(0.0)),
        st.tuples(st.just("tick"), st.just(0), st.floats(0, 10)),
    ),
    max_size=120,
)


@settings(max_examples=400)
@given(ops)
def test_a_grant_never_takes_live_slots_past_the_limit(sequence):
    s = CountingState(default_limit=8)
    now = 0.0
    for op, n, x in sequence:
        if op == "acquire":
            before = s.in_use("t", now)
            held = s.slots.get("t", {}).get(f"slot{n}", 0) > now  # a retry of a grant already made
            try:
                s.cmd_acquire(now, "t", f"slot{n}", x)
            except TooManyRequestsException:
                assert before >= s.limit("t")
            else:
                assert held or s.in_use("t", now) <= s.limit("t")  # a grant never takes use past the limit
        elif op == "release":
            s.cmd_release(now, "t", f"slot{n}")
        elif op == "limit":
            s.cmd_set_limit(now, "t", n)
        else:
            now += x
