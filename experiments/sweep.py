"""Hardware sweeps: which box, how much memory, which link, how many cores, which policy and tau.

``python -m experiments.sweep [--out DIR] [--quick] [--grid FILE.toml] [grid options]
[--executor local|dask] [--scheduler ADDRESS] [--jobs N]``

With no arguments it runs the default study on bundled data (about a minute on 2 cores): LLaDA2.0-mini and -flash, 256 generated tokens (synthetic traces, cached in
``DIR/traces``), on

* ``memory``: the a100-40gb box with 8, 16, 24, 32 and 40 GB of GPU memory;
* ``link_cores``: the same box at 16 GB with PCIe x0.5, x1, x2 and CPU cores x0.25 .. x2;
* ``boxes``: the bundled h200, a100-40gb and rtx4090 boxes as they are;

pricing ``cpu``, ``static``, ``swap``, ``tide`` (tau 1, 2, 4, 8) at the largest uniform
budget that fits, and the planner's per-layer optimum over every kind (``plan``), at every point.
``--quick`` runs a tiny grid (mini, 64 tokens, four points) in well under a minute.

Grid options replace the default with one study: ``--profiles``, ``--models``,
``--gen-lengths``, ``--pcie``, ``--cpu-cores``, ``--gpu-mem-gb``, ``--host-mem-gb``,
``--policies``, ``--taus``, ``--budgets`` (comma-separated; ``fit`` = the largest uniform
budget that fits). ``--grid FILE.toml`` holds studies: top-level keys are defaults, each
``[[study]]`` table (with a ``name``) a grid of its own, with the same names (underscores).

Every point is keyed by a hash of its inputs and written to ``DIR/points/KEY.parquet`` when
done (atomically), so an interrupted sweep resumes where it stopped. Results:
``DIR/sweep.parquet`` (a row per point and policy setting), figures
``DIR/tokens_vs_memory.png``, ``DIR/speedup_heatmap.png``, ``DIR/best_tau.png``,
``DIR/plan_kinds.png``, and a short table on stdout. Points that share a workload are
evaluated together: the planner's candidates (every kind, tau and budget of every layer)
are replayed once and priced on all their boxes and memory limits. ``--executor dask`` sends points to a Dask cluster (``--scheduler
ADDRESS``; without one, a local Dask cluster of ``--jobs`` workers).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from experiments.sweep_points import (
    POLICY_SET,
    Group,
    Point,
    plan_group,
    point_rows,
    price_group,
    save,
    served_at_rates,
    share_key,
)
from sim.candidates import Priced

#: How long to wait for a Dask scheduler to answer before saying it does not.
DASK_CONNECT_TIMEOUT = "10s"
from traces.common.checks import check_batch_size, check_seed
from traces.common.cli import ArgumentParser, comma_list, integer, number, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path
from traces.common.pool import worker_pool
from traces.common.values import need_float, need_int, need_ints, need_list, need_numbers, need_str
from traces.formats.shapes import ModelShape
from traces.policies.labels import BASELINES, display_name
from traces.policies.spec import check_policy


@dataclass
class Study:
    """A grid: every combination of its axes is a point."""

    name: str
    profiles: list[str] = field(default_factory=lambda: ["a100-40gb"])
    models: list[str] = field(default_factory=lambda: ["llada2-mini", "llada2-flash"])
    gen_lengths: list[int] = field(default_factory=lambda: [256])
    pcie: list[float] = field(default_factory=lambda: [1.0])
    cpu_cores: list[float] = field(default_factory=lambda: [1.0])
    gpu_mem_gb: list[float | None] = field(default_factory=lambda: [None])
    host_mem_gb: list[float | None] = field(default_factory=lambda: [None])
    policies: list[str] = field(default_factory=lambda: list(POLICY_SET))
    taus: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    budgets: list[int | str] = field(default_factory=lambda: ["fit"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    arrival_rates: list[float] = field(default_factory=list)
    requests: int = 1
    prompt_length: int = 64
    seed: int = 0
    budget_step: int = 8
    plan_taus: str = "all"

    def check(self, where: Callable[[str], str]) -> "Study":
        """Every axis of its type and range, before anything is made: ``where(field)`` names
        the field as the user wrote it (a flag, or a key of a grid file's study)."""
        from traces.formats.profile_file import Profile
        strs = lambda k: [need_str(v, f"{where(k)}[{i}]") for i, v in enumerate(need_list(getattr(self, k), where(k), True))]  # noqa: E731
        need_str(self.name, where("name"))
        self.profiles, self.models, self.policies = strs("profiles"), strs("models"), strs("policies")
        self.gen_lengths = need_ints(self.gen_lengths, where("gen_lengths"), lo=1, hi=1 << 20)
        self.taus = need_ints(self.taus, where("taus"), lo=1)
        self.batch_sizes = [check_batch_size(v, f"{where('batch_sizes')}[{i}]")
                            for i, v in enumerate(need_list(self.batch_sizes, where("batch_sizes"), True))]
        self.arrival_rates = [need_float(v, f"{where('arrival_rates')}[{i}]", positive=True)
                              for i, v in enumerate(need_list(self.arrival_rates, where("arrival_rates")))]
        self.requests = need_int(self.requests, where("requests"), lo=1, hi=1 << 12)
        self.budget_step = need_int(self.budget_step, where("budget_step"), lo=1)
        self.plan_taus = need_str(self.plan_taus, where("plan_taus"), ("all", "listed"))
        self.pcie = need_numbers(self.pcie, where("pcie"), positive=True)
        self.cpu_cores = need_numbers(self.cpu_cores, where("cpu_cores"), positive=True)
        for k in ("gpu_mem_gb", "host_mem_gb"):
            setattr(self, k, [None if v is None else need_float(v, f"{where(k)}[{i}]", positive=True)
                              for i, v in enumerate(need_list(getattr(self, k), where(k), True))])
        self.budgets = [v if v == "fit" else need_int(v, f"{where('budgets')}[{i}] (an integer or fit)", lo=0)
                        for i, v in enumerate(need_list(self.budgets, where("budgets"), True))]
        self.prompt_length = need_int(self.prompt_length, where("prompt_length"), lo=1, hi=1 << 20)
        self.seed = check_seed(self.seed, where("seed"))
        for x in self.policies:
            check_policy(x, where("policies"))
        for p in self.profiles:
            try:
                Profile.load(p)
            except TideError as exc:
                raise TideError(f"{where('profiles')}: {exc}") from None
        for m in self.models:
            try:
                E = ModelShape.named(m).experts
            except TideError as exc:
                raise TideError(f"{where('models')}: {exc}") from None
            over = [b for b in self.budgets if b != "fit" and b > E]
            if over:
                raise TideError(f"{where('budgets')}: {over[0]} exceeds {m}'s {E} experts per layer")
        return self

    def points(self) -> list[Point]:
        return [Point(study=self.name, profile=p, model=m, gen_length=g, prompt_length=self.prompt_length,
                      seed=self.seed, pcie=x, cpu_cores=c, gpu_mem_gb=gm, host_mem_gb=hm,
                      policies=tuple(self.policies), taus=tuple(self.taus), budgets=tuple(self.budgets),
                      budget_step=self.budget_step, requests=self.requests, batch_size=b,
                      arrival_rates=tuple(self.arrival_rates), plan_taus=self.plan_taus)
                for p, m, g, x, c, gm, hm, b in itertools.product(
                    self.profiles, self.models, self.gen_lengths, self.pcie, self.cpu_cores, self.gpu_mem_gb,
                    self.host_mem_gb, self.batch_sizes)]


DEFAULT = [
    Study("memory", gpu_mem_gb=[8, 16, 24, 32, 40]),
    Study("link_cores", gpu_mem_gb=[16], pcie=[0.5, 1.0, 2.0], cpu_cores=[0.25, 0.5, 1.0, 2.0]),
    Study("boxes", profiles=["h200", "a100-40gb", "rtx4090"]),
    # batches: 8 requests of 32 tokens (one block each), 1 to 8 at a time; the plan's tide candidates at the
    # listed taus and budgets in steps of 32 (a smaller program, so the study stays quick)
    Study("batch", gpu_mem_gb=[16], gen_lengths=[32], requests=8, batch_sizes=[1, 2, 4, 8], taus=[1, 4],
          budget_step=32, plan_taus="listed", arrival_rates=[0.05, 0.1, 0.2, 0.4]),
]
QUICK = [Study("quick", models=["llada2-mini"], gen_lengths=[64], gpu_mem_gb=[8, 16], pcie=[1.0, 2.0], taus=[1, 4])]
_LIST_FIELDS = [f.name for f in fields(Study) if f.name not in ("name", "prompt_length", "seed", "requests",
                                                                  "budget_step", "plan_taus")]


def studies_from_toml(path: str) -> list[Study]:
    """``[[study]]`` tables (top-level keys are their defaults)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise TideError(f"--grid {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TideError(f"--grid {path}: not valid TOML ({exc})") from None
    tables = data.pop("study", None)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise TideError(f"--grid {path}: needs at least one [[study]] table")
    out = []
    for i, t in enumerate(tables):
        merged = {**data, **t}
        merged.setdefault("name", f"study{i}")
        unknown = set(merged) - {f.name for f in fields(Study)}
        if unknown:
            raise TideError(f"--grid {path}: unknown key(s) {', '.join(sorted(unknown))} in study {merged['name']!r}")
        for k in _LIST_FIELDS:
            if k in merged and not isinstance(merged[k], list):
                merged[k] = [merged[k]]
        name = merged["name"]
        out.append(Study(**merged).check(lambda k: f"--grid {path}: study {name!r}: {k}"))
    return out


def _list(text: str, flag: str, kind: type) -> list[Any]:
    """A comma list of a flag; each value's range is checked by :meth:`Study.check`."""
    return comma_list(text, flag, lambda v: v if kind is str else (v if v == "fit" and flag == "--budgets" else kind(v)),
                      f"{'integer' if kind is integer else 'number'} values")


# ---- running points ------------------------------------------------------------------------
def _price(args: tuple[int, Group, str, np.ndarray]) -> tuple[int, np.ndarray, Priced]:
    g, group, cache, layers = args
    return g, layers, price_group(group, cache, layers)


def _rows(args: tuple[Point, Group, Priced, str]) -> tuple[str, pd.DataFrame]:
    point, group, priced, cache = args
    return point.key(), point_rows(point, group, priced, cache)


def groups(todo: list[Point]) -> list[list[Point]]:
    """Points that share a workload and candidate grid (one replay prices them all), the
    largest first (the longest tasks start first)."""
    by: dict[tuple, list[Point]] = {}
    for p in todo:
        by.setdefault(share_key(p), []).append(p)
    return sorted(by.values(), key=lambda g: len(g) * ModelShape.named(g[0].model).n_moe_layers, reverse=True)


@contextlib.contextmanager
def _executor(client, jobs: int) -> Iterator[Callable[[Callable, list], Iterable]]:
    """``map(fn, tasks)`` yielding results as they finish: on a Dask cluster, on ``jobs``
    spawned workers, or here (one job)."""
    if client is not None:
        from distributed import as_completed
        yield lambda fn, tasks: (f.result() for f in as_completed(client.map(fn, tasks, pure=False)))
    elif jobs <= 1:
        yield map
    else:
        with worker_pool(jobs) as pool:
            yield pool.imap_unordered


def run_points(points: Iterable[Point], out: Path, executor: str = "local", jobs: int | None = None,
               scheduler: str | None = None, progress: bool = True) -> dict[str, int]:
    """Evaluate the points not yet in ``out/points`` and store each as it finishes: points
    sharing a workload form a group whose candidates are replayed once (split by layers when
    there are fewer groups than workers), then every point's rows are made from its group's
    prices, spread over the workers."""
    points = list(points)
    keys = [p.key() for p in points]
    pdir = out / "points"
    todo = [(p, k) for p, k in zip(points, keys) if not (pdir / f"{k}.parquet").is_file()]
    todo = list({k: (p, k) for p, k in todo}.values())  # the same point twice: once
    stats = {"points": len(set(keys)), "reused": len(set(keys)) - len(todo), "evaluated": 0}
    cache = str(out / "traces")
    client = cluster = None
    if executor == "dask":  # connect first: a scheduler that does not answer is an error before any progress bar
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise TideError("--executor dask needs dask.distributed: pip install 'dask[distributed]'") from None
        if scheduler:
            try:
                client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise TideError(f"--scheduler {scheduler}: no Dask scheduler answered ({why})") from None
        else:
            cluster = LocalCluster(n_workers=jobs or 2, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
    elif executor != "local":
        raise TideError(f"--executor: expected local or dask, got {executor!r}")
    pdir.mkdir(parents=True, exist_ok=True)  # everything was checked before: nothing is made for a bad grid
    (out / "traces").mkdir(exist_ok=True)
    workers = len(client.scheduler_info()["workers"]) if client is not None else (jobs or os.cpu_count() or 1)
    try:
        with tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress) as bar:  # closed before errors print
            def done(k: str, df: pd.DataFrame) -> None:
                save(df, pdir / f"{k}.parquet")
                stats["evaluated"] += 1
                bar.update()

            made = []
            for g in groups([p for p, _ in todo]):
                unfit, group = plan_group(g, cache)
                for k, df in unfit.items():
                    done(k, df)
                if group is not None:
                    made.append(group)
            if not made:
                return stats
            # enough pricing tasks to keep every worker busy, each group split by its work
            # (forwards x candidates x layers) so that the largest does not run alone at the end
            work = [_pricing_work(grp, cache) for grp in made]
            tasks = [(g, grp, cache, c) for g, grp in enumerate(made)
                     for c in _layer_chunks(grp, max(1, round(4 * workers * work[g] / sum(work))))]
            with _executor(client, 1 if jobs == 1 else min(workers, len(todo))) as run:
                parts: dict[int, list[tuple[np.ndarray, Priced]]] = {g: [] for g in range(len(made))}
                for g, layers, priced in run(_price, tasks):
                    parts[g].append((layers, priced))
                rows = [(p, grp, _joined(parts[g]), cache) for g, grp in enumerate(made) for p in grp.points]
                for k, df in run(_rows, rows):
                    done(k, df)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return stats


def _pricing_work(group: Group, cache: str) -> float:
    from experiments.sweep_points import _point_trace
    trace = _point_trace(group.points[0], cache)
    return float(trace.n_batched * len(group.cands) * trace.shape.n_moe_layers * len(group.boxes))


def _layer_chunks(group: Group, n: int) -> list[np.ndarray]:
    L = ModelShape.named(group.points[0].model).n_moe_layers
    return np.array_split(np.arange(L), min(n, L))


def _joined(parts: list[tuple[np.ndarray, Priced]]) -> Priced:
    """A group's prices from its layer chunks (finished in any order), in layer order."""
    return Priced.concat([p for _, p in sorted(parts, key=lambda lp: int(lp[0][0]))])


def collect(points: Iterable[Point], out: Path) -> pd.DataFrame:
    """The stored rows of ``points``, in the points' order."""
    seen, frames = set(), []
    for p in points:
        k = p.key()
        if k not in seen:
            seen.add(k)
            frames.append(pd.read_parquet(out / "points" / f"{k}.parquet"))
    return pd.concat(frames, ignore_index=True)


def sweep(studies: list[Study], out: Path, executor: str = "local", jobs: int | None = None,
          scheduler: str | None = None, progress: bool = True, figures: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
    """Run the studies (resuming), write ``sweep.parquet`` and the figures; the table and counts."""
    points = [p for s in studies for p in s.points()]
    if not points:
        raise TideError("the grid has no points")
    t0 = time.perf_counter()
    stats = run_points(points, out, executor, jobs, scheduler, progress)
    stats["wall_s"] = time.perf_counter() - t0
    df = planned_batch(collect(points, out))
    df = serve_planned(df, points, out, progress)
    atomic_write(out / "sweep.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    if figures:
        from experiments.sweep_figures import draw_all
        stats["figures"], stats["skipped_figures"] = draw_all(df, out)
    return df, stats


#: What a point is, less its batch size: points equal in these differ only in how they batch.
SETTING = ("study", "profile", "pcie", "cpu_cores", "gpu_mem_gb", "host_mem_gb", "model", "gen_length", "requests")


def planned_batch(df: pd.DataFrame) -> pd.DataFrame:
    """``planned_batch_size``: per setting (:data:`SETTING`), the batch size whose plan has the
    most tokens/s offline (what ``sim.plan --batch-sizes`` chooses without a latency bound)."""
    plan = df[(df["policy"] == "plan") & df["tokens_per_s"].notna()] if "tokens_per_s" in df else df.iloc[:0]
    if plan.empty:
        return df.assign(planned_batch_size=np.nan)
    keys = [k for k in SETTING if k in df]
    best = plan.loc[plan.groupby(keys, dropna=False)["tokens_per_s"].idxmax(), [*keys, "batch_size"]]
    return df.merge(best.rename(columns={"batch_size": "planned_batch_size"}), on=keys, how="left")


def serve_planned(df: pd.DataFrame, points: list[Point], out: Path, progress: bool = True) -> pd.DataFrame:
    """For each point with arrival rates at its setting's planned batch size, its plan served
    to streams at those rates (rows with ``arrival_rate``, :func:`served_at_rates`), added
    to the table."""
    todo = []
    for p in points:
        if not p.arrival_rates:
            continue
        mine = df[(df["key"] == p.key()) & (df["policy"] == "plan") & df["tokens_per_s"].notna()] \
            if "tokens_per_s" in df else df.iloc[:0]
        if len(mine) and mine["batch_size"].iloc[0] == mine["planned_batch_size"].iloc[0]:
            todo.append((p, mine.iloc[0]))
    if not todo:
        return df
    extra = [served_at_rates(p, row, str(out / "traces")) for p, row in tqdm(
        todo, desc="serving the planned batch size", unit="point", disable=not progress)]
    return pd.concat([df, *extra], ignore_index=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per study and model: points, the plan's tokens/s range, its median speedup over each
    baseline, the least ``plan_vs_best`` (at least 1: no uniform setting beat the plan) and
    the most that mixing kinds gained over a tide-only plan."""
    ok = df[(df["policy"] == "plan") & df["tokens_per_s"].notna()] if "tokens_per_s" in df else df.iloc[:0]
    if "arrival_rate" in ok:
        ok = ok[ok["arrival_rate"].isna()]  # offline rows only
    if ok.empty:
        return pd.DataFrame()
    g = ok.groupby(["study", "model"], sort=False)
    table = g.agg(points=("key", "nunique"), plan_tok_s_min=("tokens_per_s", "min"),
                  plan_tok_s_max=("tokens_per_s", "max"),
                  **{f"x_{display_name(b)}": (f"speedup_vs_{b}", "median") for b in BASELINES},
                  vs_best_min=("plan_vs_best", "min"), mixing_max=("mixing_gain", "max"),
                  planned_batch=("planned_batch_size", "max"))
    skipped = df[df["policy"] == "-"].groupby(["study", "model"], sort=False)["key"].nunique()
    table["unfit"] = skipped.reindex(table.index).fillna(0).astype(int)
    return table.reset_index()


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/sweep", help="results folder (resumes what it holds)")
    ap.add_argument("--quick", action="store_true", help="a tiny grid, well under a minute")
    ap.add_argument("--grid", default=None, help="TOML file of [[study]] grids")
    for name, help_ in (("profiles", "bundled names or profile JSON files"), ("models", "llada2-mini, llada2-flash"),
                        ("gen-lengths", "tokens generated per trace"), ("pcie", "PCIe bandwidth scalings"),
                        ("cpu-cores", "CPU core scalings"), ("gpu-mem-gb", "GPU memory limits"),
                        ("host-mem-gb", "host memory sizes"), ("policies", "cpu, static, swap, tide, plan, all"),
                        ("taus", "tide refresh intervals"), ("budgets", "GPU experts per layer, or fit"),
                        ("batch-sizes", "requests per forward"), ("arrival-rates", "requests/s arriving (the plan served)")):
        ap.add_argument(f"--{name}", default=None, help=f"comma-separated {help_}")
    ap.add_argument("--requests", type=integer, default=None, help="requests of each workload (default 1)")
    ap.add_argument("--executor", default="local", help="local (worker processes) or dask")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler address (default: a local Dask cluster)")
    ap.add_argument("--jobs", type=integer, default=None, help="worker processes (default: every core)")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    if a.jobs is not None and a.jobs < 1:
        raise TideError(f"--jobs must be at least 1, got {a.jobs}")
    if a.scheduler and a.executor != "dask":
        raise TideError("--scheduler needs --executor dask")
    kinds = {"profiles": str, "models": str, "gen_lengths": integer, "pcie": number, "cpu_cores": number,
             "gpu_mem_gb": number, "host_mem_gb": number, "policies": str, "taus": integer, "budgets": integer,
             "batch_sizes": integer, "arrival_rates": number}
    given = {k: _list(getattr(a, k), f"--{k.replace('_', '-')}", t) for k, t in kinds.items() if getattr(a, k) is not None}
    if a.requests is not None:
        given["requests"] = a.requests
    if a.grid and (given or a.quick):
        raise TideError("--grid holds the whole grid: drop --quick and the grid options")
    if a.grid:
        studies = studies_from_toml(a.grid)
    elif given:
        studies = [replace(QUICK[0], **given)] if a.quick else [Study("custom", **given)]
    else:
        studies = QUICK if a.quick else DEFAULT
    for st in studies:
        st.check(lambda k: f"--{k.replace('_', '-')}")
    out = check_out_path(a.out, "--out", folder=True)
    df, stats = sweep(studies, out, a.executor, a.jobs, a.scheduler, figures=not a.no_figures)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary(df).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"{stats['points']} points ({stats['evaluated']} evaluated, {stats['reused']} reused) in "
          f"{stats['wall_s']:.0f} s; {len(df)} rows in {out / 'sweep.parquet'}"
          + (f"; figures: {', '.join(stats['figures'])}" if stats.get("figures") else ""))
    for why in stats.get("skipped_figures", []):
        print(f"note: {why}")
    return 0


if __name__ == "__main__":
    run_cli(main)
