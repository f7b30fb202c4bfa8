"""What a node writes to its data dir, and what becomes of it when a write fails.

A node persists its Raft journals and dumps (wire/raft_storage.py), code blobs on control nodes
(registry/blobs.py) and which Raft groups it hosts (nodes/daemon.py). Every such write runs under `persisting`:
an OSError there (no space, no inodes, an I/O error, a read-only remount) goes to the handler the node installed
(`on_failure`), which logs one line and ends the node; without a handler (a test, a tool) the error is raised as it
was. A node that carried on would limp: pysyncobj logs and retries a failed tick for ever, and a Raft replica must
not acknowledge what it could not write.

`DiskWatch` tells whether the node can persist at all: every `persist_probe_interval_s` it writes, fsyncs and
removes a small file in each filesystem of its data dir (a failure is a persistence failure like any other), and
it reports that the node cannot persist while free space or inodes are under `persist_min_free_mb` and
`persist_min_free_inodes` (`margin_problem`, the rule, is I/O-free).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

log = structlog.get_logger("node")

MiB = 1024 * 1024
PROBE_FILE = ".persist-probe"

_on_failure: Callable[[str, OSError], None] | None = None


def on_failure(handler: Callable[[str, OSError], None] | None) -> None:
    """Who is told of a failed write (path, error): the node daemon, which ends the node. None: nobody."""
    global _on_failure
    _on_failure = handler


def failed(path: str | Path, err: OSError) -> None:
    """A write to `path` failed: tell the node (whose handler does not return), then the caller raises `err`."""
    handler = _on_failure
    if handler is not None:
        handler(str(getattr(err, "filename", None) or path), err)


@contextmanager
def persisting(path: str | Path) -> Iterator[None]:
    """Around a write of durable state at (or under) `path`: an OSError in it is a persistence failure."""
    try:
        yield
    except OSError as err:
        failed(path, err)
        raise


def margin_problem(where: str, free_bytes: int, free_inodes: int | None, *, min_free_mb: int,
                   min_free_inodes: int) -> str | None:
    """Why a filesystem with this much free is too full to keep persisting (None: it is not). `free_inodes` is None
    where the filesystem has no inode limit."""
    if free_bytes < min_free_mb * MiB:
        return (f"{where}: {free_bytes / MiB:.1f} MiB free, under the {min_free_mb} MiB margin "
                "(persist_min_free_mb); free space there")
    if free_inodes is not None and free_inodes < min_free_inodes:
        return (f"{where}: {free_inodes} inodes free, under the {min_free_inodes} margin (persist_min_free_inodes); "
                "remove files there")
    return None


def check(directories: list[Path], *, min_free_mb: int, min_free_inodes: int) -> str | None:
    """Probe each filesystem among `directories` once (the first directory of each): write, fsync and remove a
    small file, then measure what is free. Returns why the node cannot persist, or None; raises the OSError of a
    probe write that failed."""
    seen: set[int] = set()
    problems = []
    for directory in directories:
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            continue  # not made yet (blobs/ on a node that never stored one)
        if st.st_dev in seen:
            continue
        seen.add(st.st_dev)
        _probe(directory / PROBE_FILE)
        fs = os.statvfs(directory)
        inodes = fs.f_favail if fs.f_files else None  # 0 files in all: no inode limit (btrfs, some FUSE)
        problem = margin_problem(str(directory), fs.f_bavail * fs.f_frsize, inodes, min_free_mb=min_free_mb,
                                 min_free_inodes=min_free_inodes)
        if problem:
            problems.append(problem)
    return "; ".join(problems) or None


def _probe(path: Path) -> None:
    with persisting(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"flint can persist\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)


class DiskWatch:
    """Whether this node can persist, probed every `interval_s` (off the event loop). `problem` says why not."""

    def __init__(self, directories: list[Path], *, interval_s: float, min_free_mb: int, min_free_inodes: int):
        self.directories = directories
        self.interval_s = interval_s
        self.min_free_mb = min_free_mb
        self.min_free_inodes = min_free_inodes
        self.problem: str | None = None

    @property
    def can_persist(self) -> bool:
        return self.problem is None

    async def check(self) -> None:
        problem = await asyncio.to_thread(check, self.directories, min_free_mb=self.min_free_mb,
                                          min_free_inodes=self.min_free_inodes)
        if (problem is None) != (self.problem is None):  # one line each way, not one per changing figure
            if problem:
                log.warning("node.cannot_persist", problem=problem)
            else:
                log.info("node.can_persist", was=self.problem)
        self.problem = problem

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except OSError as err:  # a probe write failed: the node's handler has ended the node, or there is none
                self.problem = f"a probe write failed: {err}"
            await asyncio.sleep(self.interval_s)
