"""When requests arrive: the request stream the serving simulator and the runtime share.

Four kinds, each a deterministic list of offsets from the stream's start (seconds), one per
request in the trace's order, or a closed loop:

* offline: every request at 0 (benchmarks, offline generation, rollouts);
* ``poisson(rate, n, seed)``: exponential gaps at ``rate`` requests per second, seeded;
* ``read_arrivals(path, n)``: a file of offsets, one number per line (e.g. from a real log;
  sorted, in 0..1e6 s, at least one per request; blank lines and ``#`` comments skipped);
* ``Arrivals(clients=N)``: a closed loop of ``N`` clients, each sending its next request
  when the previous one returns (the first ``N`` at 0); offsets then depend on the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.common.checks import check_clients, check_offset, check_rate, check_seed
from traces.common.errors import TideError


@dataclass(frozen=True)
class Arrivals:
    """A request stream: fixed ``offsets`` (seconds, one per request, sorted) or ``clients``."""

    offsets: tuple[float, ...] | None = None
    clients: int | None = None
    label: str = "offline"

    @classmethod
    def offline(cls, n: int) -> "Arrivals":
        return cls(offsets=(0.0,) * n)

    @property
    def closed(self) -> bool:
        return self.clients is not None

    def __post_init__(self) -> None:
        if (self.offsets is None) == (self.clients is None):
            raise TideError("a request stream has offsets or clients, not both")


def poisson(rate: float, n: int, seed: int = 0) -> Arrivals:
    """``n`` arrivals of a Poisson stream at ``rate`` per second (the first after one gap)."""
    rate, seed = check_rate(rate), check_seed(seed)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return Arrivals(offsets=tuple(np.cumsum(gaps).tolist()), label=f"poisson {rate:g}/s seed {seed}")


def closed_loop(clients: int) -> Arrivals:
    return Arrivals(clients=check_clients(clients), label=f"{clients} clients")


def read_arrivals(path: str | Path, n: int) -> Arrivals:
    """The first ``n`` offsets of an arrivals file; one error line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TideError(f"--arrivals {path}: file not found")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise TideError(f"{path}: not UTF-8 text") from None
    out: list[float] = []
    for i, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            v = float(text)
        except ValueError:
            raise TideError(f"{path}:{i}: {text!r} is not a number of seconds") from None
        v = check_offset(v, f"{path}:{i}: an arrival offset")
        if out and v < out[-1]:
            raise TideError(f"{path}:{i}: offsets must be sorted ({v:g} comes after {out[-1]:g})")
        out.append(v)
    if len(out) < n:
        raise TideError(f"{path}: {len(out)} arrival offsets for {n} requests; give one per request")
    return Arrivals(offsets=tuple(out[:n]), label=f"arrivals from {path.name}")
