"""What a worker manager believes about its hosts (manager/health.py), under any sequence of placement views and
invoke outcomes."""

from __future__ import annotations

import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from manager.health import HostHealth

HOSTS = ("w1", "w2", "w3")
FORGET_S = 10.0
SUCCESSES = 3


@dataclasses.dataclass
class Host:
    node_id: str
    healthy: bool
    incarnation: int


class HostHealthMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.health = HostHealth(forget_after_s=FORGET_S, report_successes=SUCCESSES)
        self.now = 0.0
        self.hosts = {h: Host(h, True, 1) for h in HOSTS}
        self.bad_since: dict[str, float] = {}  # the model: since when placement has called each host unhealthy
        self.seen_incarnation: dict[str, int] = {}
        self.owed = {h: 0 for h in HOSTS}

    @rule(host=st.sampled_from(HOSTS), healthy=st.booleans())
    def placement_judges(self, host, healthy):
        self.hosts[host].healthy = healthy

    @rule(host=st.sampled_from(HOSTS))
    def host_restarts(self, host):
        self.hosts[host].incarnation += 1

    @rule(dt=st.floats(0, 8))
    def time_passes(self, dt):
        self.now += dt

    @rule(shown=st.sets(st.sampled_from(HOSTS)))
    def placement_view_arrives(self, shown):
        changes = self.health.observe([self.hosts[h] for h in sorted(shown)], self.now)
        for h in shown:
            if self.hosts[h].healthy:
                self.bad_since.pop(h, None)
            else:
                self.bad_since.setdefault(h, self.now)
        expected_restarts = {h for h in shown if h in self.seen_incarnation
                             and self.seen_incarnation[h] != self.hosts[h].incarnation}
        for h in shown:
            self.seen_incarnation[h] = self.hosts[h].incarnation
        # a host that came back as a new run lost its sandboxes; one bad for too long is given up on
        assert set(changes.restarted) == expected_restarts
        assert set(changes.forgotten) == {h for h, t in self.bad_since.items() if self.now - t > FORGET_S}

    @rule(host=st.sampled_from(HOSTS), ok=st.booleans())
    def an_invoke_ends(self, host, ok):
        report = self.health.should_report(host, ok)
        if not ok:
            assert report  # every failure reaches placement
            self.owed[host] = SUCCESSES
        else:
            # a success is reported only while a recent failure is still in the host's error window
            assert report == (self.owed[host] > 0)
            self.owed[host] = max(0, self.owed[host] - 1)
        assert self.health.owes_successes(host) == (self.owed[host] > 0)

    @invariant()
    def avoids_exactly_the_hosts_placement_last_called_unhealthy(self):
        assert self.health.avoid() == set(self.bad_since)

    @invariant()
    def reports_name_the_run_they_are_about(self):
        for h, incarnation in self.seen_incarnation.items():
            assert self.health.incarnation(h) == incarnation


TestHostHealth = HostHealthMachine.TestCase
TestHostHealth.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_only_faults_a_tenant_cannot_cause_count_against_a_host():
    from manager.health import counts_against_host
    from wire.errors import PeerUnavailable, Reason, ServiceException

    assert counts_against_host(PeerUnavailable("no answer", reason=Reason.TIMEOUT))
    assert counts_against_host(ServiceException("could not start a sandbox: fork failed"))
    assert not counts_against_host(ServiceException("full", reason=Reason.WORKER_FULL))
    assert not counts_against_host(ServiceException("bad blob", reason=Reason.CODE_CORRUPTED))
