"""The bounds on what a Raft peer may send (wire/raft_transport.py): the frame rule on its own, the sizes of what
pysyncobj really sends, and a real three-replica group whose port is flooded by someone without the secret."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import structlog
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj.encryptor import getEncryptor
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import TcpConnection

from tests.conftest import fresh_base_ip
from tests.support.wait import wait_until_async
from tests.unit.test_raft import close, make_group, wait_leader
from wire.errors import RequestTooLargeException
from wire.raft import COMMAND_ENVELOPE_BYTES, _encoded_size
from wire.raft_transport import (
    COMMAND_MAX_BYTES,
    FRAME_MAX_BYTES,
    HANDSHAKE_FRAME_MAX_BYTES,
    FrameGuard,
    FrameRefused,
)

MiB = 1024 * 1024


def frame(length: int, body: bytes | None = None) -> bytes:
    return struct.pack("i", length) + (body if body is not None else b"x" * length)


def guard(**kw) -> FrameGuard:
    return FrameGuard("10.0.0.9:5555", handshake_frames=kw.pop("handshake_frames", 2), opened=0.0, **kw)


def read_all(g: FrameGuard, data: bytes, chunk: int = 65536) -> int:
    """Read `data` as pysyncobj would through the guard; how many bytes it let through."""
    pos = 0
    while pos < len(data):
        n = g.allowance(min(chunk, len(data) - pos))
        if n == 0:
            break
        g.feed(data[pos:pos + n])
        pos += n
    return pos


def test_before_the_handshake_is_checked_only_its_frames_are_read():
    g = guard()
    handshake = frame(200) + frame(300)
    assert read_all(g, handshake + frame(50_000)) == len(handshake)  # the third waits
    g.authenticated = True
    assert read_all(g, frame(50_000) + frame(FRAME_MAX_BYTES, b"")) == 4 + 50_000 + 4


@pytest.mark.parametrize("length", [2**31 - 1, HANDSHAKE_FRAME_MAX_BYTES + 1, 0, -5])
def test_a_handshake_frame_out_of_bounds_is_refused_at_its_length(length):
    g = guard()
    with pytest.raises(FrameRefused, match="cluster secret"):
        read_all(g, frame(200) + struct.pack("i", length))


@pytest.mark.parametrize("length", [FRAME_MAX_BYTES + 1, 2**31 - 1, 0, -1])
def test_after_the_handshake_a_frame_is_bounded_too(length):
    g = guard(authenticated=True)
    with pytest.raises(FrameRefused, match="at most"):
        g.feed(struct.pack("i", length))


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=20), st.lists(st.integers(1, 9000), min_size=1))
def test_frames_split_anywhere_are_followed(lengths, cuts):
    g = guard(authenticated=True)
    stream = b"".join(frame(n) for n in lengths)
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        g.feed(stream[pos:pos + step])
        pos, i = pos + step, i + 1
    with pytest.raises(FrameRefused):  # what follows is read as the next length: the guard kept count
        g.feed(struct.pack("i", -1))


def sent_frame(message, *, key: bytes | None = None) -> int:
    """The length pysyncobj's own TcpConnection writes for `message`, sealed with a cluster secret."""
    a, b = socket.socketpair()
    a.setblocking(False)  # as pysyncobj's own sockets: what does not fit waits in its buffer
    try:
        conn = TcpConnection(poller=createPoller("poll"), socket=a)
        conn.encryptor = getEncryptor("secret")
        conn.sendRandKey = key
        conn.send(message)
        b.settimeout(5)
        (length,) = struct.unpack("i", b.recv(4))
        return length
    finally:
        a.close()
        b.close()


