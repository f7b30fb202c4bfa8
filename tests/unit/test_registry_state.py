import pytest

from registry.state import RegistryState
from wire.errors import ResourceConflictException, ResourceNotFoundException


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
