"""The envelope: routing frames, one msgpack header map, optionally one raw frame.

The raw frame (an invoke payload, a code zip) is never parsed by msgpack. Every size is checked before a byte of
the header is unpacked, and the unpacker itself is bounded, so a hostile frame costs at most its own length.
"""

from __future__ import annotations

from typing import Any

import msgpack

from wire.errors import InvalidRequestContentException, RequestTooLargeException

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # a request's header: what any caller may send a server
MAX_REPLY_HEADER_BYTES = 16 * 1024 * 1024  # a reply's header (a listing of many events): from a server we chose


def _limits(max_header_bytes: int) -> dict[str, int]:
    """Bounds for the msgpack unpacker: no header needs more, and they stop a small frame from claiming gigabytes."""
    entries = max(4096, max_header_bytes // 16)
    return dict(max_str_len=max_header_bytes, max_bin_len=max_header_bytes, max_array_len=entries,
                max_map_len=entries, max_ext_len=0)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Unpack one header map; anything that is not exactly one valid msgpack object is refused."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, **_limits(max_header_bytes))
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise InvalidRequestContentException(f"header is not a valid msgpack map: {exc}") from None


def encode(header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    frames = [pack(header)]
    if payload is not None:
        frames.append(payload)
    return frames


def decode(frames: list[bytes], *, max_payload_bytes: int,
           max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], bytes | None]:
    """Split [header, payload?] into (header map, payload). Raises the Lambda error a caller should see."""
    if not frames or len(frames) > 2:
        raise InvalidRequestContentException(f"expected 1 or 2 frames after routing, got {len(frames)}")
    head = frames[0]
    if len(head) > max_header_bytes:
        raise RequestTooLargeException(f"header of {len(head)} bytes exceeds the {max_header_bytes}-byte limit")
    payload = frames[1] if len(frames) == 2 else None
    if payload is not None and len(payload) > max_payload_bytes:
        raise RequestTooLargeException(
            f"payload of {len(payload)} bytes exceeds the {max_payload_bytes}-byte limit for this operation"
        )
    header = unpack(head, max_header_bytes)
    if not isinstance(header, dict):
        raise InvalidRequestContentException(f"header must be a map, got {type(header).__name__}")
    return header, payload
