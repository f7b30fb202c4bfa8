"""What a Raft replica keeps on disk, in the node's data dir: pysyncobj's journal, shrunk when compacted, its space
claimed before it is written, and the state machine's dump, written fast enough not to stall Raft.

pysyncobj compacts its log by dumping the state (`fullDumpFile`) and dropping the journal's entries up to the
dump. Two things keep that from freeing anything or from being safe to do often:
- its FileJournal is an mmap that only ever grows: dropping entries rewrites the rest from the start of the same
  file, and the file keeps its size. `CompactingJournal` writes the kept entries to a new file and renames it over
  the old one whenever pysyncobj drops entries (a compaction, or a snapshot received from the leader).
- its own dump is pickle through gzip at level 9 on the tick thread (with `useFork=False`, which a node with
  threads and an event loop needs): 1.9 s for 75 MB of event payloads, 0.3 s for the dedup window alone, each a
  stall past the Raft timeout (0.15 s). `DumpFile` writes plain pickle (protocol 5): 0.06 s and 0.03 s.
And one thing keeps it from being safe on a full disk: FileJournal grows its mmap by truncating the file longer,
so the new pages are holes, and the first write to one on a full disk is a SIGBUS that kills the node with no word
of why. `ClaimedFile` replaces the journal's file: it claims the space (`posix_fallocate`) before the mmap reaches
it, in chunks, so a full disk is an ENOSPC at that claim, before anything is written.
Every write of the journal, its meta file and the dump runs under `wire.persist.persisting`: a failed one ends
the node (one log line), where pysyncobj would log and retry for ever.

pysyncobj makes its journal with the module function `pysyncobj.syncobj.createJournal`; `install_journal()`
points it at `CompactingJournal` (a documented monkeypatch, made once, here).
"""

from __future__ import annotations

import gzip
import mmap
import os
import pickle
import weakref
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
import structlog
from pysyncobj.journal import FileJournal, Journal, MemoryJournal

from wire.errors import error_fields
from wire.persist import failed, persisting

log = structlog.get_logger("raft")

DUMP_FORMAT = "flint-dump-1"
_GZIP_MAGIC = b"\x1f\x8b"  # pysyncobj's own dump format, read back from replicas that wrote it
CLAIM_MIN = 64 * 1024  # a journal's file grows by at least this, doubling while small ...
CLAIM_MAX = 16 * 1024 * 1024  # ... and by at most this past what it must hold
_PAGE = 4096


