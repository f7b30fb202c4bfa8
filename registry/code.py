"""Code storage: which code blobs each tenant's function versions name, what that takes of the tenant's quota,
and when a blob no version names any more may leave the control nodes. No I/O; `now` is passed in.

Part of the registry's replicated state (registry.state.RegistryState.code), so every control node counts the
same. A tenant's usage is the zipped size of the distinct packages its versions ($LATEST and published ones)
name: a package used by several functions or versions counts once, and a package two tenants upload counts for
each (Lambda's code storage quota is 75 GB an account, counting every version). A create or a code update past
the quota is refused with CodeStorageExceededException, before the package is uploaded (the frontend asks
first, the same check) and again when the change commits.

A control node copies from a peer every blob a version names that it does not store (`missing`). A blob leaves a
control node's blob store (`collectable`) when no version names it, and neither its last upload
there nor the moment its last version went is within the grace: an upload whose create is still on its way, or
an invoke that resolved the replaced code a moment before the change, still finds it.
"""

from __future__ import annotations

from wire.config import CODE_BLOB_GRACE_S_MAX, DEFAULTS
from wire.errors import CodeStorageExceededException
from wire.messages import MiB


class CodeStorage:
    def __init__(self, quota_bytes: int = DEFAULTS.tenant_code_storage_mb * MiB):
        self.quota_bytes = quota_bytes  # per tenant; the control leader replicates its setting
        self.refs: dict[str, dict[str, int]] = {}  # tenant -> sha256 -> how many of its versions name it
        self.used: dict[str, int] = {}  # tenant -> zipped bytes of the distinct blobs its versions name
        self.holders: dict[str, int] = {}  # sha256 -> how many versions name it, every tenant's
        self.sizes: dict[str, int] = {}  # sha256 -> zipped bytes, while a version names it
        self.released: dict[str, float] = {}  # sha256 -> when its last version went (kept CODE_BLOB_GRACE_S_MAX)

    def check(self, tenant: str, sha256: str, size: int, replacing: str | None = None) -> None:
        """Refuse a package that would take `tenant` past its quota. `replacing`: the blob a $LATEST gives up."""
        mine = self.refs.get(tenant, {})
        after = self.used.get(tenant, 0) + (0 if sha256 in mine else self.sizes.get(sha256, size))
        if replacing is not None and replacing != sha256 and mine.get(replacing) == 1:
            after -= self.sizes[replacing]
        if after > self.quota_bytes:
            raise CodeStorageExceededException(
                f"Code storage limit exceeded: your functions' code would take {after / MiB:.1f} MB and your quota "
                f"is {self.quota_bytes / MiB:.1f} MB (each distinct package counts once, whichever functions and "
                "versions use it). Delete functions or versions you no longer use, or make the package smaller, "
                "then retry; or ask your operator for a larger quota (tenant_code_storage_mb)."
            )

    def add(self, tenant: str, sha256: str, size: int) -> None:
        """One more version of `tenant` names the blob."""
        size = self.sizes.setdefault(sha256, size)  # the same sha256 is the same package, whoever sent it
        mine = self.refs.setdefault(tenant, {})
        if sha256 not in mine:
            self.used[tenant] = self.used.get(tenant, 0) + size
        mine[sha256] = mine.get(sha256, 0) + 1
        self.holders[sha256] = self.holders.get(sha256, 0) + 1
        self.released.pop(sha256, None)

    def drop(self, now: float, tenant: str, sha256: str) -> None:
        """One version of `tenant` naming the blob is gone (deleted, or its code replaced)."""
        mine = self.refs[tenant]
        mine[sha256] -= 1
        if not mine[sha256]:
            del mine[sha256]
            self.used[tenant] -= self.sizes[sha256]
            if not mine:
                del self.refs[tenant], self.used[tenant]
        self.holders[sha256] -= 1
        if not self.holders[sha256]:
            del self.holders[sha256], self.sizes[sha256]
            self.released[sha256] = now
        while self.released:  # oldest first: no grace is longer than CODE_BLOB_GRACE_S_MAX
            sha, at = next(iter(self.released.items()))
            if now - at <= CODE_BLOB_GRACE_S_MAX:
                break
            del self.released[sha]

    def collectable(self, stored: dict[str, float], now: float, grace_s: float) -> list[str]:
        """Of the blobs a control node stores (sha256 -> when it was last written there), those it may remove."""
        return sorted(sha for sha, written in stored.items()
                      if sha not in self.holders and now - written > grace_s
                      and now - self.released.get(sha, written) > grace_s)

    def missing(self, stored: dict[str, float]) -> list[str]:
        """Of the blobs some function version names, those a control node does not store (`stored`, as for
        `collectable`): a push it missed while down, to be copied from a peer."""
        return sorted(sha for sha in self.holders if sha not in stored)

    def usage(self, tenant: str) -> int:
        return self.used.get(tenant, 0)
