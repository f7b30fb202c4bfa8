"""Code packages: unsafe zips are refused at upload, safe ones unpack exactly."""

import io
import stat
import zipfile

import pytest

from registry.package import sha256, unpack, validate_zip, zip_directory
from wire.config import DEFAULTS
from wire.errors import InvalidParameterValueException

LIMIT = DEFAULTS.unzipped_max_mb * 1024 * 1024


def make_zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, complaint",
    [("../evil.py", "'..'"), ("a/../../evil.py", "'..'"), ("/etc/passwd", "absolute"), ("a\\..\\b", "not allowed")],
)
def test_paths_that_escape_are_refused(name, complaint):
    with pytest.raises(InvalidParameterValueException, match=complaint):
        validate_zip(make_zip([(name, b"x", None)]), unzipped_max_bytes=LIMIT)


def test_symlinks_are_refused():
    with pytest.raises(InvalidParameterValueException, match="symbolic link"):
        validate_zip(make_zip([("link", b"/etc/passwd", stat.S_IFLNK | 0o777)]), unzipped_max_bytes=LIMIT)


def test_unzipped_size_limit():
    data = make_zip([("big.bin", b"\0" * 10_000, None)])
    with pytest.raises(InvalidParameterValueException, match="exceeds"):
        validate_zip(data, unzipped_max_bytes=5_000)


def test_not_a_zip():
    with pytest.raises(InvalidParameterValueException, match="not a valid zip"):
        validate_zip(b"hello", unzipped_max_bytes=LIMIT)


def test_directory_zip_is_deterministic_and_unpacks(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "handler.py").write_text("def handle(e, c): return 1\n")
    (src / "pkg" / "util.py").write_text("X = 1\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    first, second = zip_directory(src), zip_directory(src)
    assert sha256(first) == sha256(second)
    out = tmp_path / "out"
    unpack(first, out, unzipped_max_bytes=LIMIT)
    assert (out / "handler.py").read_text().startswith("def handle")
    assert (out / "pkg" / "util.py").exists()
    assert not (out / "__pycache__").exists()
