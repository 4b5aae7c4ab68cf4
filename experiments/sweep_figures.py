"""The sweep's figures (seaborn), each drawn when the table varies what it needs.

* ``tokens_vs_memory.png``: tokens/s against GPU memory, a line per policy, a panel per
  model (one study's points, one box);
* ``speedup_heatmap.png``: the plan's speedup over each baseline the sweep priced, over PCIe
  bandwidth and CPU cores, a row of panels per model, one colour scale and bar for all;
* ``best_tau.png``: the tide refresh interval with the most tokens/s against PCIe bandwidth;
* ``plan_kinds.png``: the kind the plan gave each MoE layer (cpu, static, swap, tide), a row
  per point, a panel per model;
* ``tokens_vs_batch.png``: tokens/s against the batch size, a line per policy and the plan,
  a panel per model;
* ``latency_vs_rate.png``: the plan's p50 and p99 latency against the request rate at its
  planned batch size, a panel per model, the rates it cannot serve shaded.

A figure (or a panel) with nothing to show is skipped with a note saying why; a figure
that fails to draw is reported and skipped too: drawing never costs the run its table.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from traces.common.files import atomic_write  # noqa: E402
from traces.formats.vocabulary import KINDS
from traces.policies.labels import BASELINES, display_name  # noqa: E402

LABELS = {b: display_name(b) for b in BASELINES}


class Skip(Exception):
    """Nothing to draw; the message says why."""


def _save(fig: plt.Figure, path: Path) -> str:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return path.name


def _vary(df: pd.DataFrame, col: str, fixed: tuple[str, ...]) -> pd.DataFrame:
    """Rows of the largest group where everything in ``fixed`` is constant and ``col`` varies."""
    best = pd.DataFrame()
    for _, g in df.groupby(list(fixed), dropna=False):
        if g[col].nunique() > 1 and len(g) > len(best):
            best = g
    return best


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """Rows priced offline (not a plan's rows served to an arrival rate)."""
    if "tokens_per_s" not in df:
        return df.iloc[:0]
    offline = df["arrival_rate"].isna() if "arrival_rate" in df else True
    return df[(df["status"] == "ok") & df["tokens_per_s"].notna() & offline]


def _tokens_against(df: pd.DataFrame, x: str, fixed: tuple[str, ...], skip: str) -> tuple[pd.DataFrame, sns.FacetGrid]:
    """Tokens/s against ``x``, a line per policy, a panel per model: each model's largest
    group of offline rows where ``fixed`` holds and ``x`` varies (none: :class:`Skip`)."""
    ok = _ok(df)
    parts = [_vary(g, x, fixed) for _, g in ok.groupby("model")] if x in ok else []
    parts = [p for p in parts if not p.empty]
    if not parts:
        raise Skip(skip)
    data = pd.concat(parts).assign(policy=lambda d: d["policy"].map(display_name))
    g = sns.relplot(data=data, x=x, y="tokens_per_s", hue="policy", style="policy", col="model",
                    kind="line", markers=True, facet_kws={"sharey": False}, height=3.6, aspect=1.2)
    g.set_titles("{col_name}")
    return data, g


def tokens_vs_memory(df: pd.DataFrame, out: Path) -> str:
    data, g = _tokens_against(df, "gpu_mem_gb", ("study", "profile", "pcie", "cpu_cores", "gen_length"),
                              "tokens_vs_memory.png: no study varies GPU memory")
    g.set_axis_labels("GPU memory (GB)", "predicted tokens/s")
    box = ", ".join(sorted({f"{r.profile} (study {r.study})" for r in data[["profile", "study"]].drop_duplicates().itertuples()}))
    g.figure.suptitle(f"Tokens/s against GPU memory: {box}", y=1.03)
    return _save(g.figure, out / "tokens_vs_memory.png")


def speedup_heatmap(df: pd.DataFrame, out: Path) -> str:
    plan = _ok(df[df["policy"] == "plan"])
    panels = []
    for model, g in plan.groupby("model"):
        g = _vary(g, "pcie", ("study", "profile", "gpu_mem_gb", "gen_length"))
        if not g.empty and g["cpu_cores"].nunique() > 1:
            panels.append((model, g))
    if not panels:
        raise Skip("speedup_heatmap.png: no study varies both PCIe bandwidth and CPU cores")
    cols = [b for b in BASELINES if any(f"speedup_vs_{b}" in g and g[f"speedup_vs_{b}"].notna().any() for _, g in panels)]
    if not cols:
        raise Skip("speedup_heatmap.png: no baseline was priced (--policies holds none of cpu, static, swap, tide)")
    vals = np.concatenate([g[f"speedup_vs_{b}"].to_numpy(float) for _, g in panels for b in cols])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    lo, hi = float(np.log2(vals.min())), float(np.log2(vals.max()))
    lim = float(max(1, np.ceil(max(abs(lo), abs(hi)))))  # whole powers of 2 either side of 1x
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(3.7 * len(cols) + 1, 3.1 * len(panels)), squeeze=False,
                             layout="constrained")
    for r, (model, g) in enumerate(panels):
        for c, b in enumerate(cols):
            ax = axes[r][c]
            pivot = g.pivot_table(index="cpu_cores", columns="pcie", values=f"speedup_vs_{b}").sort_index(ascending=False)
            if pivot.isna().all().all():
                ax.set_axis_off()
                ax.set_title(f"{model}: {LABELS[b]} not priced", fontsize=9)
                continue
            sns.heatmap(np.log2(pivot), annot=pivot, fmt=".2f", cmap="RdBu", vmin=-lim, vmax=lim, center=0,
                        ax=ax, cbar=False)
            ax.set_title(f"{model}: plan over {LABELS[b]}", fontsize=9)
            ax.set_xlabel("PCIe bandwidth (x the box's)" if r == len(panels) - 1 else "")
            ax.set_ylabel("CPU cores (x the box's)" if c == 0 else "")
    sm = plt.cm.ScalarMappable(cmap="RdBu", norm=plt.Normalize(-lim, lim))
    cb = fig.colorbar(sm, ax=axes, shrink=0.8)
    step = max(1.0, np.ceil(2 * lim / 8))
    ticks = np.arange(-lim, lim + 1, step)
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{2 ** t:g}x" if t >= 0 else f"1/{2 ** -t:g}x" for t in ticks])
    cb.set_label("plan's speedup (log scale)")
    where = "; ".join(f"{m}: {g['profile'].iloc[0]} at {g['gpu_mem_gb'].iloc[0]:g} GB" for m, g in panels)
    fig.suptitle(f"The plan's speedup over each baseline ({where})")
    return _save(fig, out / "speedup_heatmap.png")


