"""The sweep's figures (seaborn), each drawn when the table varies what it needs.

* ``tokens_vs_memory.png``: tokens/s against GPU memory, a line per policy, a panel per model;
* ``speedup_heatmap.png``: the plan's speedup over each baseline over PCIe bandwidth and
  CPU cores, a row of panels per model;
* ``best_tau.png``: the tide refresh interval with the most tokens/s against PCIe bandwidth.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from traces.cli import atomic_write  # noqa: E402

BASELINES = ("cpu", "static", "swap", "tide_tau1")


def _save(fig: plt.Figure, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path.name


def _vary(df: pd.DataFrame, col: str, fixed: tuple[str, ...]) -> pd.DataFrame:
    """Rows of the largest group where everything in ``fixed`` is constant and ``col`` varies."""
    best = pd.DataFrame()
    for _, g in df.groupby(list(fixed), dropna=False):
        if g[col].nunique() > 1 and len(g) > len(best):
            best = g
    return best


def tokens_vs_memory(df: pd.DataFrame, out: Path) -> str | None:
    ok = df[df["status"] == "ok"]
    rows = []
    for _, g in ok.groupby("model"):
        rows.append(_vary(g, "gpu_mem_gb", ("profile", "pcie", "cpu_cores", "gen_length")))
    data = pd.concat(rows) if rows else pd.DataFrame()
    if data.empty:
        return None
    g = sns.relplot(data=data, x="gpu_mem_gb", y="tokens_per_s", hue="policy", style="policy", col="model",
                    kind="line", markers=True, facet_kws={"sharey": False}, height=3.6, aspect=1.2)
    g.set_axis_labels("GPU memory (GB)", "predicted tokens/s")
    g.figure.suptitle(f"Tokens/s against GPU memory ({data['profile'].iloc[0]})", y=1.03)
    return _save(g.figure, out / "tokens_vs_memory.png")


def speedup_heatmap(df: pd.DataFrame, out: Path) -> str | None:
    plan = df[(df["policy"] == "plan") & (df["status"] == "ok")]
    panels = []
    for model, g in plan.groupby("model"):
        g = _vary(g, "pcie", ("profile", "gpu_mem_gb", "gen_length"))
        if not g.empty and g["cpu_cores"].nunique() > 1:
            panels.append((model, g))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), len(BASELINES), figsize=(3.3 * len(BASELINES), 2.8 * len(panels)),
                             squeeze=False)
    for r, (model, g) in enumerate(panels):
        for c, b in enumerate(BASELINES):
            pivot = g.pivot_table(index="cpu_cores", columns="pcie", values=f"speedup_vs_{b}").sort_index(ascending=False)
            sns.heatmap(pivot, annot=True, fmt=".2f", cmap="viridis", ax=axes[r][c], cbar=False)
            axes[r][c].set_title(f"{model}: plan / {b}", fontsize=9)
            axes[r][c].set_xlabel("PCIe bandwidth (x)")
            axes[r][c].set_ylabel("CPU cores (x)")
    fig.suptitle("The plan's speedup over each baseline", y=1.01)
    fig.tight_layout()
    return _save(fig, out / "speedup_heatmap.png")


def best_tau(df: pd.DataFrame, out: Path) -> str | None:
    tide = df[df["policy"].str.startswith("tide") & (df["status"] == "ok")].copy()
    if tide.empty:
        return None
    tide["tau_n"] = tide["tau"].astype(int)
    keys = ["key", "model", "h2d_gbps", "cpu_cores", "profile", "gpu_mem_gb"]
    best = tide.loc[tide.groupby(keys)["tokens_per_s"].idxmax()]
    best = pd.concat([_vary(g, "h2d_gbps", ("profile", "gpu_mem_gb")) for _, g in best.groupby("model")])
    if best.empty or best["tau_n"].nunique() < 1:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    sns.lineplot(data=best, x="h2d_gbps", y="tau_n", hue="model", style="cpu_cores", markers=True, ax=ax)
    ax.set_xlabel("host-to-device bandwidth (GB/s)")
    ax.set_ylabel("best tide tau")
    ax.set_title("Best refresh interval against PCIe bandwidth")
    return _save(fig, out / "best_tau.png")


def draw_all(df: pd.DataFrame, out: Path) -> list[str]:
    return [n for n in (tokens_vs_memory(df, out), speedup_heatmap(df, out), best_tau(df, out)) if n]
