"""Shared command-line plumbing: one clear error line, non-zero exit, no traceback."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from traces.errors import TideError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main`` and exit; a TideError or an unreadable file becomes one line on stderr."""
    try:
        code = main(argv)
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A crash or an exception leaves no partial file under ``path``.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise TideError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def check_out_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Fail before any work if an output's folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise TideError(f"{flag} {path}: folder {path.parent} does not exist")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file; a missing or malformed one is a TideError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TideError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TideError(f"{path}: not valid JSON ({exc})") from None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (provenance: which trace, checkpoint or plan)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_sha256(obj: Any) -> str:
    """Hex SHA-256 of a JSON value in canonical form (provenance of a loaded profile)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def span(values: Any) -> str:
    """``"lo-hi"`` of per-layer values (``"v"`` when all equal): a plan's taus or budgets in a table cell."""
    lo, hi = int(min(values)), int(max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"
