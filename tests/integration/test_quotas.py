"""Quotas and retention of control-plane state, on a real region with small settings: a tenant's queue of async
events, its dead-letter queue and its code storage are bounded (and one tenant at its quota never blocks
another), finished events go after their retention, a control node's replicated state stays small after many
large events, and code no function version names any more leaves every control node."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import zipfile

import psutil
import pytest

from flint import Client
from tests.conftest import start_region
from tests.support.wait import wait_until
from wire.errors import CodeStorageExceededException, ResourceNotFoundException, TooManyRequestsException
from wire.keys import KeyPair

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
SETTINGS = {
    "event_retry_backoff_s": 0.2, "event_visibility_s": 5, "keep_alive_s": 600,
    "tenant_event_queue_mb": 2, "tenant_dlq_mb": 1, "event_done_retention_s": 3, "event_dlq_retention_s": 10,
    "tenant_code_storage_mb": 1, "code_blob_grace_s": 2,
}
ECHO = "def handle(event, context):\n    return {'chars': len(str(event)), 'marker': %r}\n"
FAILING = "def handle(event, context):\n    raise ValueError('no')\n"


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("quotas"), settings=SETTINGS)
    yield region
    region.down()


@pytest.fixture(scope="module")
def tenants(region, tmp_path_factory):
    """make(name): a new tenant of the region and a client with its key (no retries: a refusal is seen)."""
    clients: list[Client] = []
    with Client.from_region(region.root, operator=True) as operator:
        def make(name: str) -> Client:
            key = KeyPair.generate()
            secret = key.save(tmp_path_factory.mktemp(name), name)
            operator.create_tenant(name, key.public)
            clients.append(Client.from_region(region.root, key_file=secret, retries=0))
            return clients[-1]

        yield make
    for c in clients:
        c.close()


def package(source: str, *, padding: int = 0) -> bytes:
    """A zip with handler.py, and `padding` random (incompressible) bytes beside it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("handler.py", source)
        if padding:
            z.writestr("padding.bin", os.urandom(padding))
    return out.getvalue()


