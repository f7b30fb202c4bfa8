import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.state import RegistryState
from wire.errors import InvalidParameterValueException, ResourceConflictException, ResourceNotFoundException


def fn(tenant="a", name="f"):
    return {"tenant": tenant, "name": name, "handler": "h.fn", "code_sha256": "0" * 64}


def test_create_get_list_delete():
    s = RegistryState()
    rec = s.cmd_create_function(10.0, fn())
    assert rec["created_ms"] == 10_000
    assert s.get_function("a", "f")["handler"] == "h.fn"
    assert [f["name"] for f in s.list_functions("a")] == ["f"]
    s.cmd_delete_function(11.0, "a", "f")
    with pytest.raises(ResourceNotFoundException):
        s.get_function("a", "f")


def test_duplicate_name_is_a_conflict():
    s = RegistryState()
    s.cmd_create_function(0, fn())
    with pytest.raises(ResourceConflictException):
        s.cmd_create_function(0, fn())


def test_another_tenants_function_looks_exactly_like_a_missing_one():
    s = RegistryState()
    s.cmd_create_function(0, fn(tenant="a"))
    with pytest.raises(ResourceNotFoundException) as theirs:
        s.get_function("b", "f")
    with pytest.raises(ResourceNotFoundException) as missing:
        s.get_function("b", "nope")
    assert theirs.value.message == "Function not found: f"
    assert missing.value.message == "Function not found: nope"
    assert s.list_functions("b") == []
    with pytest.raises(ResourceNotFoundException):
        s.cmd_delete_function(0, "b", "f")


def test_tenant_keys_map_to_their_tenant_and_cannot_be_claimed_twice():
    s = RegistryState()
    s.cmd_create_tenant(0, "a", ["KEY-A"])
    s.cmd_create_tenant(1, "a", ["KEY-A"])  # idempotent
    assert s.tenant_for_key("KEY-A") == "a"
    assert s.list_tenants()["a"]["keys"] == ["KEY-A"]
    with pytest.raises(ResourceConflictException):
        s.cmd_create_tenant(0, "b", ["KEY-A"])


# --- the rules of a function's configuration, on every path that makes or changes one -----------------------------

env_names = st.text(alphabet=st.characters(codec="ascii"), min_size=0, max_size=12)


def _valid_name(key: str) -> bool:
    return (bool(key) and (key[0].isalpha() or key[0] == "_") and all(c.isalnum() or c == "_" for c in key)
            and not key.startswith(("AWS_", "FLINT_")) and key != "LAMBDA_TASK_ROOT")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(env_names, st.text(max_size=40), max_size=4))
def test_environment_names_are_checked_the_same_at_create_and_at_update(env):
    ok = all(_valid_name(k) for k in env)
    s = RegistryState()
    try:
        s.cmd_create_function(0, {**fn(), "environment": env})
        created = True
    except InvalidParameterValueException:
        created = False
    assert created == ok
    s.cmd_create_function(0, fn(name="g"))
    before = s.get_function("a", "g")
    try:
        s.cmd_update_config(1, "a", "g", {"environment": env})
        updated = True
    except InvalidParameterValueException:
        updated = False
    assert updated == ok
    if not ok:
        assert s.get_function("a", "g") == before  # a refused change changes nothing


def test_environment_over_4_kb_is_refused():
    with pytest.raises(InvalidParameterValueException, match="4096 bytes"):
        RegistryState().cmd_create_function(0, {**fn(), "environment": {"K": "x" * 4100}})


def test_a_python_handler_must_name_module_and_function_whichever_setting_changes():
    s = RegistryState()
    s.cmd_create_function(0, {**fn(), "runtime": "provided", "handler": "bootstrap"})
    with pytest.raises(InvalidParameterValueException, match="module.function"):
        s.cmd_update_config(1, "a", "f", {"runtime": "python3"})  # the handler it keeps does not fit python3
    assert s.get_function("a", "f")["runtime"] == "provided"
    assert s.cmd_update_config(1, "a", "f", {"runtime": "python3", "handler": "app.main"})["handler"] == "app.main"
    with pytest.raises(InvalidParameterValueException, match="nothing to change"):
        s.cmd_update_config(2, "a", "f", {})
