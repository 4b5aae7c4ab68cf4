"""A Gantt chart of one forward from a simulator timeline (``sim.replay --timeline``)."""
from __future__ import annotations

import pandas as pd

from traces.costs.tasks import RESOURCES


def plot_forward(timeline: pd.DataFrame, forward: int = 0, ax=None):
    """Bars per resource (host thread, CPU experts, GPU, PCIe each way, the drive) over time for one forward; returns the axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = timeline[timeline["forward"] == forward]
    if df.empty:
        raise ValueError(f"no events for forward {forward}")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3))
    t0 = df["start_s"].min()
    df = df.assign(what=df["what"].str.rstrip("0123456789 "))  # swap's waves share a colour
    kinds = sorted(df["what"].unique())
    colors = dict(zip(kinds, sns.color_palette("tab10", len(kinds))))
    for y, res in enumerate(RESOURCES):
        rows = df[df["resource"] == res]
        ax.broken_barh(list(zip((rows["start_s"] - t0) * 1e3, (rows["end_s"] - rows["start_s"]) * 1e3)), (y - 0.4, 0.8),
                       facecolors=[colors[w] for w in rows["what"]])
    ax.set_yticks(range(len(RESOURCES)), [r.upper() for r in RESOURCES])
    ax.set_xlabel("ms from the forward's start")
    ax.set_title(f"forward {forward}")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
              fontsize=7, loc="upper right", ncol=2)
    return ax