def best_tau(df: pd.DataFrame, out: Path) -> str:
    tide = _ok(df[df["policy"].astype(str).str.startswith("tide")]).copy()
    if tide.empty:
        raise Skip("best_tau.png: no tide setting was priced")
    tide["tau_n"] = tide["tau"].astype(int)
    keys = ["key", "model", "h2d_gbps", "cpu_cores", "profile", "gpu_mem_gb"]
    best = tide.loc[tide.groupby(keys)["tokens_per_s"].idxmax()]
    parts = [_vary(g, "h2d_gbps", ("study", "profile", "gpu_mem_gb")) for _, g in best.groupby("model")]
    parts = [p for p in parts if not p.empty]
    if not parts:
        raise Skip("best_tau.png: no study varies PCIe bandwidth")
    best = pd.concat(parts)
    best["CPU cores (x)"] = best["cpu_cores"].map(lambda v: f"{v:g}")
    cores = [f"{v:g}" for v in sorted(best["cpu_cores"].unique())]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=best, x="h2d_gbps", y="tau_n", hue="model", style="CPU cores (x)", style_order=cores,
                 markers=True, ax=ax)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.5, max(best["tau_n"].max(), 2) + 0.5)
    ax.set_xlabel("host-to-device bandwidth (GB/s)")
    ax.set_ylabel("best tide tau (steps)")
    taus = sorted(tide["tau_n"].unique())
    ax.set_title(f"Best refresh interval (of tau {', '.join(map(str, taus))}) against PCIe", fontsize=10)
    return _save(fig, out / "best_tau.png")


