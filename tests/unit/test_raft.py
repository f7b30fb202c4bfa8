"""A real three-replica pysyncobj group on loopback: commits, at-most-once, and a full restart losing nothing."""

from __future__ import annotations

import socket

import pytest
import uvloop

from tests.conftest import fresh_base_ip
from tests.support.wait import wait_until, wait_until_async
from wire.errors import ResourceConflictException
from wire.raft import GroupConfig, RaftGroup


class Ledger:
    def __init__(self):
        self.entries: list[int] = []

    def cmd_add(self, now: float, value: int) -> int:
        if value < 0:
            raise ResourceConflictException("negative values are refused")
        self.entries.append(value)
        return len(self.entries)


Ledger.COMMANDS = {"add": Ledger.cmd_add}


def make_group(tmp_path, base: str):
    prefix = base.rsplit(".", 1)[0]
    addrs = [f"{prefix}.{i + 1}:17600" for i in range(3)]
    return [
        RaftGroup(GroupConfig("ledger", a, [b for b in addrs if b != a], tmp_path / f"r{i}", "secret"), Ledger())
        for i, a in enumerate(addrs)
    ]


async def wait_leader(groups, timeout_s=10.0):
    await wait_until_async(lambda: [g.has_leader for g in groups], timeout_s, until=all, interval_s=0.02,
                           what="every replica to know a leader")


async def wait_entries(groups, n: int, timeout_s=10.0):
    await wait_until_async(lambda: [len(g.machine.state.entries) for g in groups], timeout_s,
                           until=lambda counts: min(counts) >= n, what=f"every replica to apply {n} entries")


async def wait_caught_up(groups, timeout_s=10.0):
    """Every replica has applied all that any of them knows to be committed (so a late, wrong entry shows)."""
    committed = max(g.sync.getStatus()["commit_idx"] for g in groups)
    await wait_until_async(lambda: [g.sync.getStatus()["last_applied"] for g in groups], timeout_s,
                           until=lambda applied: min(applied) >= committed,
                           what=f"every replica to apply the log up to index {committed}")


def port_free(address: str) -> bool:
    """Whether a new replica could bind `address` now, as pysyncobj binds (SO_REUSEADDR: only a listener is in
    the way)."""
    host, port = address.rsplit(":", 1)
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, int(port)))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def close(groups):
    for g in groups:
        g.close()
    # pysyncobj closes its peer ports on its own thread, after close() returns
    wait_until(lambda: {g.config.self_address: port_free(g.config.self_address) for g in groups}, 10,
               until=lambda free: all(free.values()), what="pysyncobj to release the peer ports")


def test_commands_apply_once_everywhere_and_survive_a_full_restart(tmp_path):
    base = fresh_base_ip()

    async def first_life():
        groups = make_group(tmp_path, base)
        try:
            await wait_leader(groups)
            follower = next(g for g in groups if g.status().state != "leader")
            for i in range(30):
                assert await follower.submit("add", {"value": i}, request_id=f"req-{i}") == i + 1
            # a retried command (same id) returns the first result and is not applied again
            assert await groups[0].submit("add", {"value": 99}, request_id="req-3") == 4
            with pytest.raises(ResourceConflictException, match="negative"):
                await groups[1].submit("add", {"value": -1}, request_id="neg")
            await wait_caught_up(groups)
            assert all(g.machine.state.entries == list(range(30)) for g in groups)
        finally:
            close(groups)

    async def second_life():
        groups = make_group(tmp_path, base)
        try:
            await wait_leader(groups)
            await wait_entries(groups, 30)
            assert all(g.machine.state.entries == list(range(30)) for g in groups)
            assert await groups[2].submit("add", {"value": 7}, request_id="req-5") == 6  # dedup survived
            assert await groups[2].submit("add", {"value": 30}, request_id="req-30") == 31
        finally:
            close(groups)

    uvloop.run(first_life())
    uvloop.run(second_life())


def test_peer_port_binds_only_the_cluster_address(tmp_path):
    base = fresh_base_ip()
    groups = make_group(tmp_path, base)
    try:
        # another address of the loopback net can still bind the same port: pysyncobj did not take 0.0.0.0
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((base.rsplit(".", 1)[0] + ".200", 17600))
        other.close()
    finally:
        close(groups)


class Echo:
    """A state whose command returns what it is given: the results a dedup window has to hold."""

    def cmd_echo(self, now: float, data: str) -> str:
        return data


Echo.COMMANDS = {"echo": Echo.cmd_echo}


def test_the_dedup_window_is_bounded_in_bytes_as_well_as_in_count():
    from wire.raft import StateMachine

    machine = StateMachine(Echo(), dedup_window=1000, dedup_window_bytes=100_000)
    big = "x" * 10_000
    for i in range(50):  # 50 results of 10 KB: only about 100 KB of them stay
        assert machine.apply(f"r{i}", 0.0, "echo", {"data": big}, _doApply=True) == ("ok", big)
    assert machine.applied_bytes <= 100_000 and 8 <= len(machine.applied) <= 10
    assert "r49" in machine.applied and "r0" not in machine.applied  # the newest are remembered
    for i in range(50, 3000):  # many small results: the count bounds them
        machine.apply(f"r{i}", 0.0, "echo", {"data": "y"}, _doApply=True)
    assert len(machine.applied) == 1000
