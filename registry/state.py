"""Function metadata and tenants, replicated in the `control` Raft group. No I/O.

Code is not here: it is a content-addressed blob (sha256) kept by the control nodes' blob stores; a function
record names its blob.
"""

from __future__ import annotations

from typing import Any

from wire.errors import ResourceConflictException, ResourceNotFoundException


class RegistryState:
    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], dict[str, Any]] = {}
        self.tenants: dict[str, dict[str, Any]] = {}
        self._key_owner: dict[str, str] = {}

    # --- commands ------------------------------------------------------------------------------------------------

    def cmd_create_function(self, now: float, config: dict[str, Any]) -> dict[str, Any]:
        key = (config["tenant"], config["name"])
        if key in self.functions:
            raise ResourceConflictException(
                f"Function already exist: {config['name']}. Delete it first, or pick another name."
            )
        record = {**config, "created_ms": int(now * 1000)}
        self.functions[key] = record
        return record

    def cmd_delete_function(self, now: float, tenant: str, name: str) -> None:
        if self.functions.pop((tenant, name), None) is None:
            raise _not_found(name)

    def cmd_create_tenant(self, now: float, tenant: str, public_keys: list[str]) -> dict[str, Any]:
        for key in public_keys:
            owner = self._key_owner.get(key)
            if owner is not None and owner != tenant:
                raise ResourceConflictException("that public key already belongs to another tenant")
        record = self.tenants.setdefault(tenant, {"keys": [], "created_ms": int(now * 1000)})
        for key in public_keys:
            if key not in record["keys"]:
                record["keys"].append(key)
            self._key_owner[key] = tenant
        return record

    # --- reads ---------------------------------------------------------------------------------------------------

    def get_function(self, tenant: str, name: str) -> dict[str, Any]:
        record = self.functions.get((tenant, name))
        if record is None:
            raise _not_found(name)
        return dict(record)

    def list_functions(self, tenant: str | None) -> list[dict[str, Any]]:
        return [dict(r) for (t, _), r in sorted(self.functions.items()) if tenant is None or t == tenant]

    def tenant_for_key(self, public_key: str) -> str | None:
        return self._key_owner.get(public_key)

    def list_tenants(self) -> dict[str, dict[str, Any]]:
        return {name: {"keys": list(r["keys"]), "created_ms": r["created_ms"]} for name, r in self.tenants.items()}


def _not_found(name: str) -> ResourceNotFoundException:
    # The same answer whether the function is missing or belongs to someone else: existence is not disclosed.
    return ResourceNotFoundException(f"Function not found: {name}")
