"""A live ROUTER server under attack: bad frames get named errors or are dropped and counted; it keeps serving."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import uvloop
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fresh_base_ip
from tests.support.wait import wait_until
from wire import codec
from wire import messages as m
from wire.client import Client
from wire.errors import InvalidRequestContentException, PeerUnavailable, ResourceNotFoundException
from wire.keys import KeyPair
from wire.server import Server
from wire.zap import Authenticator

CLUSTER = KeyPair.generate()


class LiveServer:
    """A Server on its own uvloop thread, as it runs inside a node."""

    def __init__(self):
        self.endpoint = f"tcp://{fresh_base_ip()}:17500"
        self.server: Server | None = None
        self.auth: Authenticator | None = None
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: uvloop.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        self.auth = Authenticator(ctx, CLUSTER.public)
        self.auth.start()

        async def get_function(req):
            if req.msg.name == "missing":
                raise ResourceNotFoundException("Function not found: missing")
            if req.msg.name == "slow":
                await asyncio.sleep(2)
            # the caller's identity comes from its CURVE key (ZAP), never from the request: echo it back
            config = m.FunctionConfig(tenant=req.caller.who, name=req.msg.name, handler="h.h", code_sha256="0")
            if req.msg.name == "unencodable":  # a handler's reply holding what msgpack cannot carry
                config = config.replace(environment={"x": object()})
            return m.FunctionReply(config=config)

        async def put_blob(req):
            return m.BlobStored(copies=len(req.msg.data or b""))

        self.server = Server(ctx, self.endpoint, CLUSTER, {m.GetFunction: get_function, m.PutBlob: put_blob},
                             name="test")
        self._stop = asyncio.Event()
        serve = asyncio.create_task(self.server.serve())
        self.ready.set()
        await self._stop.wait()
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        self.auth.close()
        ctx.destroy(linger=0)

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)


@pytest.fixture(scope="module")
def live():
    server = LiveServer()
    yield server
    server.stop()


def dealer(endpoint: str, key: KeyPair = CLUSTER) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = CLUSTER.public
    sock.curve_publickey = key.public
    sock.curve_secretkey = key.secret
    sock.connect(endpoint)
    return sock


def request(name: str, rid: str = "ok-1") -> list[bytes]:
    return codec.encode({"v": 1, "op": "get_function", "id": rid, "name": name})


def recv(sock: zmq.Socket, timeout_ms: int = 3000) -> dict | None:
    if not sock.poll(timeout_ms):
        return None
    header, _ = codec.decode(sock.recv_multipart(), max_payload_bytes=1 << 20)
    return header


# --- what a hostile or broken peer can send ----------------------------------------------------------------------

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
ids = st.one_of(st.none(), ints, st.text(max_size=70), st.binary(max_size=8))
values = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=80), st.binary(max_size=80),
                   st.lists(ints, max_size=4), st.dictionaries(st.text(max_size=4), ints, max_size=3))
bad_headers = st.one_of(
    st.binary(max_size=64),  # mostly not msgpack at all
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),  # msgpack, but not a map
    st.dictionaries(st.text(max_size=10), values, max_size=6).map(msgpack.packb),  # a map without v/op/id
    st.fixed_dictionaries({"v": st.sampled_from([0, 2, "1", None]), "op": st.just("get_function"), "id": st.just("x")})
    .map(msgpack.packb),  # wrong protocol version
    st.fixed_dictionaries({"v": st.just(1), "op": st.one_of(st.text(max_size=20), ints), "id": st.just("x")})
    .map(msgpack.packb),  # unknown operation
    st.fixed_dictionaries({"v": st.just(1), "op": st.just("get_function"), "id": ids, "name": st.just("n")})
    .filter(lambda h: not (isinstance(h["id"], str) and 0 < len(h["id"]) <= 64))
    .map(msgpack.packb),  # bad request id
    st.fixed_dictionaries({"v": st.just(1), "op": st.just("get_function"), "id": st.just("x"), "name": values})
    .filter(lambda h: not (isinstance(h["name"], str) and len(h["name"]) <= 64))
    .map(msgpack.packb),  # wrong field type
    st.fixed_dictionaries({"v": st.just(1), "op": st.just("get_function"), "id": st.just("x"),
                           "deadline": st.one_of(st.text(max_size=3), st.floats(), st.just(-1))})
    .map(msgpack.packb),  # malformed deadline
)
bad_messages = st.one_of(
    bad_headers.map(lambda h: [h]),
    st.tuples(bad_headers, st.binary(max_size=32)).map(list),
    st.lists(st.binary(max_size=16), min_size=3, max_size=5),  # too many frames
    st.binary(min_size=1, max_size=64).map(lambda p: request("n", "big") + [p]),  # payload where none is allowed
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(bad_messages, min_size=100, max_size=100))
def test_ten_thousand_bad_frames_get_named_errors_and_the_server_keeps_serving(live, batch):
    """100 examples x 100 frames = 10,000 generated bad frames against the live server."""
    sock = dealer(live.endpoint)
    try:
        dropped_before = live.server.stats.dropped
        for frames in batch:
            sock.send_multipart(frames)
        sock.send_multipart(request("still-serving", "probe"))
        errors = 0
        while True:
            header = recv(sock)
            assert header is not None, "the server stopped answering"
            if header.get("id") == "probe":
                break
            assert header["ok"] is False
            assert header["error"]["type"] in (
                "InvalidRequestContentException", "InvalidParameterValueException", "RequestTooLargeException"
            )
            errors += 1
        assert header["ok"] is True and header["config"]["name"] == "still-serving"
        assert errors + (live.server.stats.dropped - dropped_before) == len(batch)
    finally:
        sock.close(0)


def test_a_valid_request_succeeds_after_the_storm_and_the_principal_comes_from_curve(live):
    sock = dealer(live.endpoint)
    sock.send_multipart(request("after"))
    header = recv(sock)
    sock.close(0)
    assert header["id"] == "ok-1" and header["ok"] is True
    assert (header["config"]["name"], header["config"]["tenant"]) == ("after", "cluster")


def test_payload_over_the_operation_limit_is_request_too_large(live):
    sock = dealer(live.endpoint)
    sock.send_multipart(request("x", "too-big") + [b"x" * 100])
    header = recv(sock)
    sock.close(0)
    assert header["error"]["type"] == "RequestTooLargeException"
    assert "limit of get_function" in header["error"]["message"]
    assert header["id"] == "too-big"  # the caller can tell which request it was


def test_a_reply_that_cannot_be_encoded_is_answered_with_an_error_not_silence(live):
    before = live.server.stats.internal_errors
    sock = dealer(live.endpoint)
    sock.send_multipart(request("unencodable", "bad-reply"))
    header = recv(sock)
    sock.send_multipart(request("fine", "after-bad-reply"))
    after = recv(sock)
    sock.close(0)
    assert header is not None and header["id"] == "bad-reply" and header["ok"] is False
    assert header["error"]["type"] == "ServiceException" and "could not be encoded" in header["error"]["message"]
    assert after["ok"] is True and live.server.stats.internal_errors == before + 1


def test_an_unknown_key_is_refused_at_the_handshake(live):
    before = live.auth.refused
    sock = dealer(live.endpoint, KeyPair.generate())
    sock.send_multipart(request("intruder"))
    assert recv(sock, 1000) is None  # no answer to a request over a connection that never opened
    sock.close(0)
    wait_until(lambda: live.auth.refused, 10, until=lambda refused: refused > before,
               what="the ZAP handler to count the refused key")


def test_an_expired_deadline_is_dropped_and_counted(live):
    before = live.server.stats.dropped
    sock = dealer(live.endpoint)
    sock.send_multipart(codec.encode({"v": 1, "op": "get_function", "id": "late", "name": "x", "deadline": 1}))
    sock.send_multipart(request("x", "after-late"))
    header = recv(sock)
    sock.close(0)
    assert header["id"] == "after-late"
    assert live.server.stats.dropped == before + 1


def test_async_client_maps_errors_and_deadlines(live):
    async def go():
        ctx = zmq.asyncio.Context()
        client = Client(ctx, live.endpoint, keys=CLUSTER, server_public=CLUSTER.public, timeout_s=5)
        try:
            ok = await client.call(m.GetFunction(name="a"))
            assert isinstance(ok, m.FunctionReply) and ok.config.name == "a"
            with pytest.raises(ResourceNotFoundException, match="Function not found"):
                await client.call(m.GetFunction(name="missing"))
            with pytest.raises(InvalidRequestContentException, match="unknown operation"):
                await client.call(m.ListFunctions())
            began = time.monotonic()
            with pytest.raises(PeerUnavailable) as slow:
                await client.call(m.GetFunction(name="slow"), timeout_s=0.3)
            assert slow.value.reason == "Timeout" and time.monotonic() - began < 1.5
            nobody = Client(ctx, f"tcp://{fresh_base_ip()}:17501", keys=CLUSTER, server_public=CLUSTER.public)
            with pytest.raises(PeerUnavailable) as unsent:
                await nobody.call(m.GetFunction(name="a"), timeout_s=0.3)
            assert unsent.value.reason == "NotSent"
            nobody.close()
        finally:
            client.close()
            ctx.destroy(linger=0)

    uvloop.run(go())
