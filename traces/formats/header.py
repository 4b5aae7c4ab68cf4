"""The one reader of a file's header: the format's name and version, for trace, plan and profile.

Every format starts with ``{"format": NAME, "version": N, ...}``. Reading it in one place
means each format refuses the same things the same way: not an object, another format's
name, and a version that is not one this TIDE reads (``true`` is not version 1).
"""
from __future__ import annotations

from typing import Any

from traces.common.errors import TideError


def fail(where: str, msg: str) -> TideError:
    """A reader's error: ``where`` (the file, and a key in it) then what is wrong."""
    return TideError(f"{where}: {msg}")


def read_header(d: Any, where: str, fmt: str, reads: tuple[int, ...], what: str) -> int:
    """The version of a ``fmt`` header ``d`` (a JSON object); ``what`` names the format to a
    person ("trace", "plan", "profile"). Refused in one line: anything that is not an object,
    another format, a version that is not an integer this TIDE reads."""
    if not isinstance(d, dict):
        raise fail(where, f"a {what} is a JSON object, got {type(d).__name__}")
    if d.get("format") != fmt:
        raise fail(where, f"format is {d.get('format')!r}, expected {fmt!r}")
    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in reads:
        raise fail(where, f"{what} version {version!r} is not supported "
                          f"(this TIDE reads {', '.join(map(str, reads))})")
    return version
