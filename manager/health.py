"""What a worker manager believes about the hosts it places on. No I/O; `now` is the manager's monotonic clock.

Placement is the judge of a host's health, and a manager routes by placement's word with a little memory of its
own: a host placement calls unhealthy is avoided at once and, if it stays so for `forget_after_s`, its
sandboxes are forgotten; a host that comes back as a new incarnation (it restarted) lost every sandbox it had.
A manager also tells placement how invokes went on a host, sparingly: every failure, but successes only while a
recent failure is still in the host's error window, so the healthy majority costs no Raft commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

from wire.errors import PeerUnavailable, Reason, ServiceException

FORGET_UNHEALTHY_AFTER_S = 10.0  # a host unhealthy this long has lost its sandboxes as far as we route
REPORT_SUCCESSES = 10  # after a failure on a host, report this many successes so its error window can clear


# what a host answering "no" says that is not the host's fault: it is full, the code it was given is bad, or it
# cannot give a function with network a safe network (it is healthy for every other function)
NOT_THE_HOSTS_FAULT = frozenset({Reason.WORKER_FULL, Reason.CODE_CORRUPTED, Reason.NO_SAFE_NETWORK})


def counts_against_host(err: ServiceException) -> bool:
    """Only faults a tenant cannot cause count against a host: it could not be reached, or it failed for a
    reason of its own. A full host, or code that cannot be used anywhere, is not a sick host."""
    return isinstance(err, PeerUnavailable) or err.reason not in NOT_THE_HOSTS_FAULT


class HostReport(Protocol):
    """A host as placement lists it (wire.messages.NodeView has these)."""

    node_id: str
    healthy: bool
    incarnation: int


@dataclasses.dataclass(frozen=True)
class Changes:
    """What a new view of the hosts means for the sandboxes a manager routes to."""

    restarted: tuple[str, ...] = ()  # hosts that came back as a new incarnation: their old sandboxes are gone
    forgotten: tuple[str, ...] = ()  # hosts unhealthy for too long: stop counting on their sandboxes


class HostHealth:
    def __init__(self, forget_after_s: float = FORGET_UNHEALTHY_AFTER_S, report_successes: int = REPORT_SUCCESSES):
        self.forget_after_s = forget_after_s
        self.report_successes = report_successes
        self.unhealthy_since: dict[str, float] = {}
        self.incarnations: dict[str, int] = {}
        self._successes_owed: dict[str, int] = {}  # host -> successes still to report after a failure

    def observe(self, hosts: Iterable[HostReport], now: float) -> Changes:
        """Placement's latest view of the hosts."""
        restarted = []
        for host in hosts:
            if host.healthy:
                self.unhealthy_since.pop(host.node_id, None)
            else:
                self.unhealthy_since.setdefault(host.node_id, now)
            previous = self.incarnations.get(host.node_id)
            if previous is not None and previous != host.incarnation:
                restarted.append(host.node_id)
            self.incarnations[host.node_id] = host.incarnation
        forgotten = [n for n, since in self.unhealthy_since.items() if now - since > self.forget_after_s]
        return Changes(tuple(restarted), tuple(forgotten))

    def avoid(self) -> set[str]:
        """Hosts no new sandbox should go to, nor an idle one be handed out on."""
        return set(self.unhealthy_since)

    def should_report(self, node_id: str, ok: bool) -> bool:
        """Whether to tell placement how an invoke on `node_id` went."""
        if not ok:
            self._successes_owed[node_id] = self.report_successes
            return True
        owed = self._successes_owed.get(node_id, 0)
        if owed <= 0:
            return False
        if owed == 1:
            del self._successes_owed[node_id]
        else:
            self._successes_owed[node_id] = owed - 1
        return True

    def owes_successes(self, node_id: str) -> bool:
        return self._successes_owed.get(node_id, 0) > 0

    def incarnation(self, node_id: str) -> int | None:
        """Which run of the host a report is about, so placement ignores one about a run that has ended."""
        return self.incarnations.get(node_id)
