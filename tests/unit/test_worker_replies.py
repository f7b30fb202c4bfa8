"""The checks on what a sandbox answers (worker/replies.py): whatever a handler writes on its channel is either a
reply the worker can always carry to the frontend, or InvalidResponse; never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import messages as m
from worker.replies import (
    ERROR_MESSAGE_MAX_CHARS,
    FRAME_MAX_BYTES,
    LOG_TAIL_CHARS,
    InvalidResponse,
    Reply,
    frame_length,
    init_reply,
    invoke_reply,
)

# what msgpack can decode into, kinds and nesting included
plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
reply_like = st.fixed_dictionaries(
    {"t": st.sampled_from(["result", "error", "ready", "init_error", "other"]) | plain},
    optional={"payload": plain, "log": plain, "retire": plain,
              "error": plain | st.fixed_dictionaries({"errorType": plain, "errorMessage": plain},
                                                     optional={"stackTrace": plain})},
)


def carried(reply: Reply) -> m.RunResult:
    result = m.RunResult(executed_version="$LATEST", function_error="Unhandled" if reply.function_error else None,
                         log_tail=reply.log, payload=reply.payload)
    return result.checked()


@settings(max_examples=2000, deadline=None)
@given(st.one_of(plain, reply_like))
def test_any_message_is_a_reply_the_worker_can_carry_or_invalid_response(msg):
    try:
        reply = invoke_reply(msg)
    except InvalidResponse as exc:
        assert str(exc)
        return
    carried(reply)
    if reply.function_error:
        assert isinstance(json.loads(reply.payload)["errorType"], str)


@settings(max_examples=500, deadline=None)
@given(st.one_of(plain, reply_like))
def test_any_first_message_is_ready_an_init_error_or_invalid_response(msg):
    try:
        error = init_reply(msg)
    except InvalidResponse:
        return
    assert error is None or isinstance(error["errorType"], str)


def test_the_runtimes_own_replies_pass_unchanged():
    assert invoke_reply({"t": "result", "payload": b'{"a": 1}'}) == Reply(b'{"a": 1}', False)
    assert invoke_reply({"t": "result", "payload": b""}).payload == b"null"
    error = {"errorType": "ValueError", "errorMessage": "bad", "stackTrace": ["  File x, line 1"]}
    got = invoke_reply({"t": "error", "error": error, "log": "tail", "retire": True})
    assert json.loads(got.payload) == error and got.function_error and got.log == "tail" and got.retire
    assert init_reply({"t": "ready"}) is None
    assert init_reply({"t": "init_error", "error": {"errorType": "Runtime.ImportModuleError",
                                                    "errorMessage": "no"}})["errorType"] == "Runtime.ImportModuleError"


@pytest.mark.parametrize("msg, complaint", [
    ({"t": "result", "payload": "text"}, "str, not bytes"),
    ({"t": "result", "payload": b"1", "log": {}}, "log tail is dict"),
    ({"t": "result", "payload": b"1" * (m.SYNC_PAYLOAD_MAX_BYTES + 1)}, "over the 6291456-byte limit"),
    ({"t": "error", "error": {"errorType": b"x", "errorMessage": "m"}}, "must be text"),
    ({"t": "error", "error": "boom"}, "str, not a map"),
    ({"t": "surprise"}, "'surprise' where a result or an error belongs"),
    ([1, 2], "list where a map belongs"),
    ({"t": "result", "payload": b"1", "retire": "yes"}, "retire flag is str"),
])
def test_what_no_runtime_sends_is_invalid_response_saying_why(msg, complaint):
    with pytest.raises(InvalidResponse, match=complaint.replace("(", r"\(")):
        invoke_reply(msg)


def test_long_logs_messages_and_stacks_are_cut_to_fit_a_response():
    huge = "é" * (m.SYNC_PAYLOAD_MAX_BYTES // 2)
    got = invoke_reply({"t": "error", "log": "x" * 10_000, "error": {
        "errorType": "E" * 1000, "errorMessage": huge, "stackTrace": [huge[:10_000]] * 1000}})
    error = json.loads(got.payload)
    assert len(got.log) == LOG_TAIL_CHARS and len(error["errorType"]) == 256
    assert error["errorMessage"].startswith("é" * ERROR_MESSAGE_MAX_CHARS) and "characters cut" in error["errorMessage"]
    assert len(error["stackTrace"]) == 50
    carried(got)


def test_a_frame_longer_than_any_reply_is_refused_before_it_is_read():
    assert frame_length(FRAME_MAX_BYTES) == FRAME_MAX_BYTES
    with pytest.raises(InvalidResponse, match="announced a frame"):
        frame_length(FRAME_MAX_BYTES + 1)
