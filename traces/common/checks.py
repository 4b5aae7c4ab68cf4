"""One check per kind of value that commands and readers share: seeds, batch sizes, request
rates, clients, arrival offsets. Each is one function with the bounds the value can really
take; flags use them as argparse types (:func:`flag`), files and Python callers call them
with where the value sits, so every surface refuses the same values with the same line.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Sequence

from traces.common.cli import integer, number
from traces.common.errors import TideError
from traces.common.values import need_int

#: The longest stream: an arrival offset of more is a mistake (the runtime would sleep that long).
MAX_OFFSET_S = 1e6
#: The largest batch: requests per forward (each holds a KV cache and a canvas).
MAX_BATCH_SIZE = 1 << 12


def check_seed(v: Any, where: str = "--seed") -> int:
    """A seed: an integer in 0..2**63-1 (what numpy's and torch's generators take)."""
    return need_int(v, where, lo=0)


def check_batch_size(v: Any, where: str = "--batch-size") -> int:
    """Requests per forward: an integer in 1..:data:`MAX_BATCH_SIZE`."""
    v = need_int(v, where, lo=1)
    if v > MAX_BATCH_SIZE:
        raise TideError(f"{where} must be at most {MAX_BATCH_SIZE}, got {v}")
    return v


def resolve_batch_size(flag: int | None = None, plan: int | None = None, trace: int | None = None) -> int:
    """The batch size a run uses, the one rule every command follows: the flag, else the
    plan's, else the trace's (the forwards it recorded), else 1; checked once, here."""
    for where, v in (("--batch-size", flag), ("the plan's batch_size", plan), ("the trace's batch_size", trace)):
        if v is not None:
            return check_batch_size(v, where)
    return 1


def check_batch_sizes(values: Sequence[Any], where: str = "--batch-sizes") -> list[int]:
    """Distinct batch sizes, each as :func:`check_batch_size`, in increasing order."""
    if isinstance(values, (str, bytes)) or not len(values):
        raise TideError(f"{where}: give at least one batch size")
    return sorted({check_batch_size(v, where) for v in values})


def check_rate(v: Any, where: str = "--arrival-rate") -> float:
    """Requests per second: finite, and at least one per :data:`MAX_OFFSET_S` (a slower stream's
    gaps are longer than any stream this tool runs, and their inverse may not even be finite)."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 1.0 / MAX_OFFSET_S
    if not ok:
        raise TideError(f"{where} must be a finite number of requests per second of at least {1.0 / MAX_OFFSET_S:g} "
                        f"(one per {MAX_OFFSET_S:g} s), got {v!r}")
    return float(v)


def check_clients(v: Any, where: str = "--clients") -> int:
    """A closed loop's clients: an integer in 1..:data:`MAX_BATCH_SIZE`."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BATCH_SIZE:
        raise TideError(f"{where} must be an integer of at least 1 (at most {MAX_BATCH_SIZE}), got {v!r}")
    return v


def check_offset(v: Any, where: str) -> float:
    """An arrival offset: seconds from the stream's start, in 0..:data:`MAX_OFFSET_S`."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_OFFSET_S
    if not ok:
        raise TideError(f"{where} must be a finite number of seconds at least 0 and at most {MAX_OFFSET_S:g}, got {v!r}")
    return float(v)


def check_offsets(offsets: Sequence[Any], n: int, where: str = "arrivals") -> tuple[float, ...]:
    """One offset per request (``n``), each as :func:`check_offset`, sorted."""
    if len(offsets) != n:
        raise TideError(f"{where}: {len(offsets)} arrival offsets for {n} requests; give one per request")
    out = tuple(check_offset(v, f"{where}[{i}]") for i, v in enumerate(offsets))
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise TideError(f"{where}: offsets must be sorted ({out[i]:g} comes after {out[i - 1]:g})")
    return out


def flag(check: Callable[..., Any], parse: Callable[[str], Any] = integer) -> Callable[[str], Any]:
    """An argparse type: the text parsed (``integer`` or ``number``), then ``check`` with its
    default ``where``, the flag (``--seed must be at least 0, got -1``)."""
    def convert(text: str) -> Any:
        try:
            return check(parse(text))
        except TideError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None
    convert.__name__ = check.__name__.removeprefix("check_")
    return convert


#: Flag types of the checks above.
seed = flag(check_seed)
batch_size = flag(check_batch_size)
rate = flag(check_rate, number)
clients = flag(check_clients)
