"""Shared command-line plumbing: one clear error line, non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from traces.errors import TideError
from traces.values import INT64_MAX


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line too (a TideError), not usage text."""

    def error(self, message: str):  # type: ignore[override]
        raise TideError(message)


def number(text: str) -> float:
    """A flag's finite number (``nan`` and ``inf`` are refused: a limit of NaN fits everything)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def integer(text: str) -> int:
    """A flag's integer, at most 64 bits (numpy and torch take no more)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits")
    return v


def comma_list(text: str, flag: str, convert: Callable[[str], Any], what: str = "values") -> list[Any]:
    """A flag's comma-separated values, each through ``convert``; a value it cannot read
    (ValueError, argparse's type error) or no value at all is one error line naming the flag,
    and a TideError of ``convert``'s own (a range, a choice) is passed on as it is."""
    try:
        vals = [convert(v) for v in (s.strip() for s in text.split(",")) if v]
    except TideError:  # the converter's own line (a range, a choice) says more
        raise
    except (ValueError, argparse.ArgumentTypeError):
        raise TideError(f"{flag}: expected comma-separated {what}, got {text!r}") from None
    if not vals:
        raise TideError(f"{flag}: no values")
    return vals


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so its cleanup (``finally``, pools) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main`` and exit; a TideError or an unreadable file becomes one line on stderr;
    SIGTERM and Ctrl-C unwind (workers ended, temporaries removed) and exit 143 or 130."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main(argv)
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a file the command could not read or write (missing, no space, no permission)
        print(f"error: {exc.filename or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(143)
    sys.exit(code or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(path: Path) -> str:
    """The prefix of a temporary sibling of ``path``: ``.NAME.PID.`` (the writer's process id,
    so a later write can tell a killed writer's leftovers from a live one's)."""
    return f".{path.name}.{os.getpid()}."


def remove_stale(path: Path) -> None:
    """Remove temporary siblings of ``path`` (files or folders) left by writers that died."""
    pat = re.compile(r"^\." + re.escape(path.name) + r"\.(\d+)\.[^/]*\.tmp$")
    try:
        entries = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return
    for e in entries:
        m = pat.match(e.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(e, ignore_errors=True) if e.is_dir() and not e.is_symlink() else e.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A crash or an exception leaves no partial file under ``path``; a missing folder is
    made; stale temporaries of earlier, killed writes of ``path`` are removed first.
    """
    path = Path(path)
    if path.is_dir():
        raise TideError(f"{path}: is a folder, expected a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=".tmp", dir=path.parent)
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


def check_out_path(path: str | os.PathLike, flag: str = "--out", folder: bool = False) -> Path:
    """Fail before any work unless ``path`` can be written: a file (or, with ``folder``, a
    folder) that is not the other kind, under folders that exist or can be made and that
    this user can write. Creates nothing."""
    path = Path(path)
    if str(path) in ("", "."):
        raise TideError(f"{flag}: needs a {'folder' if folder else 'file'} name")
    if path.exists() and path.is_dir() != folder:
        raise TideError(f"{flag} {path}: exists and is {'a file' if folder else 'a folder'}, "
                        f"expected {'a folder' if folder else 'a file'}")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise TideError(f"{flag} {path}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tide-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise TideError(f"{flag} {path}: cannot write in {probe} ({exc.strerror})") from None
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