def plan_kinds(df: pd.DataFrame, out: Path) -> str:
    plan = _ok(df[df["policy"] == "plan"])
    if plan.empty or "plan_kind" not in plan:
        raise Skip("plan_kinds.png: no plan was solved")
    models = list(dict.fromkeys(plan["model"]))
    heights = [plan["model"].eq(m).sum() for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 1.2 + 0.22 * sum(heights) + 0.6 * len(models)), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    colors = sns.color_palette("Set2", len(KINDS))
    cmap = matplotlib.colors.ListedColormap(colors)
    for ax, model in zip(axes[:, 0], models):
        g = plan[plan["model"] == model]
        grid = np.array([[KINDS.index(k) for k in r.split()] for r in g["plan_kind"]])
        labels = [f"{r.study}: {r.box}" + (f", batch {r.batch_size}" if getattr(r, "batch_size", 1) > 1 else "")
                  for r in g.itertuples()]
        sns.heatmap(grid, cmap=cmap, vmin=-0.5, vmax=len(KINDS) - 0.5, cbar=False, ax=ax, linewidths=0.3,
                    yticklabels=labels, xticklabels=5)
        ax.set_title(f"{model}: kind per MoE layer", fontsize=9)
        ax.set_xlabel("MoE layer")
        ax.tick_params(axis="y", labelsize=7)
    handles = [matplotlib.patches.Patch(color=c, label=k) for k, c in zip(KINDS, colors)]
    fig.legend(handles=handles, loc="outside upper right", ncols=len(KINDS), fontsize=8)
    return _save(fig, out / "plan_kinds.png")


def tokens_vs_batch(df: pd.DataFrame, out: Path) -> str:
    data, g = _tokens_against(df, "batch_size", ("study", "profile", "pcie", "cpu_cores", "gpu_mem_gb", "gen_length",
                                                 "requests"), "tokens_vs_batch.png: no study varies the batch size")
    sizes = sorted(int(b) for b in data["batch_size"].unique())
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
    g.set_axis_labels("requests per forward (batch size)", "predicted tokens/s (offline)")
    r = data.iloc[0]
    g.figure.suptitle(f"Tokens/s against the batch size: {r.profile}, {r.gpu_mem_gb:g} GB GPU, "
                      f"{int(r.requests)} requests of {int(r.gen_length)} tokens", y=1.03)
    return _save(g.figure, out / "tokens_vs_batch.png")


def latency_vs_rate(df: pd.DataFrame, out: Path) -> str:
    if "arrival_rate" not in df or "planned_batch_size" not in df:
        raise Skip("latency_vs_rate.png: no study serves the plan to arriving requests")
    at = df[(df["policy"] == "plan") & df["arrival_rate"].notna() & (df["batch_size"] == df["planned_batch_size"])]
    if at.empty:
        raise Skip("latency_vs_rate.png: no study serves the plan to arriving requests")
    data = at.melt(id_vars=["model", "arrival_rate", "batch_size", "sustains"],
                   value_vars=["arrival_latency_p50_s", "arrival_latency_p99_s"], var_name="latency", value_name="latency_s")
    data["latency"] = data["latency"].map({"arrival_latency_p50_s": "p50", "arrival_latency_p99_s": "p99"})
    g = sns.relplot(data=data, x="arrival_rate", y="latency_s", hue="latency", style="latency", col="model",
                    kind="line", markers=True, facet_kws={"sharey": False, "sharex": False}, height=3.6, aspect=1.2)
    for ax, (model, part) in zip(g.axes.flat, data.groupby("model", sort=False)):
        over = part.loc[~part["sustains"].astype(bool), "arrival_rate"]
        if len(over):  # past what the plan serves: the queue grows with the stream's length
            ax.axvspan(over.min(), part["arrival_rate"].max(), color="0.9", zorder=0, label="beyond what it serves")
        ax.set_title(f"{model} (planned batch {int(part['batch_size'].iloc[0])})")
    g.set_axis_labels("requests arriving per second (Poisson)", "latency, arrival to end (s)")
    g.figure.suptitle("Latency against the request rate, the plan at its planned batch size (grey: more than it serves)",
                      y=1.03)
    return _save(g.figure, out / "latency_vs_rate.png")


def draw_all(df: pd.DataFrame, out: Path) -> tuple[list[str], list[str]]:
    """The figures drawn, and a line for each skipped (nothing to show, or drawing failed)."""
    drawn, skipped = [], []
    for fn in (tokens_vs_memory, speedup_heatmap, best_tau, plan_kinds, tokens_vs_batch, latency_vs_rate):
        try:
            drawn.append(fn(df, out))
        except Skip as why:
            skipped.append(str(why))
        except Exception as exc:  # a figure must never cost the run: the table is already written
            plt.close("all")
            skipped.append(f"{fn.__name__}: not drawn ({type(exc).__name__}: {exc})")
    return drawn, skipped
