"""A replicated state machine: a plain state object applied through a pysyncobj group.

The state object has no I/O and no clock: every command names an entry of the state class's `COMMANDS` table
and carries the proposer's timestamp, so every replica applies it identically. Commands carry a request id and are applied at most once
(results are remembered for a bounded window), so a caller may retry any ambiguous outcome - leader change,
timeout, lost connection - with the same id and get the first result back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from pysyncobj import FAIL_REASON, SyncObjConf, SyncObjConsumer, replicated

from wire.config import DEFAULTS
from wire.errors import FlintError, Reason, RequestTooLargeException, ServiceException, from_reply
from wire.messages import RaftStatus
from wire.raft_follower import LogMatchingSyncObj
from wire.raft_storage import DumpFile, install_journal, journal_at
from wire.raft_transport import COMMAND_MAX_BYTES, GuardedTransport, MiB

log = structlog.get_logger("raft")

# Measured on a 2-core box (see ARCHITECTURE.md): unbatched appends commit in ~1 ms; these timeouts give a new
# leader within about a second of losing one.
RAFT_TUNING = dict(
    appendEntriesUseBatch=False,
    raftMinTimeout=0.15,
    raftMaxTimeout=0.3,
    appendEntriesPeriod=0.03,
    connectionTimeout=0.5,
    connectionRetryTime=0.3,
    leaderFallbackTimeout=0.5,
)
DEDUP_WINDOW = 50_000  # results remembered for retries, at most this many ...
DEDUP_WINDOW_BYTES = 32 * 1024 * 1024  # ... and about this much of them (results kept in memory and in every dump)
_RETRYABLE = {
    FAIL_REASON.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.DISCARDED,
    FAIL_REASON.NOT_LEADER,
    FAIL_REASON.LEADER_CHANGED,
    FAIL_REASON.UNKNOWN_OUTCOME,
}


class StateMachine(SyncObjConsumer):
    """Applies commands to `state` at most once per request id. Reads go through `read()`, under the lock."""

    def __init__(self, state: Any, dedup_window: int = DEDUP_WINDOW, dedup_window_bytes: int = DEDUP_WINDOW_BYTES):
        # Attributes set before SyncObjConsumer.__init__ are not part of the replicated snapshot.
        self._lock = threading.RLock()
        self._window = dedup_window
        self._window_bytes = dedup_window_bytes
        super().__init__()
        self.state = state
        self.applied: collections.OrderedDict[str, tuple[str, Any]] = collections.OrderedDict()
        self.applied_count = 0
        self.applied_bytes = 0  # what the remembered results weigh (`result_size`), the same on every replica

    @replicated
    def apply(self, request_id: str, ts: float, op: str, args: dict[str, Any]) -> tuple[str, Any]:
        with self._lock:
            done = self.applied.get(request_id)
            if done is not None:
                return done
            try:
                command = type(self.state).COMMANDS.get(op)
                if command is None:
                    raise ServiceException(f"no command {op!r} in {type(self.state).__name__}", retryable=False)
                outcome: tuple[str, Any] = ("ok", command(self.state, now=ts, **args))
            except FlintError as err:
                outcome = ("err", err.to_wire())
            except Exception as exc:  # a bug must fail the same way on every replica, not diverge them
                outcome = ("err", ServiceException(f"{op} failed: {exc!r}", retryable=False).to_wire())
            self.applied[request_id] = outcome
            self.applied_count += 1
            self.applied_bytes += result_size(outcome)
            while len(self.applied) > self._window or (self.applied_bytes > self._window_bytes
                                                       and len(self.applied) > 1):
                _, dropped = self.applied.popitem(last=False)
                self.applied_bytes = max(0, self.applied_bytes - result_size(dropped))
            return outcome

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self._lock:
            super()._deserialize(data)

    @contextmanager
    def read(self) -> Iterator[Any]:
        with self._lock:
            yield self.state


@dataclasses.dataclass
class GroupConfig:
    name: str
    self_address: str  # host:port, bound only there
    peers: list[str]  # host:port of the other replicas
    data_dir: Path
    password: str
    # Log compaction (a dump of the state, then the journal cut down to what follows it): whichever comes first.
    compaction_entries: int = DEFAULTS.raft_compaction_entries
    compaction_interval_s: float = DEFAULTS.raft_compaction_interval_s
    compaction_mb: int = DEFAULTS.raft_compaction_mb


class RaftGroup:
    """One replica of a named Raft group, and an asyncio way to submit commands to it."""

    def __init__(self, config: GroupConfig, state: Any, on_state_change: Callable[[int, int], None] | None = None):
        self.config = config
        self.machine = StateMachine(state)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        dump = DumpFile(config.name, self.machine)
        journal_path = str(config.data_dir / f"{config.name}.journal")
        conf = SyncObjConf(
            password=config.password,
            bindAddress=config.self_address,  # without it pysyncobj binds 0.0.0.0: its pickle port must stay private
            journalFile=journal_path,
            fullDumpFile=str(config.data_dir / f"{config.name}.dump"),
            serializer=dump.serialize,  # plain pickle: pysyncobj's gzip-9 dump stalls Raft past its timeouts
            deserializer=dump.deserialize,
            dynamicMembershipChange=True,
            useFork=False,  # never fork a process that runs an event loop, ZeroMQ threads and sandboxes
            logCompactionMinEntries=config.compaction_entries,
            logCompactionMinTime=config.compaction_interval_s,
            onStateChanged=on_state_change,
            **RAFT_TUNING,
        )
        install_journal()  # the journal file shrinks when the log is compacted (wire/raft_storage.py)
        self.sync = LogMatchingSyncObj(config.self_address, config.peers, conf, consumers=[self.machine],
                                       transportClass=GuardedTransport)  # bounds what a peer may send
        self._journal = journal_at(journal_path)
        self.sync.addOnTickCallback(self._compact_when_big)
        log.info("raft.started", group=config.name, address=config.self_address, peers=config.peers)

    def _compact_when_big(self) -> None:
        """On the tick thread: compact once compaction_mb of commands went into the journal since it was last cut
        (pysyncobj itself only counts entries and time)."""
        journal = self._journal
        if journal is not None and journal.appended_bytes > self.config.compaction_mb * MiB:
            journal.appended_bytes = 0  # at most one forced compaction per compaction_mb appended
            self.sync.forceLogCompaction()

    async def submit(
        self, op: str, args: dict[str, Any], *, request_id: str, timeout_s: float = 3.0
    ) -> Any:
        """Commit `op(**args)` and return its result, or raise the error it raised on the replicas."""
        size = COMMAND_ENVELOPE_BYTES + _encoded_size(args)
        if size > COMMAND_MAX_BYTES:  # a peer would refuse the frame that carries it (wire/raft_transport.py)
            raise RequestTooLargeException(
                f"the {self.config.name} command {op} is about {size / MiB:.1f} MiB; a replicated command may be at "
                f"most {COMMAND_MAX_BYTES // MiB} MiB")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        last_reason = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceException(
                    f"the {self.config.name} group could not commit within {timeout_s:.1f}s ({last_reason}); "
                    "a majority of its replicas may be down",
                    reason=Reason.NO_QUORUM,
                )
            fut: asyncio.Future = loop.create_future()

            def done(result: Any, err: int, fut: asyncio.Future = fut) -> None:
                loop.call_soon_threadsafe(_settle, fut, result, err)

            self.machine.apply(request_id, time.time(), op, args, callback=done)
            try:
                result, err = await asyncio.wait_for(fut, min(remaining, 1.0))
            except asyncio.TimeoutError:
                last_reason = "no commit within 1s"
                continue
            if err == FAIL_REASON.SUCCESS:
                kind, value = result
                if kind == "ok":
                    return value
                raise from_reply(value)
            last_reason = _reason_name(err)
            if err not in _RETRYABLE:
                raise ServiceException(f"{self.config.name} refused the command: {last_reason}")
            await asyncio.sleep(0.02)  # same request id: a command that did commit is not applied twice

    def status(self) -> RaftStatus:
        raw = self.sync.getStatus()
        leader = raw.get("leader")
        return RaftStatus(
            group=self.config.name,
            address=self.config.self_address,
            state={0: "follower", 1: "candidate", 2: "leader"}.get(raw.get("state"), str(raw.get("state"))),
            leader=str(leader) if leader is not None else None,
            term=raw.get("raft_term"),
            commit_idx=raw.get("commit_idx"),
            ready=self.sync.isReady(),
            applied=self.machine.applied_count,
        )

    @property
    def has_leader(self) -> bool:
        return self.sync._getLeader() is not None

    @property
    def is_leader(self) -> bool:
        return self.sync._isLeader()

    def leader_host(self) -> str | None:
        """The leader's cluster address (host only), if one is known and it is not this replica."""
        leader = self.sync._getLeader()
        if leader is None or self.is_leader:
            return None
        return str(leader.address).rsplit(":", 1)[0]

    def members(self) -> list[dict[str, Any]]:
        """Every member this replica knows, itself included, with whether it is connected and which leads."""
        raw = self.sync.getStatus()
        leader = raw.get("leader")
        leader = str(leader.address) if leader is not None else None
        out = [{"address": self.config.self_address, "connected": True, "leader": leader == self.config.self_address}]
        for key, value in raw.items():
            if key.startswith("partner_node_status_server_"):
                address = key[len("partner_node_status_server_"):]
                out.append({"address": address, "connected": value == 2, "leader": leader == address})
        return sorted(out, key=lambda m: m["address"])

    async def change(self, action: str, address: str, timeout_s: float = 10.0) -> None:
        """Add or remove another member, one change at a time, through the log. A fresh leader refuses changes
        until its first entry commits, and a change refuses while the previous one is uncommitted: such refusals
        are retried until the deadline. (A replica cannot remove itself: it would never see that commit.)"""
        if action == "remove" and address == self.config.self_address:
            raise ServiceException("a replica cannot remove itself; hand leadership over and ask the new leader")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no attempt"
        while loop.time() < deadline:
            if self._membership_done(action, address):
                return
            fut: asyncio.Future = loop.create_future()

            def done(result: Any, err: int, fut: asyncio.Future = fut) -> None:
                loop.call_soon_threadsafe(_settle, fut, result, err)

            if action == "add":
                self.sync.addNodeToCluster(address, callback=done)
            else:
                self.sync.removeNodeFromCluster(address, callback=done)
            try:
                _, err = await asyncio.wait_for(fut, max(0.1, min(2.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                last = "no commit"
                continue
            if err == FAIL_REASON.SUCCESS:
                return
            last = _reason_name(err)
            await asyncio.sleep(0.2)
        if self._membership_done(action, address):
            return
        raise ServiceException(
            f"{self.config.name}: could not {action} {address} within {timeout_s:.0f}s ({last}); "
            "check that a majority of replicas is up, then retry",
            reason=Reason.MEMBERSHIP_CHANGE_FAILED,
        )

    def _membership_done(self, action: str, address: str) -> bool:
        present = any(m["address"] == address for m in self.members())
        return present if action == "add" else not present

    async def hand_over(self, timeout_s: float = 5.0) -> None:
        """Give up leadership to the most caught-up follower, and wait until another member leads."""
        loop = asyncio.get_running_loop()
        self.sync.transferLeadership(None, callback=lambda r, e: None)
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.has_leader and not self.is_leader:
                return
            await asyncio.sleep(0.05)
        raise ServiceException(f"{self.config.name} leadership did not move within {timeout_s:.0f}s")

    def close(self) -> None:
        self.sync.destroy()

    def erase(self) -> None:
        """Delete this replica's journal and dump (after it left the group)."""
        for suffix in ("journal", "dump", "journal.meta"):
            for path in self.config.data_dir.glob(f"{self.config.name}.{suffix}*"):
                path.unlink(missing_ok=True)


def _encoded_size(value: Any) -> int:
    """About the bytes pysyncobj pickles `value` into, erring high: what a command's arguments weigh. Its pickle
    (protocol 2) writes a bytes value as a call that decodes latin-1 text written in UTF-8, so each byte >= 0x80 as
    two."""
    if isinstance(value, (bytes, bytearray)):
        return 64 + len(value) + len(value.translate(None, _ASCII))
    if isinstance(value, str):
        return 16 + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return 16 + sum(_encoded_size(k) + _encoded_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return 16 + sum(_encoded_size(v) for v in value)
    return 16


_ASCII = bytes(range(128))
COMMAND_ENVELOPE_BYTES = 512  # what a command adds to its arguments: the method's number, request id, time, op name


def result_size(value: Any) -> int:
    """About what a command's result weighs in memory and in a dump: its strings and bytes, and a little for
    everything else. The same on every replica, so every replica forgets the same results."""
    if isinstance(value, (str, bytes)):
        return 16 + len(value)
    if isinstance(value, dict):
        return 16 + sum(result_size(k) + result_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 16 + sum(result_size(v) for v in value)
    return 16


def _settle(fut: asyncio.Future, result: Any, err: int) -> None:
    if not fut.done():
        fut.set_result((result, err))


def _reason_name(err: int) -> str:
    for name, value in vars(FAIL_REASON).items():
        if value == err and name.isupper():
            return name
    return str(err)


def cluster_password(data_dir: Path) -> str:
    """The cluster secret shared by every replica's peer port; read from the node's data dir."""
    path = data_dir / "cluster.secret"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: every node needs the region's cluster secret")
    return path.read_text().strip()


def generate_secret() -> str:
    return os.urandom(24).hex()
