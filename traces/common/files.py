"""Files a command writes and reads: atomic writes (a temporary name, then a rename; a killed
writer's leftovers removed), output paths checked before the work, JSON, content hashes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from traces.common.errors import TideError


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