def test_what_pysyncobj_sends_fits_the_bounds():
    key = os.urandom(32)
    handshake = [sent_frame(os.urandom(32)), sent_frame("127.100.200.255:65535", key=key),
                 sent_frame(["add", "127.100.200.255:65535"], key=key), sent_frame((key, os.urandom(32)), key=key)]
    assert max(handshake) * 4 < HANDSHAKE_FRAME_MAX_BYTES, handshake
    # The largest frame: a log append of a small entry and the largest command, its payload incompressible.
    payload = os.urandom(1 * MiB)
    args = {"items": [{"payload": payload, "event_id": "ev-" + "a" * 60}] * 2}
    command = b"\x00" + pysyncobj_pickle.dumps((3, ("r" * 64, time.time(), "events_put_many", args), {}))
    assert COMMAND_ENVELOPE_BYTES + _encoded_size(args) >= len(command)  # submit's estimate errs high
    append = {"type": "append_entries", "term": 3, "commit_index": 9, "prevLogIdx": 7, "prevLogTerm": 3,
              "entries": [(b"x" * 60_000, 8, 3), (command, 9, 3)]}
    ratio = sent_frame(append, key=key) / (len(command) + 60_000)
    assert (COMMAND_MAX_BYTES + 64 * 1024) * ratio < FRAME_MAX_BYTES / 2, ratio  # measured: with room
    assert (COMMAND_MAX_BYTES + 65 * 1024) * 2 * 1.001 * 4 / 3 < FRAME_MAX_BYTES  # at worst, still in


def hostile(address: str, data: bytes, wait_s: float = 3.0) -> float:
    """Seconds until the peer closed on us after `data` (infinity if it did not within `wait_s`)."""
    host, port = address.rsplit(":", 1)
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        try:
            sock.sendall(data)
            while sock.recv(65536):
                pass
        except TimeoutError:
            return float("inf")
        except OSError:
            pass
        return time.monotonic() - start


def test_a_flooded_replica_cuts_the_flood_and_keeps_its_term(tmp_path):
    async def run():
        groups = make_group(tmp_path, fresh_base_ip())
        try:
            await wait_leader(groups)
            terms = [g.status().term for g in groups]
            junk = os.urandom(8 * MiB)
            for target in groups:
                address = target.config.self_address
                assert hostile(address, struct.pack("i", 2**31 - 1) + junk) < 1.0
                assert hostile(address, junk) < 1.0
            # one that says nothing is closed at the handshake deadline
            assert hostile(groups[0].config.self_address, b"", wait_s=5.0) < 4.0
            for i in range(20):
                assert await groups[i % 3].submit("add", {"value": i}, request_id=f"r{i}") == i + 1
            assert [g.status().term for g in groups] == terms
        finally:
            close(groups)

    uvloop.run(run())


def test_a_node_with_another_secret_is_cut_off_and_named(tmp_path):
    async def run():
        groups = make_group(tmp_path, fresh_base_ip())
        try:
            await wait_leader(groups)
            host, port = groups[0].config.self_address.rsplit(":", 1)
            with structlog.testing.capture_logs() as logs, socket.create_connection((host, int(port))) as sock:
                stranger = TcpConnection(poller=createPoller("poll"), socket=sock)
                stranger.encryptor = getEncryptor("another region's secret")
                stranger.send(os.urandom(32))  # pysyncobj's first handshake message, sealed with the wrong secret
                sock.settimeout(3)
                assert sock.recv(1) == b""  # closed
                await wait_until_async(lambda: [e for e in logs if e["event"] == "raft.peer_refused"], 3,
                                       what="the refusal to be logged")
            refusal = next(e for e in logs if e["event"] == "raft.peer_refused")
            assert refusal["peer"].startswith("127.") and "cluster secret" in refusal["error"]
            assert refusal["port"] == groups[0].config.self_address and refusal["error_type"] == "FrameRefused"
        finally:
            close(groups)

    uvloop.run(run())


def test_a_command_too_big_for_a_frame_is_refused_before_it_is_proposed(tmp_path):
    async def run():
        groups = make_group(tmp_path, fresh_base_ip())
        try:
            await wait_leader(groups)
            with pytest.raises(RequestTooLargeException, match="at most 56 MiB"):
                await groups[0].submit("add", {"value": 1, "pad": b"\xff" * (COMMAND_MAX_BYTES // 2)}, request_id="big")
        finally:
            close(groups)

    uvloop.run(run())
