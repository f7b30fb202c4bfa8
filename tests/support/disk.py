"""A node's data dir on a small filesystem of the test's own: a tmpfs (root only) with a given size and number of
inodes, mounted under the test's tmp_path and unmounted when the test ends, whatever happened; and ways to fill
it the way another process on the host would."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(mount_point: Path, *, size_mb: int, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size_mb` (and at most `inodes` files and directories) at `mount_point`, which must not exist
    yet (so every run mounts at a path of its own); unmounted on the way out. Stop whatever uses it first."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir(parents=True)
    options = f"size={size_mb}m,mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    source = f"flint-test-{uuid.uuid4().hex[:12]}"  # what `mount` lists, should one ever be left behind
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, source, str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        _unmount(mount_point)


def _unmount(mount_point: Path) -> None:
    for _ in range(50):  # a process that just died may hold it for a moment
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # detached now, freed when unused


def move_data_dir(region: Any, node_id: str, to: Path) -> None:
    """Give a node that is not running its data dir at `to`: what it keeps there is copied over and its node.toml
    names the new place. Its node.toml, log and pid file stay in the region directory (as a fleet's node logs to
    its journal, not to its data disk), so the log survives the data dir filling up."""
    config = region.config(node_id)
    for name in ("keys", "raft", "blobs"):
        if (config.data_dir / name).exists():
            shutil.copytree(config.data_dir / name, to / name)
    moved = dataclasses.replace(config, data_dir=to)
    (region.files.node_dir(node_id) / "node.toml").write_text(tomli_w.dumps(moved.to_dict()))


def free(path: Path) -> tuple[int, int]:
    """(bytes, inodes) free on the filesystem of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_favail


def fill_space(directory: Path, *, leave_mb: float) -> int:
    """Write a file into `directory` until about `leave_mb` is left free on its filesystem; returns its bytes."""
    directory.mkdir(exist_ok=True)
    target = max(0, free(directory)[0] - int(leave_mb * MiB))
    chunk = b"\xa5" * MiB
    written = 0
    with open(directory / "filler", "wb") as f:
        while written < target:
            written += f.write(chunk[: min(MiB, target - written)])
        f.flush()
        os.fsync(f.fileno())
    return written


def fill_inodes(directory: Path, *, leave: int) -> int:
    """Create empty files in `directory` until `leave` inodes are left free (0: until none is); returns how many."""
    directory.mkdir(exist_ok=True)
    made = 0
    while free(directory)[1] > leave:
        try:
            (directory / f"f{made}").touch()
        except OSError:  # the node took the last ones meanwhile
            break
        made += 1
    return made