def claim_size(size: int, end: int) -> int:
    """The size a journal file of `size` bytes grows to when a write must reach `end`: doubled (as pysyncobj's own
    file grows) but by CLAIM_MIN to CLAIM_MAX, and at least to `end`, in whole pages."""
    grown = max(end, size + min(max(size, CLAIM_MIN), CLAIM_MAX))
    return -(-grown // _PAGE) * _PAGE


class ClaimedFile:
    """pysyncobj's ResizableFile (write, read, flush, _destroy) with every byte the mmap covers allocated on disk
    first: the pages of a file made longer by ftruncate are holes, and a write to a hole on a full disk is a SIGBUS,
    where a claim (`posix_fallocate`) fails with ENOSPC before anything is written."""

    def __init__(self, path: str):
        self._f = open(path, "r+b")
        size = os.fstat(self._f.fileno()).st_size
        if size:
            os.posix_fallocate(self._f.fileno(), 0, size)  # the holes a journal grown by pysyncobj itself left
        self._mm = mmap.mmap(self._f.fileno(), 0)

    def write(self, offset: int, values: bytes) -> None:
        end = offset + len(values)
        size = len(self._mm)  # the file's size too: only this grows it
        if end > size:
            grown = claim_size(size, end)
            os.posix_fallocate(self._f.fileno(), size, grown - size)  # ENOSPC here, a safe point
            self._mm.resize(grown)  # the file is that long already: only the mapping grows
        self._mm[offset:end] = values

    def read(self, offset: int, size: int) -> bytes:
        return self._mm[offset:offset + size]

    def flush(self) -> None:
        self._mm.flush()

    def _destroy(self) -> None:
        self._mm.flush()
        self._mm.close()
        self._f.close()


def _claimed_journal(path: str) -> FileJournal:
    """pysyncobj's FileJournal on a ClaimedFile (it reads the entries through its own file, made with no hole past
    the first page, then writes through ours)."""
    journal = FileJournal(path)
    own = getattr(journal, "_FileJournal__journalFile", None)
    if own is None:
        raise RuntimeError("this pysyncobj's FileJournal keeps its file elsewhere: wire/raft_storage.py cannot claim "
                           "the journal's space; update it for this pysyncobj version")
    journal._FileJournal__journalFile = ClaimedFile(path)
    own._destroy()
    return journal


class CompactingJournal(Journal):
    """pysyncobj's FileJournal, rewritten to a file of its own size whenever entries are dropped from its head.

    `appended_bytes` counts the bytes of commands appended since the last rewrite: RaftGroup compacts the log
    when it passes the node's `raft_compaction_mb`."""

    def __init__(self, path: str):
        self.path = path
        self.appended_bytes = 0
        with persisting(path):
            self._stale(path + ".compact")
            self._inner = _claimed_journal(path)

    # --- what shrinks the file -----------------------------------------------------------------------------------

    def deleteEntriesTo(self, entryTo: int) -> None:
        with persisting(self.path):
            self._rewrite(self._inner[entryTo:])

    def clear(self) -> None:
        with persisting(self.path):
            self._rewrite([])

    def _rewrite(self, kept: list[tuple[bytes, int, int]]) -> None:
        """Write `kept` to a new file, rename it over the journal, then switch to it: a crash leaves the old
        journal or the new one, never half of one, and a reader on another thread sees one or the other."""
        tmp = self.path + ".compact"
        self._stale(tmp)
        fresh = _claimed_journal(tmp)
        for entry in kept:
            fresh.add(*entry)
        fresh._destroy()  # flushed and closed
        self._inner.onOneSecondTimer()  # a pending commit index reaches the meta file, which the new one reads
        os.replace(tmp, self.path)
        old, self._inner = self._inner, _claimed_journal(self.path)
        old._destroy()  # unmaps the old file: its space is freed now
        self.appended_bytes = 0

    @staticmethod
    def _stale(tmp: str) -> None:
        for path in (tmp, tmp + ".meta"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # --- the rest of pysyncobj's Journal, as FileJournal does it ---------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        self.appended_bytes += len(command)
        with persisting(self.path):
            self._inner.add(command, idx, term)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        with persisting(self.path):
            self._inner.deleteEntriesFrom(entryFrom)

    def __getitem__(self, item: Any) -> Any:
        return self._inner[item]

    def __len__(self) -> int:
        return len(self._inner)

    def _destroy(self) -> None:
        with persisting(self.path):
            self._inner._destroy()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._inner.setRaftCommitIndex(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:
        return self._inner.getRaftCommitIndex()

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        with persisting(self.path + ".meta"):  # stored at once: Raft votes on it
            self._inner.setCurrentTerm(term, votedForNodeId)

    def getCurrentTerm(self) -> int:
        return self._inner.getCurrentTerm()

    def getVotedForNodeId(self) -> Any:
        return self._inner.getVotedForNodeId()

    def onOneSecondTimer(self) -> None:
        with persisting(self.path + ".meta"):  # the commit index, when it moved
            self._inner.onOneSecondTimer()

    def flush(self) -> None:
        with persisting(self.path):
            self._inner.flush()

    def __getattr__(self, name: str) -> Any:  # whatever a later pysyncobj adds to FileJournal
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


_journals: weakref.WeakValueDictionary[str, CompactingJournal] = weakref.WeakValueDictionary()


def _create_journal(journalFile: str | None = None) -> Journal:
    if journalFile is None:
        return MemoryJournal()
    journal = _journals[journalFile] = CompactingJournal(journalFile)
    return journal


def journal_at(path: str) -> CompactingJournal | None:
    """The journal a SyncObj of this process keeps at `path`, if it is a CompactingJournal."""
    return _journals.get(path)


def install_journal() -> None:
    """Make every SyncObj created from now on keep its log in a CompactingJournal."""
    if not hasattr(pysyncobj.syncobj, "createJournal"):
        raise RuntimeError("this pysyncobj has no syncobj.createJournal: wire/raft_storage.py cannot install its "
                           "journal; update it for this pysyncobj version")
    pysyncobj.syncobj.createJournal = _create_journal


class DumpFile:
    """pysyncobj's `serializer`/`deserializer` pair for one state machine: the machine's replicated attributes and
    pysyncobj's own bookkeeping (the last applied entries, the members), as one plain pickle."""

    def __init__(self, group: str, machine: Any):
        self.group = group
        self.machine = machine

    def serialize(self, path: str, raft_data: tuple) -> None:
        try:
            with self.machine.read():  # the tick thread applies commands; this keeps readers off it meanwhile
                blob = pickle.dumps((DUMP_FORMAT, self.machine._serialize(), raft_data), protocol=5)
            with open(path, "wb") as f:
                f.write(blob)
        except Exception as err:
            if isinstance(err, OSError):
                failed(path, err)  # ends the node (one line); pysyncobj would only retry the dump later
            log.error("raft.dump_failed", group=self.group, path=path, **error_fields(err),
                      hint="the log is not compacted and keeps growing until a dump succeeds")
            raise

    def deserialize(self, path: str) -> tuple:
        try:
            with open(path, "rb") as f:
                head = f.read(2)
                f.seek(0)
                if head == _GZIP_MAGIC:  # written by pysyncobj itself: (data, last, previous, members)
                    with gzip.GzipFile(fileobj=f) as g:
                        data, *raft_data = pickle.load(g)
                    state = data[1]  # data: [SyncObj's own attributes, the one consumer's]
                else:
                    fmt, state, raft_data = pickle.load(f)
                    if fmt != DUMP_FORMAT:
                        raise ValueError(f"unknown dump format {fmt!r}")
            self.machine._deserialize(state)
            return tuple(raft_data)
        except Exception as err:
            log.error("raft.dump_unreadable", group=self.group, path=str(Path(path)), **error_fields(err),
                      hint="this replica's state is incomplete: stop the node, delete its raft files for this "
                           "group and start it again to fetch a snapshot from the leader")
            raise
