"""A replica's files (wire/raft_storage.py): the journal shrinks when pysyncobj drops entries, the dump is read back
(its own format and pysyncobj's), and a real three-replica group compacts by bytes and restarts from its files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import uvloop
from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj.journal import FileJournal

from tests.conftest import fresh_base_ip
from tests.support.wait import wait_until_async
from tests.unit.test_raft import close, wait_caught_up, wait_leader
from wire.raft import GroupConfig, RaftGroup, StateMachine
from wire.raft_storage import CompactingJournal, DumpFile

KB = 1024
MB = 1024 * KB


def on_disk(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


def fill(journal, n: int, size: int) -> None:
    for i in range(1, n + 1):
        journal.add(os.urandom(size), i, 1)


def test_pysyncobj_own_journal_keeps_its_size_when_entries_are_dropped(tmp_path):
    """Why CompactingJournal exists: what compaction calls frees nothing in pysyncobj's FileJournal."""
    journal = FileJournal(str(tmp_path / "j"))
    fill(journal, 200, 50 * KB)
    before = on_disk(tmp_path / "j")
    journal.deleteEntriesTo(198)
    journal.flush()
    assert len(journal) == 2 and on_disk(tmp_path / "j") >= before > 9 * MB
    journal._destroy()


def test_the_journal_shrinks_to_what_it_keeps_and_reopens_the_same(tmp_path):
    path = str(tmp_path / "control.journal")
    journal = CompactingJournal(path)
    fill(journal, 200, 50 * KB)
    journal.setCurrentTerm(5, "10.0.0.1:7200")
    journal.setRaftCommitIndex(190)
    assert on_disk(path) > 9 * MB and journal.appended_bytes == 200 * 50 * KB
    kept = list(journal[150:])
    journal.deleteEntriesTo(150)
    assert list(journal[:]) == kept and on_disk(path) < 6 * MB and journal.appended_bytes == 0
    journal.add(b"after", 201, 5)
    journal._destroy()

    again = CompactingJournal(path)
    assert list(again[:]) == kept + [(b"after", 201, 5)]
    assert (again.getCurrentTerm(), again.getVotedForNodeId(), again.getRaftCommitIndex()) == (5, "10.0.0.1:7200", 190)
    again.clear()  # pysyncobj does this before installing a snapshot
    assert len(again) == 0 and on_disk(path) < 64 * KB
    again._destroy()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.journal", "control.journal.meta"]


class Blobs:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}

    def cmd_put(self, now: float, key: str, data: bytes) -> int:
        self.blobs[key] = data
        return len(self.blobs)


Blobs.COMMANDS = {"put": Blobs.cmd_put}


def test_a_dump_written_by_pysyncobj_itself_is_read(tmp_path):
    """A replica upgraded in place finds the dump pysyncobj wrote: gzip'd pickle of (data, last, previous, members)
    where data is [the SyncObj's attributes, the consumer's]."""
    old = StateMachine(Blobs())
    old.state.blobs["k"] = b"v"
    old.applied_count = 7
    with open(tmp_path / "control.dump", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as g:
        pysyncobj_pickle.dump(([{}, old._serialize()], (b"c", 9, 2), (b"b", 8, 2), {"members"}), g)
    fresh = StateMachine(Blobs())
    raft_data = DumpFile("control", fresh).deserialize(str(tmp_path / "control.dump"))
    assert raft_data == ((b"c", 9, 2), (b"b", 8, 2), {"members"})
    assert fresh.state.blobs == {"k": b"v"} and fresh.applied_count == 7


def make_blob_group(tmp_path, base: str) -> list[RaftGroup]:
    prefix = base.rsplit(".", 1)[0]
    addrs = [f"{prefix}.{i + 1}:17610" for i in range(3)]
    return [RaftGroup(GroupConfig("blobs", a, [b for b in addrs if b != a], tmp_path / f"r{i}", "secret",
                                  compaction_mb=1, compaction_interval_s=3600), Blobs())
            for i, a in enumerate(addrs)]


def test_a_group_compacts_by_bytes_and_restarts_from_its_files(tmp_path):
    base = fresh_base_ip()
    # 6 MB through a log compacted every 1 MB. ASCII entries under 64 KiB: pysyncobj sends a bigger entry in chunks,
    # and cuts the last one short when pickling made the entry longer than its command (bytes >= 0x80).
    blobs = {f"k{i}": os.urandom(30 * KB).hex().encode() for i in range(100)}

    async def first_life():
        groups = make_blob_group(tmp_path, base)
        try:
            await wait_leader(groups)
            terms = [g.status().term for g in groups]
            for i, (key, data) in enumerate(blobs.items()):
                assert await groups[i % 3].submit("put", {"key": key, "data": data}, request_id=key) == i + 1
            await wait_caught_up(groups)
            assert [g.status().term for g in groups] == terms  # no dump stalled a replica into an election
        finally:
            close(groups)
        for i in range(3):
            raft = tmp_path / f"r{i}"
            # the journal holds at most what came after the last cut (about 1 MB, pickled) in a file that doubles
            assert on_disk(raft / "blobs.journal") < 4 * MB and on_disk(raft / "blobs.dump") > 3 * MB

    async def second_life():
        groups = make_blob_group(tmp_path, base)
        try:
            await wait_leader(groups)
            await wait_until_async(lambda: [len(g.machine.state.blobs) for g in groups], 10,
                                   until=lambda n: min(n) == len(blobs), what="every replica to have every blob")
            assert all(g.machine.state.blobs == blobs for g in groups)
            assert await groups[1].submit("put", {"key": "k3", "data": b""}, request_id="k3") == 4  # dedup kept
        finally:
            close(groups)

    uvloop.run(first_life())
    uvloop.run(second_life())
