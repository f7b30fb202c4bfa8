"""Content-addressed code blobs on a control node's disk: data_dir/blobs/ab/abcdef... (sha256).

A blob's mtime is when it was last written here (an upload of a blob already here touches it): the grace
before an unreferenced blob is removed counts from it (registry.code.CodeStorage.collectable). A write here that
fails ends the node (wire/persist.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from registry.package import sha256
from wire.errors import InvalidParameterValueException
from wire.persist import persisting


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        with persisting(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # an upload touching a blob and its removal never interleave

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidParameterValueException("a code sha256 is 64 lowercase hex characters")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def get(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, digest: str, data: bytes) -> None:
        if sha256(data) != digest:
            raise InvalidParameterValueException("code blob does not match its sha256")
        path = self.path(digest)
        with persisting(path):
            with self._lock:
                if path.exists():
                    os.utime(path)  # uploaded again, maybe for a create on its way: its grace starts again
                    return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def stored(self) -> dict[str, float]:
        """Every blob here: sha256 -> when it was last written (seconds since the epoch)."""
        out = {}
        for path in self.root.glob("??/*"):
            if len(path.name) == 64 and path.name.startswith(path.parent.name):
                try:
                    out[path.name] = path.stat().st_mtime
                except FileNotFoundError:
                    pass  # removed meanwhile
        return out

    def remove(self, digest: str, written: float) -> bool:
        """Remove a blob unless it was written again since `written` (what `stored` said)."""
        path = self.path(digest)
        with self._lock:
            try:
                if path.stat().st_mtime != written:
                    return False
            except FileNotFoundError:
                return False
            with persisting(path):
                path.unlink(missing_ok=True)
        return True
