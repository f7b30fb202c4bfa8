from hypothesis import given
from hypothesis import strategies as st

from frontend.state import FunctionCache, rendezvous_order


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
