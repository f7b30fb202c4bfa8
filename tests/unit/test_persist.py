"""A node's writes to its data dir (wire/persist.py, wire/raft_storage.py): a failed one reaches the node's handler
with the path, the Raft journal claims its space before its mmap reaches it (a full disk is an ENOSPC at a claim,
never a SIGBUS), and the probe says when free space or inodes run under the margins."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.support.disk import tmpfs
from wire import persist
from wire.persist import MiB, check, margin_problem, persisting
from wire.raft import StateMachine
from wire.raft_storage import (
    CLAIM_MAX,
    CLAIM_MIN,
    ClaimedFile,
    CompactingJournal,
    DumpFile,
    claim_size,
)


@pytest.fixture
def failures():
    seen: list[tuple[str, OSError]] = []
    persist.on_failure(lambda path, err: seen.append((path, err)))
    yield seen
    persist.on_failure(None)


def test_a_failed_write_reaches_the_handler_with_its_path_and_is_raised(tmp_path, failures):
    with pytest.raises(OSError), persisting(tmp_path / "x"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError), persisting(tmp_path / "dir"):
        (tmp_path / "nowhere" / "f").write_bytes(b"")
    assert [p for p, _ in failures] == [str(tmp_path / "x"), str(tmp_path / "nowhere" / "f")]  # the file, if known
    assert failures[0][1].errno == errno.ENOSPC


def test_without_a_handler_the_error_is_only_raised(tmp_path):
    with pytest.raises(OSError), persisting(tmp_path):
        raise OSError(errno.EIO, "Input/output error")


def test_claims_double_a_small_file_and_grow_a_big_one_by_at_most_claim_max():
    assert claim_size(1024, 1100) == CLAIM_MIN + 4096  # 1 KiB + 64 KiB, in whole pages
    assert claim_size(1 * MiB, 1 * MiB + 1) == 2 * MiB
    assert claim_size(100 * MiB, 100 * MiB + 1) == 100 * MiB + CLAIM_MAX
    assert claim_size(1 * MiB, 60 * MiB + 3) == 60 * MiB + 4096  # one big command: what it needs


def test_a_claimed_file_has_no_hole_where_its_mmap_reaches(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(b"h" * 40)
    os.truncate(path, 1 * MiB)  # as pysyncobj's own file grows: a hole
    f = ClaimedFile(str(path))
    assert os.stat(path).st_blocks * 512 >= 1 * MiB
    f.write(3 * MiB, b"x" * 100)
    size = os.stat(path).st_size
    assert size == claim_size(1 * MiB, 3 * MiB + 100) and os.stat(path).st_blocks * 512 >= size
    assert f.read(3 * MiB, 100) == b"x" * 100 and f.read(0, 2) == b"hh"
    f._destroy()


def test_the_journal_and_dump_report_what_they_could_not_write(tmp_path, failures, monkeypatch):
    journal = CompactingJournal(str(tmp_path / "control.journal"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        journal.add(b"y" * 200_000, 1, 1)  # past the first page: a claim
    monkeypatch.undo()
    journal._destroy()
    dump = DumpFile("control", StateMachine({}))
    with pytest.raises(OSError):
        dump.serialize(str(tmp_path / "gone" / "control.dump.tmp"), ())  # no such directory
    assert [p for p, _ in failures] == [str(tmp_path / "control.journal"), str(tmp_path / "gone" / "control.dump.tmp")]


FILL_JOURNAL = textwrap.dedent("""
    import errno, sys
    from wire import persist
    from wire.raft_storage import CompactingJournal
    failed = []
    persist.on_failure(lambda path, err: failed.append((path, err.errno)))
    journal = CompactingJournal(sys.argv[1] + "/control.journal")
    i = 0
    try:
        while True:
            i += 1
            journal.add(b"z" * 100_000, i, 1)
    except OSError as err:
        assert err.errno == errno.ENOSPC and failed == [(sys.argv[1] + "/control.journal", errno.ENOSPC)], failed
        print("ENOSPC after", i - 1, "entries")
""")


def test_a_journal_on_a_full_disk_stops_at_an_enospc_never_a_sigbus(tmp_path):
    """In a process of its own: pysyncobj's own journal died of SIGBUS here (-7), which would end the test run."""
    with tmpfs(tmp_path / "disk", size_mb=4) as disk:
        out = subprocess.run([sys.executable, "-c", FILL_JOURNAL, str(disk)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60, check=False)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        assert "ENOSPC after" in out.stdout
        entries = int(out.stdout.split()[-2])
        assert 20 <= entries <= 41, out.stdout  # about what 4 MiB holds, less the last claim that did not fit


def test_the_margin_rule_names_what_is_short():
    assert margin_problem("/d", 200 * MiB, 5000, min_free_mb=128, min_free_inodes=1000) is None
    assert margin_problem("/d", 200 * MiB, None, min_free_mb=128, min_free_inodes=1000) is None  # no inode limit
    space = margin_problem("/d", 100 * MiB, 5000, min_free_mb=128, min_free_inodes=1000)
    assert space is not None and "/d: 100.0 MiB free" in space and "persist_min_free_mb" in space
    inodes = margin_problem("/d", 200 * MiB, 10, min_free_mb=128, min_free_inodes=1000)
    assert inodes is not None and "10 inodes free" in inodes and "persist_min_free_inodes" in inodes


def test_the_probe_writes_each_filesystem_once_and_leaves_nothing(tmp_path):
    (tmp_path / "raft").mkdir()
    assert check([tmp_path, tmp_path / "raft", tmp_path / "blobs"], min_free_mb=0, min_free_inodes=0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raft"]
    with tmpfs(tmp_path / "small", size_mb=4, inodes=2000) as small:
        problem = check([tmp_path, small], min_free_mb=8, min_free_inodes=10)
        assert problem is not None and problem.startswith(f"{small}: 4.0 MiB free")


def test_a_probe_that_cannot_write_is_a_persistence_failure(tmp_path, failures):
    with tmpfs(tmp_path / "full", size_mb=1, inodes=1) as full, pytest.raises(OSError):  # its root takes the inode
        check([full], min_free_mb=0, min_free_inodes=0)
    assert [(p, e.errno) for p, e in failures] == [(str(full / persist.PROBE_FILE), errno.ENOSPC)]
