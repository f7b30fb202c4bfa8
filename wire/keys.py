"""CURVE key pairs: generated at run time, stored as two small files, the secret one mode 0600.

A key pair on disk is `NAME.key` (public, shareable) and `NAME.key_secret` (both keys; never leaves the host it
was handed to). Keys are Z85 text, as ZeroMQ prints them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import zmq


@dataclasses.dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes | None = None

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def save(self, directory: Path, name: str) -> Path:
        """Write NAME.key and NAME.key_secret; returns the secret file's path."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.key").write_text(f"public = {self.public.decode()}\n")
        secret_path = directory / f"{name}.key_secret"
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"public = {self.public.decode()}\n")
            if self.secret is not None:
                f.write(f"secret = {self.secret.decode()}\n")
        os.chmod(secret_path, 0o600)
        return secret_path

    @classmethod
    def load(cls, path: Path | str) -> KeyPair:
        """Load a `.key` (public only) or `.key_secret` file."""
        values: dict[str, bytes] = {}
        for line in Path(path).read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                values[k.strip()] = v.strip().encode()
        if "public" not in values:
            raise ValueError(f"{path}: no 'public = ...' line; is this a Flint key file?")
        key = cls(values["public"], values.get("secret"))
        if len(key.public) != 40 or (key.secret is not None and len(key.secret) != 40):
            raise ValueError(f"{path}: keys must be 40 Z85 characters")
        return key

    def require_secret(self) -> bytes:
        if self.secret is None:
            raise ValueError("this key file holds only a public key; a .key_secret file is needed here")
        return self.secret
