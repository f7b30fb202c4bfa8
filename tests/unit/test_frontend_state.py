from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from frontend.state import (
    MAX_STEPS,
    NOT_SENT_ROUNDS,
    Ask,
    FunctionCache,
    InvokePlan,
    ManagersDown,
    Pause,
    choose,
    rendezvous_order,
)
from wire.errors import Reason, ServiceException
from wire.messages import Choice, FunctionConfig


def test_every_frontend_computes_the_same_order():
    managers = ["m1", "m2", "m3", "m4"]
    assert rendezvous_order("tenant/f", managers) == rendezvous_order("tenant/f", list(reversed(managers)))


@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=8, unique=True), st.text(max_size=20))
def test_losing_a_manager_moves_only_its_functions(managers, key):
    order = rendezvous_order(key, managers)
    survivor_order = rendezvous_order(key, [m for m in managers if m != order[-1]])
    assert survivor_order[0] == order[0]  # losing a non-owner never moves the function
    after = rendezvous_order(key, [m for m in managers if m != order[0]])
    assert after[0] == order[1]  # losing the owner moves it to its own next choice


def test_functions_spread_over_managers():
    owners = [rendezvous_order(f"t/f{i}", ["m1", "m2", "m3"])[0] for i in range(3000)]
    for m in ("m1", "m2", "m3"):
        assert 800 < owners.count(m) < 1200


def test_cache_expires_after_ttl():
    c = FunctionCache(ttl_s=2)
    c.put("t", "f", {"name": "f"}, now=0)
    assert c.get("t", "f", now=2) == {"name": "f"}
    assert c.get("t", "f", now=2.01) is None
    assert c.get("other", "f", now=0) is None


def test_forgetting_a_function_forgets_its_versions_and_aliases():
    c = FunctionCache(ttl_s=10)
    for name in ("f", "f:1", "f:live", "fx", "g"):
        c.put("t", name, {}, now=0)
    c.forget("t", "f")
    assert [n for n in ("f", "f:1", "f:live", "fx", "g") if c.get("t", n, 0) is not None] == ["fx", "g"]


# --- an alias's canary roll ----------------------------------------------------------------------------------------


def config(version: str) -> FunctionConfig:
    return FunctionConfig(tenant="t", name="f", version=version, handler="h.h", code_sha256="0" * 64)


@given(st.floats(0, 1, exclude_max=True), st.floats(0, 1))
def test_an_alias_sends_its_weight_of_invokes_to_the_canary(roll, weight):
    choices = (Choice(weight=1 - weight, config=config("1")), Choice(weight=weight, config=config("2")))
    chosen = choose(choices, roll).version
    assert chosen == ("1" if roll < 1 - weight else "2")


def test_a_single_choice_is_always_chosen():
    assert choose((Choice(weight=1.0, config=config("7")),), 0.999).version == "7"


# --- the invoke plan ---------------------------------------------------------------------------------------------

MANAGERS = {"n1": "tcp://a:1", "n2": "tcp://b:1", "n3": "tcp://c:1"}


