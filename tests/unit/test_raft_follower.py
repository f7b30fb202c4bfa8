"""A follower keeps the entries it holds when a leader sends them again (wire/raft_follower.py): the rewrite of
an append_entries message, and pysyncobj's own handler driven through it on the installed release."""

from __future__ import annotations

import logging
import struct

import pysyncobj.pickle
import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.node import TCPNode
from pysyncobj.transport import Transport

from wire.raft_follower import LogMatchingSyncObj, without_held

NO_OP = struct.pack("B", 1)  # pysyncobj's no-op command: applying it changes nothing


def log_of(*terms: int) -> dict[int, tuple[bytes, int, int]]:
    """A follower's log: entry i (from 1) has term terms[i-1]."""
    return {i: (b"c%d" % i, i, t) for i, t in enumerate(terms, start=1)}


def append(prev: int, prev_term: int, *entries: tuple[int, int], commit: int = 0) -> dict:
    return {"type": "append_entries", "term": 2, "commit_index": commit, "prevLogIdx": prev, "prevLogTerm": prev_term,
            "entries": [(b"c%d" % i, i, t) for i, t in entries]}


def test_entries_the_follower_holds_are_taken_off_so_nothing_is_deleted():
    held = log_of(1, 1, 1, 1)  # entries 1-4, all applied
    msg = without_held(append(2, 1, (3, 1), (4, 1), (5, 1)), held.get, last_applied=4)
    assert (msg["prevLogIdx"], msg["prevLogTerm"], [e[1] for e in msg["entries"]]) == (4, 1, [5])


def test_deletion_starts_at_the_first_conflicting_entry():
    held = log_of(1, 1, 1, 1)  # 3 and 4 from an old leader's term, never committed
    msg = without_held(append(2, 1, (3, 2), (4, 2)), held.get, last_applied=2)
    assert (msg["prevLogIdx"], [e[1] for e in msg["entries"]]) == (2, [3, 4])  # as sent: pysyncobj deletes 3, 4
    msg = without_held(append(1, 1, (2, 1), (3, 2)), held.get, last_applied=2)
    assert (msg["prevLogIdx"], [e[1] for e in msg["entries"]]) == (2, [3])


def test_a_mismatch_at_prev_or_a_snapshot_or_an_entry_in_pieces_is_left_to_pysyncobj():
    held = log_of(1, 1, 1)
    for msg in (append(2, 9, (3, 1)), append(7, 1), {**append(1, 1), "transmission": "start"},
                {"type": "append_entries", "term": 2, "commit_index": 3, "serialized": b""}):
        assert without_held(msg, held.get, last_applied=3) is msg


def test_a_resend_shorter_than_the_follower_log_keeps_what_it_applied():
    held = log_of(1, 1, 1, 1, 1)  # 1-5, 1-4 applied: committed, hence the leader's own
    msg = without_held(append(1, 1, (2, 1)), held.get, last_applied=4)
    assert (msg["prevLogIdx"], msg["entries"]) == (4, [])  # pysyncobj may drop 5 (not applied), never 2-4


# --- pysyncobj's own handler, on the installed release --------------------------------------------------------------


class Recorded(Transport):
    """A transport that sends nothing anywhere and remembers what it was asked to send."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sent: list[dict] = []

    def send(self, node, message):
        self.sent.append(message)
        return True


def follower(cls):
    conf = SyncObjConf(autoTick=False, appendEntriesUseBatch=False)
    obj = cls("127.0.0.1:1", ["127.0.0.1:2"], conf, transport=Recorded(None, None, None))
    return obj, obj._SyncObj__transport


def resend_applied_entries(cls, caplog, in_pieces: bool) -> list[str]:
    """A follower applies 2-4 from a leader, then the leader sends 3-5 again (its next index for the follower
    set back by an acknowledgement), as under load with unbatched appends; or, `in_pieces`, sends 3 again as one
    large entry goes, in pieces. What pysyncobj logged CRITICAL."""
    obj, transport = follower(cls)
    leader = TCPNode("127.0.0.1:2")
    entries = [(NO_OP, i, 1) for i in range(2, 6)]
    handler = obj._SyncObj__onMessageReceived
    sent = {"type": "append_entries", "term": 1, "commit_index": 4}
    try:
        with caplog.at_level(logging.CRITICAL, logger="pysyncobj"):
            handler(leader, {**sent, "prevLogIdx": 1, "prevLogTerm": obj._SyncObj__raftLog[0][2],
                             "entries": entries[:3]})
            obj.doTick(0)
            assert obj._SyncObj__raftLastApplied == 4
            if in_pieces:
                whole = pysyncobj.pickle.dumps(entries[1])
                for piece, data in (("start", whole[:10]), ("process", whole[10:20]), ("finish", whole[20:])):
                    handler(leader, {**sent, "prevLogIdx": 2, "prevLogTerm": 1, "transmission": piece, "data": data})
            else:
                handler(leader, {**sent, "prevLogIdx": 2, "prevLogTerm": 1, "entries": entries[1:]})
        # the log's last entry after: pysyncobj alone drops applied entry 4 when 3 comes again in pieces
        last = 5 if not in_pieces else 3 if cls is SyncObj else 4
        assert [e[1:] for e in obj._SyncObj__raftLog[1:]] == [(i, 1) for i in range(2, last + 1)]
        assert transport.sent[-1]["type"] == "next_node_idx" and transport.sent[-1]["success"]
        assert transport.sent[-1]["next_node_idx"] == last + 1
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL]
    finally:
        obj.destroy()


@pytest.mark.parametrize("in_pieces", [False, True], ids=["entries", "one-large-entry-in-pieces"])
def test_pysyncobj_itself_deletes_and_cries_divergence_on_a_resend(caplog, in_pieces):
    critical = resend_applied_entries(SyncObj, caplog, in_pieces)
    assert critical and "truncating already-applied" in critical[0]  # what the nodes logged: the false alarm


@pytest.mark.parametrize("in_pieces", [False, True], ids=["entries", "one-large-entry-in-pieces"])
def test_a_log_matching_follower_keeps_the_entries_and_stays_quiet(caplog, in_pieces):
    assert resend_applied_entries(LogMatchingSyncObj, caplog, in_pieces) == []


@pytest.mark.parametrize("member", ["_SyncObj__raftLog", "_SyncObj__raftLastApplied"])
def test_the_pysyncobj_members_read_are_there(member):
    obj, _ = follower(LogMatchingSyncObj)
    try:
        assert hasattr(obj, member), f"pysyncobj no longer has {member}: wire/raft_follower.py passes messages on"
    finally:
        obj.destroy()
