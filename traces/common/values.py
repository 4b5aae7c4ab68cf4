"""Typed reading of values from JSON, TOML and ``config.json``: one check per kind of value.

Files hold values a user can get wrong in ways Python would silently accept: ``True`` taken
as the id 1, ``2.5`` truncated to 2, ``"8"`` compared with a number, NaN that makes every
comparison false, an integer too large for numpy. Every reader asks here instead of
calling ``int()`` or ``float()``, so each mistake is one :class:`TideError` naming where the
value sits (``file: key``) and what it must be.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from traces.common.errors import TideError

INT64_MAX = 2**63 - 1
_MISSING = object()


def _is_int(v: Any) -> bool:
    import numpy as np
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)))


def need_int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (never a boolean or a float) in ``lo..hi``, at most 64 bits."""
    if not _is_int(v):
        raise TideError(f"{where} must be an integer, got {v!r}")
    v = int(v)
    lo_ = -INT64_MAX - 1 if lo is None else lo
    hi_ = INT64_MAX if hi is None else hi
    if not lo_ <= v <= hi_:
        if lo is not None and hi is not None:
            raise TideError(f"{where} must lie in {lo}..{hi}, got {v}")
        if lo is not None:
            raise TideError(f"{where} must be at least {lo}" + (f", got {v}" if v <= INT64_MAX else " and fit in 64 bits"))
        raise TideError(f"{where} must be at most {hi_}, got {v}")
    return v


def need_float(v: Any, where: str, lo: float | None = None, hi: float | None = None, positive: bool = False) -> float:
    """A finite number (an integer is fine; a boolean or a string is not) in ``lo..hi``;
    ``positive``: greater than zero."""
    if isinstance(v, bool) or not (isinstance(v, (int, float)) or _is_int(v) or _is_np_float(v)):
        raise TideError(f"{where} must be a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:
        raise TideError(f"{where} must be a finite number, got an integer of {len(str(v))} digits") from None
    if not math.isfinite(f):
        raise TideError(f"{where} must be a finite number, got {v!r}")
    if positive and f <= 0:
        raise TideError(f"{where} must be positive, got {v!r}")
    if lo is not None and f < lo or hi is not None and f > hi:
        if lo is not None and hi is not None:
            raise TideError(f"{where} must lie in {lo:g}..{hi:g}, got {v!r}")
        raise TideError(f"{where} must be at {'least' if lo is not None else 'most'} {lo if lo is not None else hi:g}, got {v!r}")
    return f


def _is_np_float(v: Any) -> bool:
    import numpy as np
    return isinstance(v, np.floating)


def need_bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise TideError(f"{where} must be true or false, got {v!r}")
    return v


def need_str(v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        raise TideError(f"{where} must be a string, got {v!r}")
    if choices is not None and v not in choices:
        raise TideError(f"{where} must be one of {', '.join(choices)}, got {v!r}")
    return v


def need_dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise TideError(f"{where} must be an object (a mapping), got {type(v).__name__}")
    return v


def need_list(v: Any, where: str, nonempty: bool = False) -> list:
    if not isinstance(v, list):
        raise TideError(f"{where} must be a list, got {type(v).__name__}")
    if nonempty and not v:
        raise TideError(f"{where} must not be empty")
    return v


def need_ints(v: Any, where: str, lo: int | None = None, hi: int | None = None, nonempty: bool = True) -> list[int]:
    """A list of integers, each checked as :func:`need_int`."""
    return [need_int(x, f"{where}[{i}]", lo, hi) for i, x in enumerate(need_list(v, where, nonempty))]


def need_numbers(v: Any, where: str, **kw: Any) -> list[float]:
    """A list of numbers, each checked as :func:`need_float`."""
    return [need_float(x, f"{where}[{i}]", **kw) for i, x in enumerate(need_list(v, where, True))]


def get(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    """``d[key]``; missing (and no default) is a TideError naming the key."""
    if key in d:
        return d[key]
    if default is _MISSING:
        raise TideError(f"{where} lacks {key!r}")
    return default
