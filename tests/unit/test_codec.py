import msgpack
import pytest

from wire import codec
from wire.errors import InvalidRequestContentException, RequestTooLargeException


def test_header_and_raw_payload_round_trip():
    frames = codec.encode({"v": 1, "op": "invoke"}, b"\x00raw bytes, never msgpack-parsed")
    header, payload = codec.decode(frames, max_payload_bytes=1024)
    assert header == {"v": 1, "op": "invoke"}
    assert payload == b"\x00raw bytes, never msgpack-parsed"


@pytest.mark.parametrize(
    "frames",
    [[], [b"\xc1"], [msgpack.packb([1, 2])], [msgpack.packb({1: 2})], [b"a", b"b", b"c"],
     [msgpack.packb({"a": 1}) + b"trailing"]],
)
def test_malformed_headers_are_invalid_request_content(frames):
    with pytest.raises(InvalidRequestContentException):
        codec.decode(frames, max_payload_bytes=1024)


def test_oversized_header_and_payload_are_request_too_large():
    with pytest.raises(RequestTooLargeException):
        codec.decode([b"\x80" + b"x" * codec.MAX_HEADER_BYTES], max_payload_bytes=10)
    with pytest.raises(RequestTooLargeException, match="payload of 11 bytes"):
        codec.decode([codec.pack({"v": 1}), b"x" * 11], max_payload_bytes=10)


def test_a_small_frame_cannot_claim_a_huge_container():
    # a map header claiming 2**32-1 entries in 5 bytes must be refused, not allocated
    with pytest.raises(InvalidRequestContentException):
        codec.decode([b"\xdf\xff\xff\xff\xff"], max_payload_bytes=10)


def test_errors_keep_their_name_reason_and_whether_to_retry_across_the_wire():
    from wire.errors import ServiceException, TooManyRequestsException, from_reply

    final = from_reply(ServiceException("ran once", reason="AlreadyStarted", retryable=False).to_wire())
    assert (final.type_name, final.reason, final.retryable) == ("ServiceException", "AlreadyStarted", False)
    assert from_reply(ServiceException("blip").to_wire()).retryable
    throttled = from_reply(TooManyRequestsException("busy", reason="ConcurrentInvocationLimitExceeded").to_wire())
    assert isinstance(throttled, TooManyRequestsException) and throttled.retryable
