"""pysyncobj's peer transport with bounds on what a connection may send, installed by `wire.raft`.

pysyncobj reads everything a socket has into one buffer (by `bytes +=`, so quadratic in what is pending) before it
looks at a frame's length or tries to decrypt it, and it never drops a connection that sends nothing. So anyone
who can reach a Raft port could make its tick thread copy gigabytes and hold the GIL: Raft timeouts fire and every
service of the node stalls. `GuardedTransport` puts a `FrameGuard` between each connection and its socket:

- before the peer has proved it holds the cluster secret (pysyncobj's key exchange: its first message sealed with
  our fresh random key), only the handshake's frames are read, each at most HANDSHAKE_FRAME_MAX_BYTES, and nothing
  past them until pysyncobj has checked them;
- after that, a frame may announce at most FRAME_MAX_BYTES;
- a connection that has not finished the handshake within HANDSHAKE_TIMEOUT_S is closed, and at most
  PENDING_HANDSHAKES_MAX may be pending at once (the oldest goes first).
A connection that breaks a bound is reset at once and logged (one line per port and peer host per
REFUSAL_LOG_EVERY_S).

pysyncobj has no hook for a connection's reads, so the guard wraps the socket object a `TcpConnection` keeps in
its private `_TcpConnection__socket`: the one place this module reaches inside pysyncobj, checked when a
transport is made (`_check_pysyncobj`).
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any

import structlog
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from wire.errors import error_fields

log = structlog.get_logger("raft")

MiB = 1024 * 1024
# The largest command RaftGroup.submit accepts, as pysyncobj pickles it (protocol 2, which writes each byte >= 0x80 of
# a bytes value as two): the largest Flint commits is a group commit of 128 async events of 256 KiB, 48 MiB so
# pickled when the payloads are binary. A command over it is refused before a peer could refuse its frame.
COMMAND_MAX_BYTES = 56 * MiB
# The largest frame a peer that holds the secret may send. pysyncobj chunks an entry that is alone in an append
# and a snapshot (64 KiB each), but sends whole an append of entries adding up to appendEntriesBatchSizeBytes
# (64 KiB) plus the entry that crosses it, so up to one whole command, and a command a follower forwards to the
# leader. The message is pickled again (x2 at worst), zlib'd (+0.1% at worst) and Fernet-sealed (base64: x4/3):
# (56 MiB + 64 KiB) x 2 x 1.001 x 4/3 is 150 MiB. Measured: a 48 MiB command of binary payloads makes a 60 MiB frame.
FRAME_MAX_BYTES = 160 * MiB
# The handshake's frames are a 32-byte random key, then that key with the peer's address (or an admin command),
# each sealed: about 200-300 bytes.
HANDSHAKE_FRAME_MAX_BYTES = 4096
HANDSHAKE_TIMEOUT_S = 2.0  # the key exchange takes one round trip; Raft itself gives up on a peer in 0.5 s
PENDING_HANDSHAKES_MAX = 32  # per Raft port: a few peers and an admin tool at most are ever mid-handshake
REFUSAL_LOG_EVERY_S = 10.0
_LENGTH = struct.Struct("i")  # pysyncobj's frame prefix: a native int32


class FrameRefused(Exception):
    """A peer sent what no Flint node sends: its connection is reset."""


class FrameGuard:
    """The frames of one connection, followed as bytes arrive: [int32 length][length bytes]...

    Before `authenticated`, only `handshake_frames` frames are let through (`allowance` is 0 past them), each at
    most HANDSHAKE_FRAME_MAX_BYTES; after, any number of frames of at most FRAME_MAX_BYTES."""

    def __init__(self, peer: str, *, handshake_frames: int, opened: float, authenticated: bool = False):
        self.peer = peer
        self.opened = opened
        self.authenticated = authenticated
        self.refused = False
        self._handshake_frames = handshake_frames
        self.frames = 0  # frames whose length has been read
        self._header = b""  # the part of a length prefix read so far
        self._body_left = 0  # bytes of the current frame still to come

    def allowance(self, want: int) -> int:
        """How many bytes may be read now (at most `want`)."""
        if self.authenticated:
            return want
        if self._body_left:
            return min(want, self._body_left)
        if self._header or self.frames < self._handshake_frames:
            return min(want, _LENGTH.size - len(self._header))
        return 0  # the handshake is in: nothing more until pysyncobj has checked it

    def feed(self, data: bytes) -> None:
        """Account for bytes read; raise FrameRefused if they break a bound."""
        pos, end = 0, len(data)
        while pos < end:
            if self._body_left:
                step = min(self._body_left, end - pos)
                self._body_left -= step
                pos += step
                continue
            step = min(_LENGTH.size - len(self._header), end - pos)
            self._header += data[pos:pos + step]
            pos += step
            if len(self._header) == _LENGTH.size:
                (length,) = _LENGTH.unpack(self._header)
                self._header = b""
                self.frames += 1
                self._check(length)
                self._body_left = length

    def _check(self, length: int) -> None:
        if self.authenticated:
            if not 0 < length <= FRAME_MAX_BYTES:
                raise FrameRefused(f"a frame announces {length} bytes; a Raft peer sends at most {FRAME_MAX_BYTES}")
            return
        if self.frames > self._handshake_frames:
            raise FrameRefused("it sent past the handshake before it was checked")
        if not 0 < length <= HANDSHAKE_FRAME_MAX_BYTES:
            raise FrameRefused(f"handshake frame {self.frames} announces {length} bytes, before the peer proved "
                               f"it holds the cluster secret (a handshake frame is at most "
                               f"{HANDSHAKE_FRAME_MAX_BYTES})")


class _GuardedSocket:
    """The socket pysyncobj reads through: reads only what the guard allows; a refusal reads as the peer's EOF
    (pysyncobj then disconnects, and the close resets the connection)."""

    def __init__(self, sock: socket.socket, guard: FrameGuard, on_refused: Any):
        self._sock = sock
        self._guard = guard
        self._on_refused = on_refused

    def recv(self, bufsize: int) -> bytes:
        allowed = self._guard.allowance(bufsize)
        if allowed == 0:
            raise BlockingIOError(errno.EAGAIN, "waiting for the handshake to be checked")
        data = self._sock.recv(allowed)
        try:
            self._guard.feed(data)
        except FrameRefused as err:
            self._guard.refused = True
            self._on_refused(self._guard, err)
            return b""
        return data

    def close(self) -> None:
        if self._guard.refused:
            try:  # a reset, not a FIN: the sender learns at once, and nothing it sent lingers in buffers
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class GuardedTransport(TCPTransport):
    """pysyncobj's TCP transport, each connection behind a FrameGuard. Pass as `transportClass` to SyncObj."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any):
        _check_pysyncobj()
        self._guards: dict[TcpConnection, FrameGuard] = {}
        self._refusals = _RefusalLog(str(getattr(selfNode, "address", selfNode)))
        self._next_sweep = 0.0
        super().__init__(syncObj, selfNode, otherNodes)

    # --- connections a peer opened -------------------------------------------------------------------------------

    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:
        super()._onNewIncomingConnection(conn)
        peer = _peer_of(conn)
        frames = 2 if self._syncObj.encryptor else 1  # the peer's key, then its address sealed with ours
        self._install(conn, FrameGuard(peer, handshake_frames=frames, opened=time.monotonic()))
        pending = sorted((g.opened, id(c), c) for c, g in self._guards.items() if _pending(g))
        for _, _, oldest in pending[:max(0, len(pending) - PENDING_HANDSHAKES_MAX)]:
            self._refuse(oldest, FrameRefused(f"more than {PENDING_HANDSHAKES_MAX} connections were mid-handshake; "
                                              "the oldest is closed"))

    def _onIncomingMessageReceived(self, conn: TcpConnection, message: Any) -> None:
        guard = self._guards.get(conn)
        # With the secret: the first message is the peer's key; the second was sealed with our fresh key, so only
        # a holder of the secret who read our reply could send it. Without one: the first message is all there is.
        if guard is not None and (conn.sendRandKey or not self._syncObj.encryptor):
            guard.authenticated = True
        super()._onIncomingMessageReceived(conn, message)

    # --- connections this node opened ----------------------------------------------------------------------------

    def _onOutgoingConnected(self, conn: TcpConnection) -> None:
        peer = _peer_of(conn)
        # The peer's first message (its key) comes sealed with our fresh key; without the secret nothing is sealed.
        self._install(conn, FrameGuard(peer, handshake_frames=1, opened=time.monotonic(),
                                       authenticated=not self._syncObj.encryptor))
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn: TcpConnection, message: Any) -> None:
        guard = self._guards.get(conn)
        if guard is not None:
            guard.authenticated = True
        super()._onOutgoingMessageReceived(conn, message)

    # --- both ----------------------------------------------------------------------------------------------------

    def _onDisconnected(self, conn: TcpConnection) -> None:
        guard = self._guards.pop(conn, None)
        if guard is not None and _pending(guard) and guard.frames:  # pysyncobj dropped it: it did not decrypt
            self._refused(guard, FrameRefused("it closed or was closed mid-handshake: not sealed with this "
                                              "region's cluster secret (another region's node, or not a Flint node)"))
        super()._onDisconnected(conn)

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.25
        for conn, guard in list(self._guards.items()):
            if _pending(guard) and now - guard.opened > HANDSHAKE_TIMEOUT_S:
                self._refuse(conn, FrameRefused(f"no handshake within {HANDSHAKE_TIMEOUT_S:g}s"))

    def _install(self, conn: TcpConnection, guard: FrameGuard) -> None:
        sock = _socket_of(conn)
        if sock is None or isinstance(sock, _GuardedSocket):
            return
        self._guards[conn] = guard
        conn._TcpConnection__socket = _GuardedSocket(sock, guard, self._refused)  # see the module's docstring

    def _refuse(self, conn: TcpConnection, err: FrameRefused) -> None:
        guard = self._guards.get(conn)
        if guard is not None:
            guard.refused = True
            self._refused(guard, err)
        conn.disconnect()

    def _refused(self, guard: FrameGuard, err: FrameRefused) -> None:
        self._refusals.note(guard, err, time.monotonic())


