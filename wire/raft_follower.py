"""A follower keeps the log entries it already holds, as Raft says, where pysyncobj deletes and re-adds them.

Raft (Ongaro and Ousterhout, figure 2, AppendEntries rule 3): "If an existing entry conflicts with a new one (same
index but different terms), delete the existing entry and all that follow it". pysyncobj (0.3.17,
`SyncObj.__onMessageReceived`) deletes every entry after prevLogIdx whenever the follower holds one, conflicting or
not, adds the message's entries back, and logs CRITICAL "truncating already-applied log entries ... state machine
may have diverged" when it deleted applied ones.

A leader re-sends entries a follower holds all the time under load. With unbatched appends (`RAFT_TUNING`) it sends
each entry as it is appended; an acknowledgement of an earlier one, arriving while later ones are in flight, sets
its next index for that follower back (its `next_node_idx` handling), so its next send starts at entries the
follower has. Measured under load with leader changes (tests/chaos/test_raft_alarms.py): 56 such CRITICALs in one
run, every one deleting entries equal (index, term and command) to those sent, none conflicting; with this class,
819 appends in a run re-sent held entries (61 of them applied) and nothing was deleted. An applied entry is
committed, and a committed entry is only ever sent again identical (log matching, leader completeness): the alarm
was false. The deletion was not harmless, though: until the re-add the follower held less than it had
acknowledged, which a commit counts on.

`LogMatchingSyncObj` gives pysyncobj such a message (for an entry sent in pieces, its last piece, assembled) with the
entries the follower holds (same index and term) taken off its head and prevLogIdx moved past them: pysyncobj then
deletes from the first entry that conflicts, or nothing (a re-send that stops short of the follower's log still
drops the unapplied entries past it, as before), and acknowledges the same entries as before. A conflict at an
applied index is a real divergence: still CRITICAL. Only the message is changed. Should a pysyncobj release
rename the members read here, messages pass unchanged (its own behaviour) with one warning;
tests/unit/test_raft_follower.py drives the real handler and would fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pysyncobj.pickle
import structlog
from pysyncobj import SyncObj

log = structlog.get_logger("raft")

Entry = tuple[bytes, int, int]  # a log entry as pysyncobj keeps it: command, index, term


def without_held(message: dict[str, Any], entry_at: Callable[[int], Entry | None], last_applied: int) -> dict[str, Any]:
    """The append_entries `message` with the entries the follower already holds taken off its head, prevLogIdx
    moved past them; `message` itself when there are none (or it is not a plain append)."""
    prev, entries = message.get("prevLogIdx"), message.get("entries") or []
    if prev is None or "transmission" in message:
        return message  # a snapshot, or one large entry in pieces: pysyncobj's way
    mine = entry_at(prev)
    if mine is None or mine[2] != message.get("prevLogTerm"):
        return message  # the logs differ at prevLogIdx: pysyncobj asks for earlier entries and deletes nothing
    held = 0
    for _, idx, term in entries:
        mine = entry_at(idx)
        if mine is None or mine[2] != term:
            break  # the first entry the follower lacks, or the first conflict: pysyncobj deletes from here
        held += 1
    new_prev = prev + held
    if held == len(entries) and last_applied > new_prev and entry_at(last_applied) is not None:
        new_prev = last_applied  # all sent is held, and more: what it applied was committed, so the leader's too
    if new_prev == prev:
        return message
    at = entry_at(new_prev)
    assert at is not None
    return {**message, "prevLogIdx": new_prev, "prevLogTerm": at[2], "entries": list(entries[held:])}


class LogMatchingSyncObj(SyncObj):
    """pysyncobj's SyncObj whose follower side keeps the entries it holds (see the module's docstring)."""

    _warned = False

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> Any:  # pysyncobj's handler of peer messages
        if isinstance(message, dict) and message.get("type") == "append_entries" and "prevLogIdx" in message:
            message = self._without_held(message)
        return super()._SyncObj__onMessageReceived(node, message)  # type: ignore[misc]

    def _without_held(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            journal, last_applied = self._SyncObj__raftLog, self._SyncObj__raftLastApplied  # type: ignore[attr-defined]
            if message.get("transmission") == "finish":
                message = self._assembled(message)
        except AttributeError:
            if not LogMatchingSyncObj._warned:
                LogMatchingSyncObj._warned = True
                log.warning("raft.log_matching_unavailable", why="this pysyncobj names its log otherwise")
            return message

        def entry_at(idx: int) -> Entry | None:
            first = journal[0][1]
            return journal[idx - first] if first <= idx <= journal[-1][1] else None

        return without_held(message, entry_at, last_applied)

    def _assembled(self, message: dict[str, Any]) -> dict[str, Any]:
        """The last piece of one large entry (over appendEntriesBatchSizeBytes, sent in pieces) as the plain append of
        that entry pysyncobj makes of it, so the entry can be compared with the one held. Async events of 64 KiB
        and more travel so, and were re-sent as often as the others."""
        pieces = self._SyncObj__recvTransmission  # type: ignore[attr-defined]
        try:
            entry = pysyncobj.pickle.loads(pieces + message["data"])
        except Exception:  # noqa: BLE001 - not an entry: pysyncobj's own handling, and its own failure
            return message
        self._SyncObj__recvTransmission = ""  # as pysyncobj leaves it after the last piece
        plain = {k: v for k, v in message.items() if k not in ("transmission", "data")}
        return {**plain, "entries": [entry]}
