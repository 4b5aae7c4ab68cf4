"""The drive study: which boxes people own hold LLaDA2.0 with experts on the drive, and how fast.

``python -m experiments.drive_study [--out DIR] [--quick] [--jobs N]``

LLaDA2.0-mini and -flash (synthetic traces: 4 requests of 64 tokens, 32-token prompts) on the
RTX 4090 box (24 GB GPU, 22 GB of it planned) with 64 and 128 GB of host memory (the bundled
``rtx4090-64gb`` and ``rtx4090``) and a PCIe gen4 and a gen5 NVMe drive (datasheets:
:data:`traces.costs.boxes.DRIVES`), at 1 and 4 requests per forward. At each point the
planner (:func:`sim.planner.make_plan`) chooses every layer's kind, GPU budget, tau and
host budget; beside the plan, the baselines with a host cache evicting the least recently
used expert (``static+lru``: what mapping the checkpoint gives people today). Writes
``DIR/drive.parquet`` (a row per point and policy: tokens/s, p50/p99 latency of the
requests offline, GB read from the drive per forward) and ``DIR/drive.png``, and prints the
table. Not in the default sweep (each flash point plans for tens of seconds); ``--quick``
runs mini only.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from sim.planner import make_plan
from sim.simulate import simulate
from traces.common.cli import ArgumentParser, integer, run_cli
from traces.common.files import atomic_write, check_out_path
from traces.costs.whatif import scale_profile
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

BOXES = {"64 GB": "rtx4090-64gb", "128 GB": "rtx4090"}
DRIVES = ("gen4", "gen5")
MODELS = ("llada2-mini", "llada2-flash")
BATCHES = (1, 4)
GPU_MEM_GB = 22


def point(model: str, ram: str, drive: str, batch: int, jobs: int | None) -> list[dict]:
    """One box, model and batch size: the plan and the lru baselines, simulated."""
    shape = ModelShape.named(model)
    trace = synthesize(shape, 64, 32, seed=0, requests=4)
    box = scale_profile(Profile.load(BOXES[ram]), drive=drive)
    plan, frame = make_plan([trace], box, GPU_MEM_GB, budget_step=32, jobs=jobs, progress=False, batch_size=batch)
    rows = []
    for name, seconds in zip(frame["policy"], frame["seconds"]):
        rows.append({"model": model, "ram": ram, "drive": drive, "batch_size": batch, "policy": name,
                     "seconds": float(seconds), "tokens_per_s": trace.tokens_generated / float(seconds),
                     "host_budget": _span(plan.host["budget"]) if name == "plan" and plan.host else "-"})
    # latency and drive traffic of the plan and of static+lru, served at the batch size
    for row in rows:
        if row["policy"] not in ("plan", "static+lru"):
            continue
        pol = Policy.from_plan(plan, shape) if row["policy"] == "plan" else _baseline(box, trace, batch, row["policy"])
        res = simulate(trace, box, pol, batch_size=batch)
        s = res.summary()
        row.update(latency_p50_s=s["latency_s_p50"], latency_p99_s=s["latency_s_p99"],
                   drive_gb_per_forward=s["drive_gb_per_forward"])
    return rows


def _baseline(box: Profile, trace, batch: int, name: str) -> Policy:
    from sim.planner import host_baselines, memory
    from traces.policies.labels import baselines
    mem = memory([trace], box, GPU_MEM_GB, batch)
    base = host_baselines(mem, box, baselines(trace.shape.n_moe_layers, trace.shape.experts, mem.largest_uniform()))
    return base[name]


def _span(v: list[int]) -> str:
    return f"{min(v)}-{max(v)}" if min(v) != max(v) else str(v[0])


def figure(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import seaborn as sns
    d = df[df["policy"].isin(["plan", "static+lru"])].assign(box=lambda x: x["ram"] + " RAM, " + x["drive"])
    g = sns.catplot(data=d, x="box", y="tokens_per_s", hue="policy", col="model", row="batch_size", kind="bar",
                    sharey=False, height=3, aspect=1.6)
    g.set_axis_labels("", "tokens/s")
    g.figure.suptitle("LLaDA2.0 on an RTX 4090 box, experts read from the drive", y=1.02)
    atomic_write(path, lambda tmp: g.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.drive_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/drive")
    ap.add_argument("--quick", action="store_true", help="mini only")
    ap.add_argument("--jobs", type=integer, default=None, help="processes pricing candidates (default: every core)")
    ap.add_argument("--no-figure", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    check_out_path(out / "drive.parquet")
    models = MODELS[:1] if a.quick else MODELS
    grid = list(itertools.product(models, BOXES, DRIVES, BATCHES))
    rows = []
    for model, ram, drive, batch in tqdm(grid, desc="drive study", unit="point"):
        rows += point(model, ram, drive, batch, a.jobs)
    df = pd.DataFrame(rows)
    atomic_write(out / "drive.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    if not a.no_figure:
        figure(df, out / "drive.png")
    show = df[df["policy"].isin(["plan", "static+lru"])].pivot_table(
        index=["model", "batch_size", "ram", "drive"], columns="policy", values="tokens_per_s").reset_index()
    show["plan_over_lru"] = show["plan"] / show["static+lru"]
    lat = df[df["policy"] == "plan"].set_index(["model", "batch_size", "ram", "drive"])
    show = show.join(lat[["latency_p50_s", "latency_p99_s", "drive_gb_per_forward", "host_budget"]],
                     on=["model", "batch_size", "ram", "drive"])
    print(show.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {out / 'drive.parquet'}" + ("" if a.no_figure else f" and {out / 'drive.png'}"))
    return 0


if __name__ == "__main__":
    run_cli(main)

