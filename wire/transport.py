"""The ZeroMQ socket options every Flint socket shares, and the endpoint strings they connect to."""

from __future__ import annotations

from typing import Any

import zmq

# A hard cap enforced inside libzmq: a peer that sends more is disconnected before Python sees a byte. Anything
# under it is answered with RequestTooLargeException by the server's own, per-operation check.
HARD_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 2000
HIGH_WATER_MARK = 100_000


def tune(sock: zmq.Socket) -> None:
    """Size cap, liveness heartbeats and queue depth, the same on both ends of every connection."""
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)


def endpoint(address: str, port: int) -> str:
    """Where a Flint service listens: every endpoint string in the code base is made here."""
    return f"tcp://{address}:{port}"


def node_endpoint(node: Any, service: str) -> str:
    """A service's endpoint on a node as placement lists it (a NodeInfo: its address and its ports)."""
    return endpoint(node.address, node.ports[service])
