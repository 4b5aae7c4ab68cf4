"""A profile's measured tables as functions: linear interpolation inside the measured range,
the last slope carried past it (never below the last value), in one and two dimensions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def interp1(x: np.ndarray | float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise linear; clamped below the first point, last slope continued above the last."""
    x = np.asarray(x, dtype=np.float64)
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    y = np.interp(x, xs, ys)
    if len(xs) >= 2:
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        y = np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), y)
    return y


def interp2(x: np.ndarray | float, y: np.ndarray | float, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """:func:`interp1` along ``y`` within each row ``xs[i]``, then the same rule along ``x``."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    rows = np.stack([interp1(y, ys, zs[i]) for i in range(len(xs))])  # [len(xs), *x.shape]
    if len(xs) == 1:
        return rows[0]
    i = np.clip(np.searchsorted(xs, x), 1, len(xs) - 1)
    r0 = np.take_along_axis(rows, (i - 1)[None], 0)[0]
    r1 = np.take_along_axis(rows, i[None], 0)[0]
    t = np.maximum((x - xs[i - 1]) / (xs[i] - xs[i - 1]), 0.0)
    inside = r0 + np.minimum(t, 1.0) * (r1 - r0)
    return np.where(t > 1.0, r1 + np.maximum(r1 - r0, 0.0) * (t - 1.0), inside)


@dataclass(frozen=True)
class Table1:
    xs: np.ndarray
    ys: np.ndarray

    def __call__(self, x: Any) -> np.ndarray:
        return interp1(x, self.xs, self.ys)


@dataclass(frozen=True)
class Table2:
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    def __call__(self, x: Any, y: Any) -> np.ndarray:
        return interp2(x, y, self.xs, self.ys, self.zs)


