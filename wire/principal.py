"""Who is calling: the principal a connection's CURVE key maps to, decided by ZAP and read by servers.

ZAP hands libzmq a User-Id string per connection; every message on that connection carries it, so no handler
trusts a header to say who is calling. The string is "cluster", "operator|KEY" or "tenant:NAME|KEY" (the key
rides along so a request on an open connection can be checked against revocation); `Caller.parse` is the only
place that reads it.
"""

from __future__ import annotations

import dataclasses
import enum


class Role(enum.StrEnum):
    CLUSTER = "cluster"  # another Flint node (the cluster key)
    TENANT = "tenant"  # a tenant's key
    OPERATOR = "operator"  # an operator's key
    NOBODY = ""  # no authenticated identity (never reaches a handler that needs one)


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    tenant: str | None = None
    key: str | None = None  # the client's public key (tenants and operators), as its handshake proved it

    @property
    def who(self) -> str:
        """The principal without its key: "cluster", "operator" or "tenant:NAME" (as the registry's key map says)."""
        return f"{Role.TENANT}:{self.tenant}" if self.role is Role.TENANT else str(self.role)

    def user_id(self) -> str:
        """What ZAP gives libzmq for this caller."""
        return self.who if self.key is None else f"{self.who}|{self.key}"

    @classmethod
    def from_who(cls, who: str, key: str | None = None) -> Caller:
        if who.startswith(f"{Role.TENANT}:"):
            return cls(Role.TENANT, who[len(Role.TENANT) + 1:], key)
        try:
            return cls(Role(who), None, key)
        except ValueError:
            return NOBODY

    @classmethod
    def parse(cls, user_id: str) -> Caller:
        who, _, key = user_id.partition("|")
        return cls.from_who(who, key or None)


CLUSTER = Caller(Role.CLUSTER)
NOBODY = Caller(Role.NOBODY)