class InvokePlanMachine(RuleBasedStateMachine):
    """Any sequence of what can happen to one invoke: managers come and go, fail before or after the request
    left, hosts cannot be reached before or during the run. The plan must never run it twice where it may have
    run, never spin without bound, and follow rendezvous order among the managers it may still ask."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.down = ManagersDown()  # shared by every invoke of a frontend
        self.healthy = dict(MANAGERS)
        self.new_invoke()

    @precondition(lambda self: self.over)
    @rule()
    def new_invoke(self):
        self.plan = InvokePlan("t/f/$LATEST/abc", self.down)
        self.last: Ask | Pause | None = None
        self.asks = 0
        self.failed_not_sent_hosts = 0
        self.over = False  # the plan raised: the invoke ended with an error

    @precondition(lambda self: not self.over)
    @rule(healthy=st.sets(st.sampled_from(sorted(MANAGERS))))
    def managers_change(self, healthy):
        self.healthy = {n: MANAGERS[n] for n in healthy}

    @precondition(lambda self: not self.over)
    @rule(dt=st.floats(0, 5))
    def time_passes(self, dt):
        self.now += dt

    @precondition(lambda self: not self.over)
    @rule()
    def next_step(self):
        skipped_before = set(self.plan.skipped)
        try:
            step = self.plan.next(self.healthy, region_has_nodes=True, now=self.now)
        except ServiceException as err:
            self.over = True
            if self.asks >= MAX_STEPS:  # the bound comes first: an invoke never asks more than MAX_STEPS times
                assert err.reason == Reason.NO_ROUTE
            elif not self.healthy:
                assert err.reason == Reason.NO_MANAGER
            else:
                assert err.reason == Reason.NO_MANAGER and set(self.healthy.values()) <= skipped_before
            return
        if isinstance(step, Pause):
            assert set(self.healthy.values()) <= skipped_before and skipped_before
            assert all(w.endswith(Reason.NOT_SENT) for w in self.plan.why)
            assert not self.plan.skipped and self.plan.rounds <= NOT_SENT_ROUNDS
        else:
            self.asks += 1
            assert self.asks <= MAX_STEPS
            assert step.manager in self.healthy.values() and step.manager not in skipped_before
            askable = [MANAGERS[n] for n in rendezvous_order(self.plan.function_id, self.healthy)
                       if MANAGERS[n] not in skipped_before]
            up = [e for e in askable if not self.plan.down.is_down(e, self.now)]
            assert step.manager == (up or askable)[0]
        self.last = step

    @precondition(lambda self: not self.over and isinstance(self.last, Ask))
    @rule(reason=st.sampled_from([Reason.NOT_SENT, Reason.TIMEOUT, Reason.CONNECTION_LOST]))
    def manager_fails(self, reason):
        self.plan.manager_unreachable(self.last.manager, reason, self.now)
        assert self.plan.down.is_down(self.last.manager, self.now)
        self.last = None

    @precondition(lambda self: not self.over and isinstance(self.last, Ask))
    @rule(reason=st.sampled_from([Reason.NOT_SENT, Reason.TIMEOUT, Reason.CONNECTION_LOST]),
          node=st.sampled_from(["w1", "w2"]))
    def host_fails(self, reason, node):
        self.last = None
        try:
            self.plan.host_unreachable(node, reason, "gone")
        except ServiceException as err:
            self.over = True
            if reason == Reason.NOT_SENT:  # nothing ran anywhere: it says so
                assert err.reason == Reason.WORKER_UNREACHABLE and not err.may_still_run
                assert self.failed_not_sent_hosts == 1
            else:  # it may be running where we cannot hear: never sent elsewhere, and the error says so
                assert err.reason == Reason.WORKER_LOST and err.may_still_run
            return
        assert reason == Reason.NOT_SENT and self.failed_not_sent_hosts == 0 and node in self.plan.avoid_nodes
        self.failed_not_sent_hosts += 1


TestInvokePlan = InvokePlanMachine.TestCase
TestInvokePlan.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


def test_a_fresh_invoke_asks_the_functions_own_manager_first():
    plan = InvokePlan("t/f", ManagersDown())
    owner = rendezvous_order("t/f", MANAGERS)[0]
    assert plan.next(MANAGERS, region_has_nodes=True, now=0.0) == Ask(MANAGERS[owner])


def test_a_manager_that_just_failed_another_invoke_is_skipped_until_its_time_is_up():
    down = ManagersDown(skip_s=3.0)
    owner = MANAGERS[rendezvous_order("t/f", MANAGERS)[0]]
    down.failed(owner, now=10.0)
    assert InvokePlan("t/f", down).next(MANAGERS, region_has_nodes=True, now=12.9).manager != owner
    assert InvokePlan("t/f", down).next(MANAGERS, region_has_nodes=True, now=13.0).manager == owner
