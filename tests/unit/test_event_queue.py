"""The async event queue: at least once, retries, age, dead letters, redrive, and bounded memory."""

from registry.events import DLQ, DONE, DONE_RETENTION_S, INFLIGHT, QUEUED, EventQueue


def put(q, now, event_id, retries=2, max_age=3600.0):
    return q.put(now, event_id=event_id, tenant="t", function="f", qualifier=None, payload=b"{}",
                 max_retries=retries, max_age_s=max_age)


def test_put_is_idempotent_and_take_hides_an_event_until_its_visibility_passes():
    q = EventQueue(retry_backoff_s=1.0)
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
    q = EventQueue(retry_backoff_s=1.0)
    put(q, 0, "e1", retries=2)
    now = 0.0
    for attempt, wait in ((1, 1.0), (2, 2.0)):
        q.take(now, "p", 1, 30)
        q.settle(now, "p", [{"event_id": "e1", "outcome": "function_error", "error": {"errorType": "E"}}])
        assert q.events["e1"].state == QUEUED and q.events["e1"].attempts == attempt
        assert q.take(now + wait - 0.01, "p", 1, 30) == []  # waits its backoff
        now += wait
    q.take(now, "p", 1, 30)
    q.settle(now, "p", [{"event_id": "e1", "outcome": "function_error", "error": {"errorType": "E"}}])
    assert q.events["e1"].state == DLQ and q.events["e1"].last_error == {"errorType": "E"}


def test_throttles_and_system_errors_wait_without_using_retries_but_age_still_counts():
    q = EventQueue(retry_backoff_s=1.0, throttle_backoff_s=0.1)
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
    q = EventQueue(retry_backoff_s=1.0)
    put(q, 0, "e1", retries=0)
    q.take(0, "p", 1, 30)
    q.settle(0, "p", [{"event_id": "e1", "outcome": "function_error"}])
    assert q.events["e1"].state == DLQ
    assert q.redrive(5, "other-tenant") == 0
    assert q.redrive(5, "t") == 1
    assert q.events["e1"].state == QUEUED and q.events["e1"].attempts == 0
    assert [e["event_id"] for e in q.take(5, "p", 1, 30)] == ["e1"]


def test_finished_events_are_forgotten_after_their_retention_unfinished_never():
    q = EventQueue(retry_backoff_s=1.0)
    for i in range(100):
        put(q, 0, f"done{i}")
    put(q, 0, "pending")
    q.take(0, "p", 101, 30)
    q.settle(1, "p", [{"event_id": f"done{i}", "outcome": "ok"} for i in range(100)])
    put(q, DONE_RETENTION_S + 2, "new")
    assert set(q.events) == {"pending", "new"}
    assert q.counts()[DONE] == 0 and q.events["pending"].state == INFLIGHT
