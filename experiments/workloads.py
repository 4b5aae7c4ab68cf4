"""The calibrated synthetic workloads of LLaDA2.0-mini and -flash, and how they compare
with the published figures.

``python -m experiments.workloads [--out DIR] [--models llada2-mini,llada2-flash]``
generates, per model, a 1024-token trace (prompt 64) with and without the KV cache,
summarises each (``traces.stats``), checks the calibration targets, and writes:

* ``DIR/<model>-kv.parquet``, ``DIR/<model>-nokv.parquet``: the traces;
* ``DIR/calibration.parquet``: one row per model and target (value, range, ok);
* ``DIR/stats.json``: every statistic;
* ``DIR/workloads.png``: temporal stability and TIDE's hit ratio, per model.

It exits 1 if a target is missed.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from traces.common import checks
from traces.common.cli import ArgumentParser, integer, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path, write_json
from traces.common.values import need_int
from traces.formats.shapes import ModelShape
from traces.workloads.statistics import summarize
from traces.workloads.synthetic import calibration_checks, synthesize


def run(out: Path, models: list[str], gen_length: int = 1024, prompt_length: int = 64, seed: int = 0) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    rows, stats = [], {}
    for m in models:
        shape = ModelShape.named(m)
        per = {}
        for kv in (True, False):
            t0 = time.perf_counter()
            trace = synthesize(shape, gen_length, prompt_length, seed, kv_cache=kv, progress=True)
            t_gen = time.perf_counter() - t0
            trace.write(out / f"{shape.name}-{'kv' if kv else 'nokv'}.parquet")
            t0 = time.perf_counter()
            s = summarize(trace, progress=True)
            s["seconds_generate"], s["seconds_summarize"] = t_gen, time.perf_counter() - t0
            per[kv] = s
            stats[f"{shape.name}-{'kv' if kv else 'nokv'}"] = s
        for r in calibration_checks(per[True], per[False]):
            rows.append({"model": shape.name, **r})
    table = pd.DataFrame(rows)
    atomic_write(out / "calibration.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    write_json(out / "stats.json", stats)
    plot(stats, out / "workloads.png")
    return table


def plot(stats: dict, path: Path) -> None:
    """Cosine similarity against step gap (KV cache) and hit ratio against tau."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cos = pd.DataFrame([{"trace": k, "gap": int(g), "cosine": v} for k, s in stats.items() if s["kv_cache"]
                        for g, v in s["cosine_gap"].items() if v is not None])
    hit = pd.DataFrame([{"trace": k, "budget": int(b), "tau": int(t), "hit_ratio": v} for k, s in stats.items()
                        for b, row in s["tide_hit_ratio"].items() for t, v in row.items()])
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=cos, x="gap", y="cosine", hue="trace", marker="o", ax=ax[0])
    ax[0].set_title("Routing stability within a block (KV cache)")
    ax[0].set_xlabel("denoising steps apart")
    sns.lineplot(data=hit, x="tau", y="hit_ratio", hue="budget", style="trace", marker="o", palette="viridis", ax=ax[1])
    ax[1].set_title("TIDE hit ratio against tau, per GPU budget")
    ax[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.workloads", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/workloads")
    ap.add_argument("--models", default="llada2-mini,llada2-flash")
    ap.add_argument("--gen-length", type=integer, default=1024)
    ap.add_argument("--prompt-length", type=integer, default=64)
    ap.add_argument("--seed", type=checks.seed, default=0)
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models:
        raise TideError("--models: name at least one model")
    for m in models:
        ModelShape.named(m)
    need_int(a.gen_length, "--gen-length", lo=1, hi=1 << 20)
    need_int(a.prompt_length, "--prompt-length", lo=1, hi=1 << 20)
    check_out_path(a.out, folder=True)
    t0 = time.perf_counter()
    table = run(Path(a.out), models, a.gen_length, a.prompt_length, a.seed)
    with pd.option_context("display.width", 120, "display.max_colwidth", 60):
        print(table.assign(value=table["value"].round(4)).to_string(index=False))
    print(f"\n{'all targets met' if table['ok'].all() else 'SOME TARGETS MISSED'}; "
          f"results in {a.out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if table["ok"].all() else 1


if __name__ == "__main__":
    run_cli(main)
