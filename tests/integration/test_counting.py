"""Concurrency limits as a tenant meets them on a real region: reservations, the two throttle reasons, limits
changed at run time, and counting replicas added and removed while it serves."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from flint import Client
from tests.conftest import ROOT, start_region
from tests.support.cluster import leader_of
from tests.support.wait import wait_until
from wire import messages as m
from wire.errors import TooManyRequestsException

pytestmark = pytest.mark.slow

SLOW = "import time\n\ndef handle(event, context):\n    time.sleep(event.get('s', 1.0))\n    return 'done'\n"


def burst(client_factory, function: str, n: int, seconds: float = 1.0) -> list[str]:
    """n invokes at the same moment, each from its own client; what each one got."""
    results: list[str] = [""] * n

    def one(i: int) -> None:
        with client_factory() as c:
            try:
                c.invoke(function, {"s": seconds})
                results[i] = "ok"
            except TooManyRequestsException as err:
                results[i] = err.reason or "throttled"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    region = start_region(tmp_path_factory.mktemp("counting"), settings={"unreserved_min": 1})
    yield region
    region.down()


@pytest.fixture(scope="module")
def slow_functions(region, tmp_path_factory):
    code = tmp_path_factory.mktemp("slow")
    (code / "handler.py").write_text(SLOW)
    with Client.from_region(region.root, retries=0) as c:
        for name in ("reserved", "off", "shared"):
            c.create_function(name, code=code, handler="handler.handle", timeout_s=5)
        c.invoke("shared", {"s": 0})  # warm a sandbox
    return code


def client_of(region):
    return lambda: Client.from_region(region.root, retries=0)


def test_reserved_concurrency_and_the_two_throttle_reasons(region, slow_functions):
    region.call("counting", m.SetLimit(tenant="default", limit=4))
    with Client.from_region(region.root) as c:
        assert c.put_function_concurrency("reserved", 1) == 1
        c.put_function_concurrency("off", 0)
        assert c.get_function("reserved")["reserved_concurrency"] == 1
        info = c.get_function_concurrency("reserved")
        assert info["tenant_limit"] == 4 and info["reserved_concurrency"] == 1

    got = burst(client_of(region), "reserved", 3)
    assert got.count("ok") == 1
    assert got.count("ReservedFunctionConcurrentInvocationLimitExceeded") == 2

    with Client.from_region(region.root, retries=0) as c:
        with pytest.raises(TooManyRequestsException) as off:
            c.invoke("off", {"s": 0})
    assert off.value.reason == "ReservedFunctionConcurrentInvocationLimitExceeded"

    # the shared pool is what is left: 4 - 1 - 0 = 3
    got = burst(client_of(region), "shared", 5)
    assert got.count("ok") == 3
    assert got.count("ConcurrentInvocationLimitExceeded") == 2


def test_limits_change_at_run_time_without_restarts(region, slow_functions):
    with Client.from_region(region.root) as c:
        c.delete_function_concurrency("reserved")
        c.delete_function_concurrency("off")
    region.call("counting", m.SetLimit(tenant="default", limit=2))
    assert burst(client_of(region), "shared", 4).count("ok") == 2
    region.call("counting", m.SetLimit(tenant="default", limit=4))
    assert burst(client_of(region), "shared", 4).count("ok") == 4
    with Client.from_region(region.root) as c:
        c.invoke("off", {"s": 0})  # reservation removed: back in the shared pool


def test_reservations_cannot_eat_the_unreserved_minimum(region, slow_functions):
    from wire.errors import InvalidParameterValueException

    region.call("counting", m.SetLimit(tenant="default", limit=4))
    with Client.from_region(region.root) as c:
        with pytest.raises(InvalidParameterValueException, match="UnreservedConcurrentExecution"):
            c.put_function_concurrency("reserved", 4)


def test_counting_replicas_are_added_and_removed_while_serving(tmp_path):
    region = start_region(tmp_path, nodes=4)
    try:
        with Client.from_region(region.root) as c:
            c.create_function("hello", code=ROOT / "examples" / "hello", handler="handler.handle")
            members = region.counting_add("n4")
            assert sorted(mb["node"] for mb in members) == ["n1", "n2", "n3", "n4"]
            leader = wait_until(lambda: leader_of(region, "counting"), 10, what="a counting leader")
            members = region.counting_remove(leader)  # the leader hands over, then leaves
            assert leader not in [mb["node"] for mb in members] and len(members) == 3
            assert any(mb["leader"] for mb in members)
            assert c.invoke("hello", {"name": "after"}).json()["message"] == "Hello, after!"
        region.stop_node("n4")  # the new replica survives a restart
        region.start_node("n4")
        region.wait_healthy(30)
        out = subprocess.run([sys.executable, "-m", "flint", "counting", "members", "--dir", str(region.root)],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "n4" in out.stdout and leader not in out.stdout
        wait_until(region.counting_members, 10, interval_s=0.2,
                   until=lambda members: all(mb["connected"] for mb in members),
                   what="every counting replica to be connected")
    finally:
        region.down()
