"""What tests ask of a running local region beyond its own API: which node leads a Raft group, and what the
workers' execution journals recorded."""

from __future__ import annotations

import dataclasses
from typing import Any

from wire import messages as m
from wire.errors import FlintError


def leader_of(region: Any, group: str, *, nodes: list[str] | None = None, timeout_s: float = 1.0) -> str | None:
    """The node whose replica of Raft group `group` ("control", "counting", "placement") says it leads, asking
    every running node of the region (or those in `nodes`). Should two say so (an old leader that has not heard
    of the new term yet), the one with the later term. None if no node that answered leads it."""
    claims: list[tuple[int, str]] = []
    for node in nodes if nodes is not None else [n["node_id"] for n in region.nodes()]:
        if region.pid(node) is None:
            continue
        try:
            status = region.call("admin", m.NodeStatus(), node=node, timeout_s=timeout_s)
        except FlintError:
            continue  # paused, or on its way down: it leads nothing we can use
        replica = status.raft.get(group)
        if replica is not None and replica.state == "leader":
            claims.append((replica.term or 0, node))
    return max(claims)[1] if claims else None


@dataclasses.dataclass(frozen=True)
class Execution:
    """One execution a worker recorded, times on that host's monotonic clock (the same clock for every node of
    a local region)."""

    node: str
    request_id: str
    tenant: str | None
    function: str | None
    started: float
    ended: float | None  # None: no end recorded (still running, or its node died first)


def executions(region: Any, *, nodes: list[str] | None = None) -> list[Execution]:
    """Every execution in the journals (`executions.log`) of the region's workers, or of those in `nodes`, in the
    order each node recorded them. Journals exist only with the `record_executions` setting on; if none of the
    nodes has one, this fails rather than report that nothing ran. A line cut short by SIGKILL is skipped."""
    node_ids = nodes if nodes is not None else [n["node_id"] for n in region.nodes()]
    out: list[Execution] = []
    journals = 0
    for node in node_ids:
        path = region.config(node).data_dir / "executions.log"
        if not path.exists():
            continue
        journals += 1
        records: list[dict[str, Any]] = []
        open_by_id: dict[str, list[dict[str, Any]]] = {}
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()  # "S <t> <request id> <tenant> <function>" or "E <t> <request id>"
            if len(parts) < 3 or parts[0] not in ("S", "E"):
                continue
            try:
                t = float(parts[1])
            except ValueError:
                continue
            kind, rid = parts[0], parts[2]
            if kind == "S":
                record = {"node": node, "request_id": rid, "tenant": parts[3] if len(parts) > 3 else None,
                          "function": parts[4] if len(parts) > 4 else None, "started": t, "ended": None}
                records.append(record)
                open_by_id.setdefault(rid, []).append(record)
            elif open_by_id.get(rid):
                open_by_id[rid].pop()["ended"] = t
        out.extend(Execution(**r) for r in records)
    if journals == 0:
        raise AssertionError(f"no executions.log on {', '.join(node_ids)}: start the region with the "
                             "record_executions setting on")
    return out