def large_payload(kb: int = 200) -> bytes:
    """A JSON string of `kb` KB that no compression shrinks much (as real payloads often are)."""
    return json.dumps(base64.b64encode(os.urandom(kb * 1024 * 3 // 4)).decode()).encode()


def send_event(client: Client, function: str, payload: bytes, timeout_s: float = 60) -> str:
    """Accepted at last: while the tenant's queue is full, wait for room (what a client's backoff would do)."""
    return wait_until(lambda: client.invoke(function, payload, invocation_type="Event"), timeout_s,
                      ignoring=(TooManyRequestsException,), interval_s=0.05, what=f"room to queue for {function}"
                      ).request_id


def unfinished(client: Client) -> int:
    counts = client.list_events(limit=1)["counts"]
    return counts["queued"] + counts["inflight"]


def wait_event(client: Client, event_id: str, states: tuple[str, ...], timeout_s: float = 30) -> dict:
    return wait_until(lambda: client.get_event(event_id), timeout_s, until=lambda e: e["state"] in states,
                      interval_s=0.1, what=f"event {event_id} to be {' or '.join(states)}")


def forgotten(client: Client, event_id: str) -> bool:
    try:
        client.get_event(event_id)
    except ResourceNotFoundException:
        return True
    return False


def blob_files(region, digest: str) -> dict[str, bool]:
    """On each control node: whether its blob store holds the code blob `digest`."""
    out = {}
    for n in region.nodes():
        config = region.config(n["node_id"])
        if "control" in config.roles:
            out[n["node_id"]] = (config.data_dir / "blobs" / digest[:2] / digest).exists()
    return out


def control_dumps(region) -> dict[str, os.stat_result | None]:
    """Each control node's latest dump of the `control` group's replicated state (pysyncobj writes it, gzipped,
    at each log compaction)."""
    out = {}
    for n in region.nodes():
        config = region.config(n["node_id"])
        if "control" in config.roles:
            path = config.data_dir / "raft" / "control.dump"
            out[n["node_id"]] = path.stat() if path.exists() else None
    return out


def rss_mb(region) -> dict[str, str]:
    """Each node process's resident memory, and how much of it is file-backed (pysyncobj maps its journal)."""
    out = {}
    for n in region.nodes():
        mem = psutil.Process(region.pid(n["node_id"])).memory_info()
        out[n["node_id"]] = f"{mem.rss // MiB} ({mem.shared // MiB} file-backed)"
    return out


def test_a_tenant_over_its_event_queue_quota_is_refused_while_another_tenants_events_are_accepted(region, tenants):
    hog, calm = tenants("hog"), tenants("calm")
    hog.create_function("stuck", code=package(ECHO % "hog"), handler="handler.handle")
    hog.put_function_concurrency("stuck", 0)  # throttled: its events wait in the queue
    calm.create_function("fine", code=package(ECHO % "calm"), handler="handler.handle")
    payload = large_payload(200)
    accepted = 0
    with pytest.raises(TooManyRequestsException) as refused:
        for _ in range(30):  # 6 MB, three times the quota of 2 MB
            hog.invoke("stuck", payload, invocation_type="Event")
            accepted += 1
    assert refused.value.reason == "EventQueueLimitExceeded"
    assert "queue" in refused.value.message and "retry" in refused.value.message.lower()
    assert 5 <= accepted <= 10, f"{accepted} events of 200 KB were accepted under a quota of 2 MB"
    for _ in range(3):  # another tenant's large events are accepted and run meanwhile
        event_id = calm.invoke("fine", payload, invocation_type="Event").request_id
        assert wait_event(calm, event_id, ("done",))["state"] == "done"
    hog.delete_function_concurrency("stuck")  # the hog's events run, and it has room again
    wait_until(lambda: unfinished(hog), 30, until=lambda n: n == 0, interval_s=0.2, what="the hog's queue to drain")
    assert hog.invoke("stuck", payload, invocation_type="Event").status_code == 202


def test_the_dead_letter_queue_keeps_at_most_its_quota(region, tenants):
    t = tenants("failing")
    t.create_function("raiser", code=package(FAILING), handler="handler.handle")
    t.update_function_configuration("raiser", maximum_retry_attempts=0)
    payload = large_payload(200)
    for _ in range(12):  # 2.4 MB of dead letters against a quota of 1 MB
        send_event(t, "raiser", payload)
    wait_until(lambda: unfinished(t), 30, until=lambda n: n == 0, interval_s=0.2, what="every event to fail")
    listed = t.list_events("dlq")
    dead, counts = listed["events"], listed["counts"]
    assert counts["dlq"] <= 5 and sum(e["payload_bytes"] for e in dead) <= MiB, counts
    assert counts["dlq_dropped"] >= 1, counts


def test_done_and_dead_lettered_events_go_after_their_retention(region, tenants):
    t = tenants("keeper")
    t.create_function("ok", code=package(ECHO % "ok"), handler="handler.handle")
    t.create_function("bad", code=package(FAILING), handler="handler.handle")
    t.update_function_configuration("bad", maximum_retry_attempts=0)
    payload = large_payload(100)
    done_id = t.invoke("ok", payload, invocation_type="Event").request_id
    dead_id = t.invoke("bad", payload, invocation_type="Event").request_id
    assert wait_event(t, done_id, ("done",))["payload_bytes"] == len(payload)  # its size is still told
    assert wait_event(t, dead_id, ("dlq",))["state"] == "dlq"
    # event_done_retention_s is 3 s and event_dlq_retention_s 10 s in this region
    wait_until(lambda: forgotten(t, done_id), 15, interval_s=0.2, what="the done event to be forgotten")
    assert not forgotten(t, dead_id), "the dead letter went with the done event, before its own retention"
    wait_until(lambda: forgotten(t, dead_id), 25, interval_s=0.2, what="the dead letter to be forgotten")
    counts = t.list_events()["counts"]
    assert counts["done"] == counts["dlq"] == 0, counts


def test_a_control_nodes_replicated_state_stays_small_after_many_large_events(region, tenants, report):
    t = tenants("bulk")
    t.create_function("echo", code=package(ECHO % "bulk"), handler="handler.handle")
    before = rss_mb(region)
    for _ in range(300):  # 60 MB of payloads, queued as fast as the tenant's quota lets them in
        send_event(t, "echo", large_payload(200))
    wait_until(lambda: unfinished(t), 120, until=lambda n: n == 0, interval_s=0.5, what="every event to run")
    finished_at = time.time()
    t.create_function("after", code=package(ECHO % "after"), handler="handler.handle")  # something new to dump
    # pysyncobj dumps the replicated state at each log compaction, at least once a minute when there is news
    dumps = wait_until(lambda: control_dumps(region), 150, interval_s=1.0,
                       until=lambda d: all(s is not None and s.st_mtime > finished_at for s in d.values()),
                       what="every control node to dump its state after the events ran")
    sizes_mb = {node: round(s.st_size / MiB, 2) for node, s in dumps.items()}
    report(f"control state dumps after 300 events of 200 KB: {sizes_mb} MB; node RSS {before} -> "
           f"{rss_mb(region)} MB")
    assert all(size < 5 for size in sizes_mb.values()), f"the replicated state holds payloads: {sizes_mb} MB"


def test_code_no_function_version_names_leaves_every_control_node(region, tenants):
    t = tenants("coder")
    one, two, three = (package(ECHO % marker) for marker in ("one", "two", "three"))
    sha = {code: hashlib.sha256(code).hexdigest() for code in (one, two, three)}
    t.create_function("gc", code=one, handler="handler.handle")
    assert t.invoke("gc", {}).json()["marker"] == "one"  # a worker has it cached now
    assert all(blob_files(region, sha[one]).values())
    t.publish_version("gc")  # version 1 keeps code one
    t.update_function_code("gc", code=two)
    t.create_function("replaced", code=three, handler="handler.handle")
    t.update_function_code("replaced", code=two)  # nothing names code three any more
    wait_until(lambda: blob_files(region, sha[three]), 20, until=lambda f: not any(f.values()), interval_s=0.2,
               what="replaced code to leave every control node")
    assert all(blob_files(region, sha[one]).values()), "code a published version names was removed"
    t.delete_function("gc")
    assert all(blob_files(region, sha[two]).values()), "code another function still names was removed"
    wait_until(lambda: blob_files(region, sha[one]), 20, until=lambda f: not any(f.values()), interval_s=0.2,
               what="a deleted function's code to leave every control node")
    t.delete_function("replaced")
    wait_until(lambda: blob_files(region, sha[two]), 20, until=lambda f: not any(f.values()), interval_s=0.2,
               what="the last function's code to leave every control node")
    # nothing breaks when a blob is gone: the same code again is stored again and runs (a worker may still
    # have it unpacked, or fetches it anew)
    t.create_function("gc", code=one, handler="handler.handle")
    assert t.invoke("gc", {}).json()["marker"] == "one"
    time.sleep(2 * SETTINGS["code_blob_grace_s"])
    assert all(blob_files(region, sha[one]).values()), "code of a function made again was removed"


def test_code_storage_past_the_quota_is_refused_before_it_is_stored(region, tenants):
    big, other = tenants("big_coder"), tenants("other_coder")
    a, b, c = (package(ECHO % marker, padding=600 * 1024) for marker in "abc")  # 600 KB each, quota 1 MB
    big.create_function("a", code=a, handler="handler.handle")
    with pytest.raises(CodeStorageExceededException) as refused:
        big.create_function("c", code=c, handler="handler.handle")
    assert "MB" in refused.value.message and "delete" in refused.value.message.lower()
    assert not any(blob_files(region, hashlib.sha256(c).hexdigest()).values()), "refused code was stored"
    assert "c" not in [f["name"] for f in big.list_functions()]
    other.create_function("b", code=b, handler="handler.handle")  # another tenant's storage is its own
    big.create_function("a2", code=a, handler="handler.handle")  # the same package again costs nothing more
    big.publish_version("a")  # nor does a version of it
    with pytest.raises(CodeStorageExceededException):
        big.update_function_code("a", code=b)  # version 1 and a2 keep package a: b would be more
    big.delete_function("a")
    big.update_function_code("a2", code=b)  # replacing a2's code frees package a: room for b
    with pytest.raises(CodeStorageExceededException):
        big.create_function("c", code=c, handler="handler.handle")
    big.delete_function("a2")
    big.create_function("c", code=c, handler="handler.handle")
    assert big.invoke("c", {}).json()["marker"] == "c"
