"""A real three-node, three-AZ region: every node its own process and loopback address, real Raft groups."""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict

import pytest

from flint import Client
from flint.client import ClientConfig
from tests.conftest import dump_logs, start_region
from tests.support.cluster import executions
from tests.support.wait import wait_until
from wire.errors import (
    AccessDeniedException,
    InvalidParameterValueException,
    InvalidRequestContentException,
    PeerUnavailable,
    RequestTooLargeException,
    ResourceConflictException,
    ResourceNotFoundException,
)
from wire.keys import KeyPair

pytestmark = pytest.mark.slow

FAILING = 'def handle(event, context):\n    raise RuntimeError("the handler failed on purpose")\n'


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("region"), settings={"record_executions": True})
    yield region
    region.down()


@pytest.fixture(scope="module")
def client(region):
    c = Client.from_region(region.root)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hello(client, example_code_module):
    client.create_function("hello", code=example_code_module, handler="handler.handle")
    return "hello"


@pytest.fixture(scope="module")
def example_code_module():
    from tests.conftest import ROOT

    return ROOT / "examples" / "hello"


def test_two_hundred_invokes_all_correct_and_warm(region, client, hello):
    seen: dict[str, list[int]] = defaultdict(list)
    cold = 0
    for i in range(200):
        result = client.invoke(hello, {"name": f"caller-{i}"})
        body = result.json()
        assert result.status_code == 200 and result.function_error is None
        assert body["message"] == f"Hello, caller-{i}!"
        seen[body["sandbox"]].append(body["invocations"])
        cold += result.cold_start
    # warm reuse: each sandbox's module-level counter grows by one per invoke it served
    for counts in seen.values():
        assert counts == list(range(counts[0], counts[0] + len(counts)))
    assert cold == len(seen) <= 2
    assert max(len(c) for c in seen.values()) >= 150


def test_function_lifecycle_through_the_door(client, hello):
    assert client.get_function(hello)["handler"] == "handler.handle"
    assert hello in [f["name"] for f in client.list_functions()]
    with pytest.raises(ResourceConflictException):
        client.create_function(hello, code=b"PK\x05\x06" + b"\0" * 18, handler="handler.handle")


def test_bad_input_gets_named_errors_and_the_region_keeps_serving(client, hello):
    with pytest.raises(ResourceNotFoundException, match="Function not found: nope"):
        client.invoke("nope", {})
    with pytest.raises(InvalidRequestContentException, match="Could not parse request body into json"):
        client.invoke(hello, b"{not json")
    with pytest.raises(RequestTooLargeException):
        client.invoke(hello, b'"' + b"x" * (7 * 1024 * 1024) + b'"')
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escape.py", "x = 1")
    with pytest.raises(InvalidParameterValueException, match="'\\.\\.'"):
        client.create_function("evil", code=buf.getvalue(), handler="escape.x")
    with pytest.raises(ResourceNotFoundException):
        client.get_function("evil")
    assert client.invoke(hello, {"name": "still here"}).json()["message"] == "Hello, still here!"


def test_a_failing_handler_is_a_function_error_not_an_outage(client, hello, tmp_path):
    code = tmp_path / "failing"
    code.mkdir()
    (code / "handler.py").write_text(FAILING)
    client.create_function("failing", code=code, handler="handler.handle")
    result = client.invoke("failing", {}, log_tail=True)
    assert result.status_code == 200 and result.function_error == "Unhandled"
    assert result.json()["errorType"] == "RuntimeError"
    assert "the handler failed on purpose" in result.log_tail
    assert client.invoke("hello", {"name": "x"}).function_error is None


SLOW = 'import time\n\ndef handle(event, context):\n    time.sleep(2)\n    return "done"\n'


def test_a_sync_invoke_that_may_have_started_is_not_sent_again_by_the_client(region, client, tmp_path):
    code = tmp_path / "slow"
    code.mkdir()
    (code / "handler.py").write_text(SLOW)
    client.create_function("slow", code=code, handler="handler.handle", timeout_s=5)
    before = sum(r["sandboxes"] for r in region.status())
    cfg = ClientConfig.load(region.root)
    with Client(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.load(cfg.key_file), retries=2) as c:
        with pytest.raises(PeerUnavailable, match="may still be running") as timed_out:
            c.invoke("slow", {}, timeout_s=0.5)
    assert timed_out.value.reason == "Timeout"
    # a second send, had there been one, would have started in a sandbox of its own before the first one ended
    wait_until(lambda: executions(region), 10,
               until=lambda ex: any(e.function == "slow" and e.ended is not None for e in ex),
               what="the invoke the client gave up on to end")
    assert len([e for e in executions(region) if e.function == "slow"]) == 1  # it ran once
    assert sum(r["sandboxes"] for r in region.status()) == before + 1  # in one sandbox
    assert client.invoke("slow", {}).json() == "done"


def test_an_unknown_key_cannot_get_in(region):
    cfg = ClientConfig.load(region.root)
    stranger = Client(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.generate(), timeout_s=1.0, retries=0)
    try:
        with pytest.raises(AccessDeniedException, match="refused this key at the handshake"):
            stranger.invoke("hello", {})
    finally:
        stranger.close()


def test_killing_the_node_that_ran_the_sandbox_leaves_invokes_working(region, client, hello):
    victim = client.invoke(hello, {"name": "before"}).json()["sandbox"].split("-")[0]
    killed_pid = region.kill_node(victim)
    assert killed_pid is not None
    try:
        results = [client.invoke(hello, {"name": f"after-{i}"}) for i in range(20)]
        assert [r.json()["message"] for r in results] == [f"Hello, after-{i}!" for i in range(20)]
        assert all(not r.json()["sandbox"].startswith(victim + "-") for r in results)
    except Exception:
        dump_logs(region)
        raise
    rows = {r["node"]: r for r in region.status()}
    assert rows[victim]["process"] == "down"
    assert sum(1 for r in rows.values() if r["health"] == "healthy") == 2
    json.dumps(rows)  # the status is plain data a tool can print
