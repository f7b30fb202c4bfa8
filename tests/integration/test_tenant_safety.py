"""A hostile tenant with an ordinary key, on a real region: nothing it sends can reach another tenant's
functions, secrets or warm sandboxes, or make a host look broken."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flint import Client
from flint.client import ClientConfig
from frontend.client import FrontendClient
from tests.conftest import start_region
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import (
    FlintError,
    InvalidParameterValueException,
    InvalidRequestContentException,
)
from wire.keys import KeyPair

pytestmark = pytest.mark.slow

SETTINGS = {"keep_alive_s": 600}
ENV_ECHO = ("import os\n\ndef handle(event, context):\n"
            "    return {'secret': os.environ.get('SECRET'), 'sandbox': os.environ.get('FLINT_SANDBOX_ID')}\n")


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("safety"), settings=SETTINGS)
    yield region
    region.down()


@pytest.fixture(scope="module")
def keys(region, tmp_path_factory):
    """Key files: the region's default tenant (the victim) and a second tenant, mallory."""
    key = KeyPair.generate()
    secret = key.save(tmp_path_factory.mktemp("mallory"), "mallory")
    with Client.from_region(region.root, operator=True) as operator:
        operator.create_tenant("mallory", key.public)
    return {"victim": ClientConfig.load(region.root).key_file, "mallory": secret}


def code(tmp: Path, source: str) -> Path:
    d = tmp / f"code{abs(hash(source))}"
    d.mkdir(exist_ok=True)
    (d / "handler.py").write_text(source)
    return d


def raw_call(region, key_file: Path, msg: m.Message, request_id: str):
    """One request with the request id the caller chose, as any client could send it."""
    cfg = ClientConfig.load(region.root)

    async def go():
        client = FrontendClient(cfg.endpoints[:1], server_public=cfg.server_key, key=KeyPair.load(key_file))
        try:
            return await client.call(msg, request_id=request_id)
        finally:
            client.close()

    return asyncio.run(go())


def test_another_tenants_request_id_returns_nothing_of_theirs_and_blocks_nothing_of_theirs(region, keys, tmp_path):
    src = code(tmp_path, ENV_ECHO)
    with Client.from_region(region.root, key_file=keys["victim"]) as victim, \
            Client.from_region(region.root, key_file=keys["mallory"]) as mallory:
        victim.create_function("payroll", code=src, handler="handler.handle", environment={"SECRET": "s3cr3t"})
        mallory.create_function("probe", code=src, handler="handler.handle")
    # the victim changes its function under a request id the attacker learns (or guesses) ...
    raw_call(region, keys["victim"], m.UpdateFunctionConfiguration(name="payroll", memory_mb=256), "shared-id-1")
    # ... and the attacker sends its own change under the same id: it gets its own function back, nothing else
    theirs = raw_call(region, keys["mallory"], m.UpdateFunctionConfiguration(name="probe", memory_mb=512),
                      "shared-id-1")
    assert (theirs.config.tenant, theirs.config.name, theirs.config.memory_mb) == ("mallory", "probe", 512)
    assert "s3cr3t" not in json.dumps(theirs.to_fields())
    # the other order: the attacker uses an id first; the victim's delete under it still deletes
    raw_call(region, keys["mallory"], m.UpdateFunctionConfiguration(name="probe", memory_mb=640), "shared-id-2")
    raw_call(region, keys["victim"], m.DeleteFunction(name="payroll"), "shared-id-2")
    with Client.from_region(region.root, key_file=keys["victim"]) as victim:
        assert "payroll" not in [f["name"] for f in victim.list_functions()]


@pytest.mark.parametrize("name", ["kt/x", "x|y", "../../etc/passwd", "a\x00b", "", "f.g", "f:live"])
def test_names_are_refused_unless_lambda_would_take_them(region, keys, tmp_path, name):
    with Client.from_region(region.root, key_file=keys["mallory"]) as mallory:
        with pytest.raises(InvalidParameterValueException, match="not allowed|longer than"):
            mallory.create_function(name, code=code(tmp_path, ENV_ECHO), handler="handler.handle")


