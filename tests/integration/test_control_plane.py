"""The door, as tenants and operators meet it on a real region: keys, tenant isolation, revocation, every
invocation type, versions and aliases, async events with retries and a dead-letter queue, and the limits."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flint import Client
from flint.client import ClientConfig
from tests.conftest import ROOT, start_region
from tests.support.cluster import executions
from tests.support.wait import wait_until
from wire.errors import (
    AccessDeniedException,
    InvalidParameterValueException,
    PeerUnavailable,
    RequestTooLargeException,
    ResourceConflictException,
    ResourceNotFoundException,
)
from wire.keys import KeyPair

pytestmark = pytest.mark.slow

SETTINGS = {"event_retry_backoff_s": 0.2, "event_visibility_s": 5, "keep_alive_s": 600, "unzipped_max_mb": 4,
            "record_executions": True}
VERSIONED = 'def handle(event, context):\n    return {"version": "%s", "request_id": context.aws_request_id}\n'
FAILING = 'def handle(event, context):\n    raise ValueError(context.aws_request_id)\n'


def code_dir(tmp: Path, name: str, source: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "handler.py").write_text(source)
    return d


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("control"), settings=SETTINGS)
    yield region
    region.down()


@pytest.fixture(scope="module")
def operator(region):
    with Client.from_region(region.root, operator=True) as c:
        yield c


@pytest.fixture(scope="module")
def alice(region):
    with Client.from_region(region.root, retries=0) as c:  # the region's default tenant
        yield c


@pytest.fixture(scope="module")
def bob(region, operator, tmp_path_factory):
    key = KeyPair.generate()
    secret = key.save(tmp_path_factory.mktemp("bob"), "bob")
    operator.create_tenant("bob", key.public)
    with Client.from_region(region.root, key_file=secret, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def alice_at_each_frontend(region):
    """The default tenant, one client pinned to each frontend of the region."""
    cfg = ClientConfig.load(region.root)
    clients = [Client([e], server_key=cfg.server_key, key=KeyPair.load(cfg.key_file), retries=0)
               for e in cfg.endpoints]
    yield clients
    for c in clients:
        c.close()


def wait_event(client: Client, event_id: str, states=("done", "dlq"), timeout_s: float = 20) -> dict:
    return wait_until(lambda: client.get_event(event_id), timeout_s, until=lambda event: event["state"] in states,
                      interval_s=0.1, what=f"event {event_id} to be {' or '.join(states)}")


def test_keys_decide_who_gets_in_and_what_they_may_do(region, alice, bob, operator):
    cfg = ClientConfig.load(region.root)
    with Client(cfg.endpoints, server_key=cfg.server_key, key=KeyPair.generate(), timeout_s=1.0, retries=0) as c:
        with pytest.raises(AccessDeniedException, match="refused this key at the handshake"):
            c.list_functions()  # an unknown key does not get past the handshake, and the caller is told why
    with pytest.raises(AccessDeniedException, match="operator key"):
        alice.list_tenants()
    with pytest.raises(AccessDeniedException, match="tenant key"):
        operator.list_functions()
    assert {"default", "bob"} <= set(operator.list_tenants())


def test_a_tenant_cannot_see_invoke_change_or_delete_anothers_function(alice, bob, tmp_path):
    alice.create_function("private", code=code_dir(tmp_path, "a", VERSIONED % "alice"), handler="handler.handle")
    for attempt in (
        lambda: bob.get_function("private"),
        lambda: bob.invoke("private", {}),
        lambda: bob.invoke("private", {}, invocation_type="Event"),
        lambda: bob.invoke("private", {}, invocation_type="DryRun"),
        lambda: bob.update_function_code("private", code=code_dir(tmp_path, "evil", VERSIONED % "bob")),
        lambda: bob.update_function_configuration("private", memory_mb=256),
        lambda: bob.publish_version("private"),
        lambda: bob.create_alias("private", "x", "1"),
        lambda: bob.put_function_concurrency("private", 1),
        lambda: bob.delete_function("private"),
    ):
        with pytest.raises(ResourceNotFoundException, match="Function not found: private"):
            attempt()
    assert "private" not in [f["name"] for f in bob.list_functions()]
    bob.create_function("private", code=code_dir(tmp_path, "b", VERSIONED % "bob"), handler="handler.handle")
    assert bob.invoke("private", {}).json()["version"] == "bob"  # the same name, bob's own
    assert alice.invoke("private", {}).json()["version"] == "alice"


def test_revoked_keys_stop_working_on_new_and_open_connections(region, operator, bob, tmp_path):
    key = KeyPair.generate()
    secret = key.save(tmp_path, "rotating")
    operator.add_tenant_key("bob", key.public)
    with Client.from_region(region.root, key_file=secret, retries=0) as open_conn:
        open_conn.list_functions()
        operator.revoke_tenant_key("bob", key.public)

        def refused() -> AccessDeniedException | None:
            try:
                open_conn.list_functions()
            except AccessDeniedException as err:
                return err
            return None

        err = wait_until(refused, 5, interval_s=0.1, what="a revoked key to stop working on an open connection")
        assert "revoked" in str(err)
    with Client.from_region(region.root, key_file=secret, retries=0, timeout_s=1.0) as fresh:
        with pytest.raises(AccessDeniedException, match="unknown there or was revoked"):
            fresh.list_functions()


def test_a_revoked_key_opens_no_new_connection_on_any_frontend_at_once(region, operator, bob, tmp_path):
    key = KeyPair.generate()
    secret = key.save(tmp_path, "everywhere")
    operator.add_tenant_key("bob", key.public)
    cfg = ClientConfig.load(region.root)

    def connect(endpoint: str, timeout_s: float = 5.0) -> Client:
        return Client([endpoint], server_key=cfg.server_key, key=KeyPair.load(secret), timeout_s=timeout_s, retries=0)

    for endpoint in cfg.endpoints:  # every frontend has seen the key a moment ago
        with connect(endpoint) as c:
            c.list_functions()
    operator.revoke_tenant_key("bob", key.public)

    def refused(endpoint: str) -> bool:
        with connect(endpoint, timeout_s=1.0) as c:
            try:
                c.list_functions()
            except AccessDeniedException as err:
                # refused at the handshake, or let in and only then turned away by the per-request check
                return "at the handshake" in str(err)
            return False

    with ThreadPoolExecutor(len(cfg.endpoints)) as pool:
        outcomes = dict(zip(cfg.endpoints, pool.map(refused, cfg.endpoints)))
    assert all(outcomes.values()), f"a revoked key still opened a connection: {outcomes}"


def test_every_invocation_type_returns_what_lambda_returns(alice, tmp_path):
    alice.create_function("counter", code=ROOT / "examples" / "hello", handler="handler.handle")
    sync = alice.invoke("counter", {"name": "sync"}, log_tail=True)
    assert sync.status_code == 200 and sync.function_error is None and sync.executed_version == "$LATEST"
    assert sync.json()["invocations"] == 1 and "greeting sync" in sync.log_tail
    assert sync.json()["request_id"] == sync.request_id == str(uuid.UUID(sync.request_id))  # a uuid, as Lambda's
    dry = alice.invoke("counter", {}, invocation_type="DryRun")
    assert dry.status_code == 204 and dry.payload == b""
    assert alice.invoke("counter", {}).json()["invocations"] == 2  # the dry run ran nothing
    event = alice.invoke("counter", {"name": "async"}, invocation_type="Event")
    assert event.status_code == 202 and event.request_id.startswith("ev-") and event.payload == b""
    assert wait_event(alice, event.request_id)["state"] == "done"
    alice.create_function("raiser", code=code_dir(tmp_path, "r", FAILING), handler="handler.handle")
    failed = alice.invoke("raiser", {})
    assert failed.status_code == 200 and failed.function_error == "Unhandled"
    assert failed.json()["errorType"] == "ValueError"


def test_versions_are_immutable_and_aliases_route_with_weights(alice, tmp_path):
    alice.create_function("app", code=code_dir(tmp_path, "v1", VERSIONED % "one"), handler="handler.handle")
    v1 = alice.publish_version("app", "first")
    assert v1["version"] == "1" and alice.publish_version("app")["version"] == "1"  # nothing changed
    alice.update_function_code("app", code=code_dir(tmp_path, "v2", VERSIONED % "two"))
    assert alice.invoke("app", {}).json()["version"] == "two"  # $LATEST moved
    assert alice.invoke("app", {}, qualifier="1").json()["version"] == "one"  # version 1 did not
    assert alice.publish_version("app")["version"] == "2"
    alice.create_alias("app", "live", "1", additional_version="2", weight=0.5)
    seen = {alice.invoke("app", {}, qualifier="live").executed_version for _ in range(40)}
    assert seen == {"1", "2"}
    alice.update_alias("app", "live", "2")
    assert {alice.invoke("app", {}, qualifier="live").json()["version"] for _ in range(10)} == {"two"}
    with pytest.raises(ResourceConflictException):
        alice.create_alias("app", "live", "1")
    with pytest.raises(InvalidParameterValueException, match="not published"):
        alice.create_alias("app", "beta", "7")
    alice.delete_alias("app", "live")
    with pytest.raises(ResourceNotFoundException, match="app:live"):
        alice.invoke("app", {}, qualifier="live")
    assert [v["version"] for v in alice.list_versions("app")] == ["$LATEST", "1", "2"]


def test_async_failures_retry_then_dead_letter_and_can_be_redriven(alice, alice_at_each_frontend, tmp_path):
    alice.create_function("flaky", code=code_dir(tmp_path, "f", FAILING), handler="handler.handle")
    event = alice.invoke("flaky", {"n": 1}, invocation_type="Event")
    dead = wait_event(alice, event.request_id)
    assert dead["state"] == "dlq" and dead["attempts"] == 3 and dead["deliveries"] == 3  # 1 try + 2 retries
    assert dead["last_error"]["errorType"] == "ValueError"
    assert dead["last_error"]["errorMessage"] == event.request_id  # the handler saw the event's id
    assert event.request_id in [e["event_id"] for e in alice.list_events("dlq")["events"]]

    alice.update_function_configuration("flaky", maximum_retry_attempts=0)
    once = alice.invoke("flaky", {"n": 2}, invocation_type="Event")
    assert wait_event(alice, once.request_id)["deliveries"] == 1

    alice.update_function_code("flaky", code=code_dir(tmp_path, "fixed", VERSIONED % "fixed"))

    def runs(client: Client) -> str:
        result = client.invoke("flaky", {})
        return result.function_error or result.json()["version"]

    # every frontend, and so its poller, runs the new code within function_cache_ttl_s (2 s)
    wait_until(lambda: [runs(c) for c in alice_at_each_frontend], 2.5, until=lambda seen: set(seen) == {"fixed"},
               interval_s=0.1, what="every frontend to run the fixed code")
    assert alice.redrive_events([event.request_id, once.request_id]) == 2
    assert wait_event(alice, event.request_id)["state"] == "done"
    assert wait_event(alice, once.request_id)["state"] == "done"


def test_throttled_events_wait_instead_of_failing(alice):
    alice.create_function("gated", code=ROOT / "examples" / "hello", handler="handler.handle")
    alice.put_function_concurrency("gated", 0)
    event = alice.invoke("gated", {}, invocation_type="Event")
    time.sleep(2.0)  # the scenario: the function stays throttled for 2 s, time for the poller to try it twice
    waiting = alice.get_event(event.request_id)
    assert waiting["state"] in ("queued", "inflight") and waiting["attempts"] == 0 and waiting["deliveries"] >= 2
    alice.delete_function_concurrency("gated")
    done = wait_event(alice, event.request_id)
    assert done["state"] == "done" and done["attempts"] == 0


def test_an_accepted_event_is_not_duplicated_by_a_client_retry(region, alice):
    alice.create_function("once", code=ROOT / "examples" / "hello", handler="handler.handle")
    first = alice.invoke("once", {}, invocation_type="Event", request_id="client-retry-1")
    again = alice.invoke("once", {}, invocation_type="Event", request_id="client-retry-1")  # the client's retry
    assert first.status_code == again.status_code == 202
    assert first.request_id == again.request_id
    assert wait_event(alice, first.request_id)["state"] == "done"
    ran = [e for e in executions(region) if e.request_id == first.request_id]
    assert len(ran) == 1, f"one event accepted twice ran {len(ran)} times"


def test_limits_give_the_named_errors(alice):
    alice.create_function("limited", code=ROOT / "examples" / "hello", handler="handler.handle")
    with pytest.raises(RequestTooLargeException):
        alice.invoke("limited", b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"')
    with pytest.raises(RequestTooLargeException, match="Event"):
        alice.invoke("limited", b'"' + b"x" * (300 * 1024) + b'"', invocation_type="Event")
    with pytest.raises(RequestTooLargeException):
        alice.create_function("huge", code=b"PK" + b"\0" * (51 * 1024 * 1024), handler="handler.handle")
    roomy = io.BytesIO()  # 5 MB of zeros: a tiny zip, over this region's unzipped_max_mb of 4
    with zipfile.ZipFile(roomy, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("handler.py", VERSIONED % "big")
        z.writestr("data.bin", b"\0" * (5 * 1024 * 1024))
    with pytest.raises(InvalidParameterValueException, match="exceeds 4 MB"):
        alice.create_function("roomy", code=roomy.getvalue(), handler="handler.handle")
    for bad in ({"memory_mb": 64}, {"memory_mb": 10241}, {"timeout_s": 901}, {"maximum_retry_attempts": 3},
                {"environment": {"BIG": "x" * 5000}}, {"environment": {"AWS_REGION": "x"}}):
        with pytest.raises(InvalidParameterValueException):
            alice.update_function_configuration("limited", **bad)
    assert json.loads(alice.invoke("limited", {}).payload)["message"] == "Hello, world!"
