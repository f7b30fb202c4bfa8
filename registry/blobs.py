"""Content-addressed code blobs on a control node's disk: data_dir/blobs/ab/abcdef... (sha256)."""

from __future__ import annotations

import os
from pathlib import Path

from registry.package import sha256
from wire.errors import InvalidParameterValueException


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
