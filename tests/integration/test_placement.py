"""Placement on a real region with little room: capacity leased but unused goes back where it is needed."""

from __future__ import annotations

import pytest

from flint import Client
from tests.conftest import dump_logs, start_region
from tests.support.wait import wait_until
from wire import messages as m

pytestmark = pytest.mark.slow


def test_an_empty_lease_goes_back_within_seconds_where_its_az_is_short_of_room(tmp_path, example_code):
    # each worker offers 1536 MB (2048 less 512 kept for the node) and a lease carries 1024: once one lease is
    # out, that host - the only one in its AZ - cannot take another, so its AZ is short of free capacity
    region = start_region(tmp_path, settings={"worker_memory_mb": 2048, "lease_block_mb": 1024,
                                              "keep_alive_s": 1.0})
    try:
        with Client.from_region(region.root) as client:
            client.create_function("hello", code=example_code, handler="handler.handle", memory_mb=128)
            assert client.invoke("hello", {"name": "room"}).function_error is None
            leases = region.call("placement", m.ListWorkerLeases())
            assert len(leases.leases) == 1
            az = leases.leases[0].node.az
            assert leases.headroom.short_azs == (az,)
            # the idle sandbox is reaped after its 1 s keep-alive, and its empty lease goes back in seconds,
            # not after the 5 minutes an unused lease is otherwise kept
            after = wait_until(lambda: region.call("placement", m.ListWorkerLeases()), 20, interval_s=0.5,
                               until=lambda leases: not leases.leases, what="the empty lease to go back")
            assert after.leases == () and after.headroom.short_azs == ()
            assert client.invoke("hello", {"name": "again"}).function_error is None  # and the next invoke leases afresh
    except Exception:
        dump_logs(region)
        raise
    finally:
        region.down()