def test_a_tenant_name_that_could_be_read_as_another_is_refused(region):
    with Client.from_region(region.root, operator=True) as operator:
        with pytest.raises(InvalidParameterValueException, match="not allowed"):
            operator.create_tenant("px|y", KeyPair.generate().public)
        with pytest.raises(InvalidParameterValueException, match="not allowed"):
            operator.create_tenant("kt/x", KeyPair.generate().public)


def test_warm_sandboxes_never_serve_a_changed_or_recreated_function(region, keys, tmp_path):
    src = code(tmp_path, ENV_ECHO)
    with Client.from_region(region.root, key_file=keys["mallory"]) as c:
        c.create_function("rotating", code=src, handler="handler.handle", environment={"SECRET": "old"})
        first = c.invoke("rotating").json()
        assert first["secret"] == "old" and c.invoke("rotating").json()["sandbox"] == first["sandbox"]  # warm
        c.update_function_configuration("rotating", environment={"SECRET": "rotated"})
        second = c.invoke("rotating").json()
        assert second["secret"] == "rotated" and second["sandbox"] != first["sandbox"]
        c.delete_function("rotating")
        c.create_function("rotating", code=src, handler="handler.handle", environment={"SECRET": "rotated"})
        third = c.invoke("rotating").json()
        assert third["sandbox"] not in (first["sandbox"], second["sandbox"])  # a new function, a new sandbox
    # and the sandboxes that can serve nothing more are gone from their workers, not left running
    managers = [n["node_id"] for n in region.nodes()]
    alive = set()
    for node in managers:
        sandboxes = region.call("worker", m.ListSandboxes(), node=node).sandboxes
        alive |= {s.sandbox_id for s in sandboxes}
    assert first["sandbox"] not in alive and second["sandbox"] not in alive


@pytest.mark.parametrize("payload, complaint", [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="nested-100000-deep"),
    pytest.param(b'{"n": NaN}', "NaN is not JSON", id="NaN"),
    pytest.param(b"[Infinity]", "Infinity is not JSON", id="Infinity"),
])
def test_payloads_json_would_not_take_are_refused_with_the_lambda_error(region, keys, tmp_path, payload, complaint):
    with Client.from_region(region.root, key_file=keys["mallory"], retries=0) as c:
        if "echo" not in [f["name"] for f in c.list_functions()]:
            c.create_function("echo", code=code(tmp_path, ENV_ECHO), handler="handler.handle")
        with pytest.raises(InvalidRequestContentException, match=complaint):
            c.invoke("echo", payload)
        assert c.invoke("echo", {}).function_error is None  # and the door keeps serving


def _zip(entries: list[tuple[str, bytes]]) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return bytearray(buf.getvalue())


def _patched(data: bytearray, local_offset: int, central_offset: int, value: int) -> bytes:
    """Set a byte in the local header and in the central directory entry of the (only) file."""
    data[data.find(b"PK\x03\x04") + local_offset] = value
    data[data.find(b"PK\x01\x02") + central_offset] = value
    return bytes(data)


HANDLER = b"def handle(event, context):\n    return 1\n" * 50


def _bad_crc() -> bytes:
    data = _zip([("handler.py", HANDLER)])
    data[data.find(b"def handle")] ^= 0x01
    return bytes(data)


BAD_ZIPS = {
    "a file and a directory of the same name": (lambda: bytes(_zip([("handler.py", HANDLER), ("a", b"x"),
                                                                     ("a/b", b"y")])), "both a file and a directory"),
    "a bad checksum": (_bad_crc, "Bad CRC"),
    "the encrypted flag": (lambda: _patched(_zip([("handler.py", HANDLER)]), 6, 8, 1), "encrypted"),
    "deflate64": (lambda: _patched(_zip([("handler.py", HANDLER)]), 8, 10, 9), "compression method 9"),
    "an over-long name": (lambda: bytes(_zip([("handler.py", HANDLER), ("x" * 300, b"y")])), "too long"),
}


@pytest.mark.parametrize("what", sorted(BAD_ZIPS))
def test_a_package_no_worker_could_unpack_is_refused_at_upload(region, keys, tmp_path, what):
    make, complaint = BAD_ZIPS[what]
    with Client.from_region(region.root, key_file=keys["mallory"]) as c:
        with pytest.raises(InvalidParameterValueException, match=complaint):
            c.create_function("badzip", code=make(), handler="handler.handle")
        assert "badzip" not in [f["name"] for f in c.list_functions()]


