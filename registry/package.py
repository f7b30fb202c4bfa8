"""Code packages: building a zip from a directory, refusing unsafe zips, and unpacking a verified one."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from wire.errors import InvalidParameterValueException

MAX_ENTRIES = 20_000
NAME_MAX_BYTES = 255  # a file name, as Linux filesystems allow
PATH_MAX_BYTES = 1024
SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_directory(root: Path) -> bytes:
    """A deterministic zip of `root`: same files, same bytes, same sha256, so re-uploads are recognised."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidParameterValueException(f"{root} is not a directory")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in path.parts or path.is_symlink() or not path.is_file():
                continue
            info = zipfile.ZipInfo(rel, date_time=_FIXED_TIME)
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def validate_zip(data: bytes, *, unzipped_max_bytes: int) -> int:
    """Everything a worker will do to unpack this zip, done here first, in memory: every entry is read to its
    end (so a bad CRC, an encrypted entry or an unsupported compression is found now) and checked for what
    could write outside its directory, fill the disk, or fail on a filesystem. A zip that passes unpacks on
    every worker. Returns its unzipped size."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise InvalidParameterValueException(f"code is not a valid zip file: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise InvalidParameterValueException(f"zip has {len(infos)} entries; at most {MAX_ENTRIES} are allowed")
        files: set[str] = set()
        dirs: set[str] = set()
        for info in infos:
            _check_entry(info)
            path = info.filename.rstrip("/")
            if info.is_dir():
                dirs.add(path)
            elif path in files:
                raise InvalidParameterValueException(f"zip entry {path!r} appears twice")
            else:
                files.add(path)
            dirs.update(str(p) for p in PurePosixPath(path).parents if str(p) != ".")
        clash = files & dirs
        if clash:
            raise InvalidParameterValueException(
                f"zip entry {sorted(clash)[0]!r} is both a file and a directory holding other entries")
        return _read_all(zf, infos, unzipped_max_bytes)


def _check_entry(info: zipfile.ZipInfo) -> None:
    _check_name(info.filename)
    if info.flag_bits & 0x1:
        raise InvalidParameterValueException(f"zip entry {info.filename!r} is encrypted; upload it unencrypted")
    if info.compress_type not in SUPPORTED_COMPRESSION:
        raise InvalidParameterValueException(
            f"zip entry {info.filename!r} uses compression method {info.compress_type}; use deflate or none")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise InvalidParameterValueException(
            f"zip entry {info.filename!r} is a symbolic link; links are refused (they can point out of the tree)"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InvalidParameterValueException(f"zip entry {info.filename!r} is not a file or directory")


def _check_name(name: str) -> None:
    if not name or "\x00" in name or "\\" in name:
        raise InvalidParameterValueException(f"zip entry name {name!r} is not allowed")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise InvalidParameterValueException(f"zip entry {name!r} has an absolute path; paths must be relative")
    if ".." in path.parts:
        raise InvalidParameterValueException(f"zip entry {name!r} contains '..'; paths must stay inside the package")
    if len(name.encode()) > PATH_MAX_BYTES or any(len(p.encode()) > NAME_MAX_BYTES for p in path.parts):
        raise InvalidParameterValueException(
            f"zip entry {name[:60]!r}... is too long: at most {NAME_MAX_BYTES} bytes a name, {PATH_MAX_BYTES} a path")


def _read_all(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], unzipped_max_bytes: int) -> int:
    total = 0
    for info in infos:
        if info.is_dir():
            continue
        try:
            with zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > unzipped_max_bytes:  # counted as read: a header may lie about sizes
                        raise InvalidParameterValueException(
                            f"unzipped code exceeds {unzipped_max_bytes // (1024 * 1024)} MB; make the package "
                            "smaller")
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError,
                OSError) as exc:
            raise InvalidParameterValueException(f"zip entry {info.filename!r} cannot be read: {exc}") from None
    return total


def unpack(data: bytes, dest: Path, *, unzipped_max_bytes: int) -> int:
    """Unpack a validated zip into `dest` (created; replaced atomically). Returns bytes written."""
    validate_zip(data, unzipped_max_bytes=unzipped_max_bytes)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            target = tmp / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > unzipped_max_bytes:  # the header may lie about sizes; the stream cannot
                        raise InvalidParameterValueException("unzipped code exceeds the size limit")
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(target, 0o755 if mode & 0o100 else 0o644)
    for path in [tmp, *tmp.rglob("*")]:  # sandboxes run as other uids: the tree must be theirs to read
        if path.is_dir():
            os.chmod(path, 0o755)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return written