def _pending(guard: FrameGuard) -> bool:
    return not guard.authenticated and not guard.refused


def _socket_of(conn: TcpConnection) -> Any:
    return getattr(conn, "_TcpConnection__socket", None)


def _peer_of(conn: TcpConnection) -> str:
    try:
        host, port = _socket_of(conn).getpeername()[:2]
    except (OSError, AttributeError):
        return "unknown"
    return f"{host}:{port}"


def _check_pysyncobj() -> None:
    """Fail at start-up, not silently at run time, if pysyncobj no longer keeps a connection's socket where the
    guard wraps it."""
    if not hasattr(TcpConnection(poller=None), "_TcpConnection__socket"):
        raise RuntimeError("this pysyncobj's TcpConnection has no _TcpConnection__socket: wire/raft_transport.py "
                           "cannot bound what Raft peers send; update it for this pysyncobj version")


class _RefusalLog:
    """One log line per peer host per REFUSAL_LOG_EVERY_S, saying how many refusals it stands for."""

    def __init__(self, port: str):
        self._port = port
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, guard: FrameGuard, err: FrameRefused, now: float) -> None:
        host = guard.peer.rsplit(":", 1)[0]
        self._since[host] = self._since.get(host, 0) + 1
        last = self._last.get(host)
        if last is not None and now - last < REFUSAL_LOG_EVERY_S:
            return
        self._last[host] = now
        refused = self._since.pop(host)
        if len(self._last) > 1024:  # refusals from many hosts: forget the ones quiet for a whole interval
            self._last = {h: t for h, t in self._last.items() if now - t < REFUSAL_LOG_EVERY_S}
            self._since = {h: n for h, n in self._since.items() if h in self._last}
        log.warning("raft.peer_refused", port=self._port, peer=guard.peer, authenticated=guard.authenticated,
                    refused=refused, every_s=REFUSAL_LOG_EVERY_S,
                    hint="no Flint node sends this; find what else reaches this Raft port", **error_fields(err))