SLEEPY = "import time\n\ndef handle(event, context):\n    time.sleep(1.5)\n    return 'done'\n"


def test_a_burst_of_big_invokes_never_overcommits_a_hosts_memory(tmp_path):
    """Each worker offers 2048 MB to sandboxes; nine concurrent invokes of a 2048 MB function may never put two
    of its sandboxes on one host, however many cold starts race for the same lease."""
    region = start_region(tmp_path, settings={"worker_memory_mb": 2048 + 512, "lease_block_mb": 2048,
                                              "keep_alive_s": 600})
    try:
        with Client.from_region(region.root) as c:
            c.create_function("big", code=code(tmp_path, SLEEPY), handler="handler.handle", memory_mb=2048,
                              timeout_s=10)
        peak: dict[str, int] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for n in region.nodes():
                    try:
                        held = sum(s.memory_mb for s in region.call("worker", m.ListSandboxes(), node=n["node_id"],
                                                                   timeout_s=1.0).sandboxes)
                    except FlintError:
                        continue
                    peak[n["node_id"]] = max(peak.get(n["node_id"], 0), held)

        def invoke(_: int) -> str:
            with Client.from_region(region.root, retries=0) as c:
                try:
                    return "ok" if c.invoke("big").function_error is None else "function error"
                except FlintError as err:
                    return f"{err.type_name}:{err.reason}"

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(9) as pool:
            outcomes = list(pool.map(invoke, range(9)))
        done.set()
        watcher.join()
        assert outcomes.count("ok") >= 1 and "function error" not in outcomes, outcomes
        assert peak and max(peak.values()) <= 2048, f"sandbox memory held per host: {peak}"
    finally:
        region.down()


def test_network_access_is_the_operators_decision_per_tenant(region, keys, tmp_path):
    from wire.errors import AccessDeniedException

    src = code(tmp_path, ENV_ECHO)
    with Client.from_region(region.root, key_file=keys["mallory"]) as mallory, \
            Client.from_region(region.root, operator=True) as operator:
        with pytest.raises(AccessDeniedException, match="network access"):
            mallory.create_function("net", code=src, handler="handler.handle", network=True)
        mallory.create_function("net", code=src, handler="handler.handle")
        with pytest.raises(AccessDeniedException, match="network access"):
            mallory.update_function_configuration("net", network=True)
        assert operator.set_tenant_network("mallory", allowed=True)["network"] is True
        assert mallory.update_function_configuration("net", network=True)["network"] is True
        mallory.publish_version("net")
        operator.set_tenant_network("mallory", allowed=False)  # taken away: from every function and version
        assert mallory.get_function("net")["network"] is False
        assert all(v["network"] is False for v in mallory.list_versions("net"))


def test_a_sandbox_its_manager_stops_routing_to_is_destroyed_not_left_running(region, keys, tmp_path):
    """A host a frontend could not reach is dropped from routing; its sandboxes must not run on unseen (they hold
    memory, and nothing would ever reap them while their manager lives)."""
    from frontend.state import rendezvous_order

    with Client.from_region(region.root, key_file=keys["mallory"]) as c:
        c.create_function("dropped", code=code(tmp_path, ENV_ECHO), handler="handler.handle")
        sandbox_id = c.invoke("dropped").json()["sandbox"]
    where = {n["node_id"]: {s.sandbox_id: s for s in region.call("worker", m.ListSandboxes(),
                                                                  node=n["node_id"]).sandboxes}
             for n in region.nodes()}
    host = next(node for node, sandboxes in where.items() if sandbox_id in sandboxes)
    manager = rendezvous_order("mallory/dropped/$LATEST", [n["node_id"] for n in region.nodes()])[0]
    sandbox = where[host][sandbox_id]
    region.call("manager", m.ManagerRelease(function_key=sandbox.function_key, sandbox_id=sandbox_id,
                                            request_id="gone-host", outcome=m.ReleaseOutcome.NODE_FAILED),
                node=manager)
    wait_until(lambda: {s.sandbox_id for s in region.call("worker", m.ListSandboxes(), node=host).sandboxes}, 5,
               until=lambda alive: sandbox_id not in alive, what="the dropped sandbox to be destroyed")
