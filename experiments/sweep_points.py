"""One hardware point of a sweep: what it is, its key, and its evaluation.

A :class:`Point` is a box (a bundled or file profile with what-if knobs), a model and a
workload (a synthetic trace), and the policies to price on it. :func:`evaluate` returns one
row per policy setting with the predicted seconds (the simulator's time: uniform settings
are column sums of the candidate table, the plan is replayed in closed form; tests hold
both equal to ``sim.replay``), tokens/s, I/O bytes, CPU tokens and hit ratio; ``plan`` is
the planner's per-layer optimum over every kind (:mod:`sim.plan`), with its kind, tau and
budget per layer, ``plan_vs_best``: the best uniform setting priced at the point over
the plan (at least 1), and ``mixing_gain``: the per-layer plan with tide layers only (the
planner before kinds mixed) over the plan. Speedups over each baseline are filled in per point.
:func:`evaluate_group` evaluates points that share a workload at once, the candidates
replayed once for all their boxes and memory limits. Points are pure functions of their
inputs, so a sweep can run them anywhere, in any order, and keep them by :meth:`Point.key`.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sim.candidates import Candidates, Priced, budget_grid, distinct_taus, price_candidates, same_tau
from sim.plan_program import solve
from sim.planner import memory, plan_budgets, table_at
from sim.serve import offline_ends
from sim.simulate import simulate
from traces.common.cli import span
from traces.common.errors import TideError
from traces.common.files import atomic_write, data_sha256
from traces.costs.cost_model import CostModel
from traces.costs.memory import MemoryBudget
from traces.costs.policy_run import replay_policy
from traces.costs.whatif import scale_profile
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Trace
from traces.formats.trace_read import read_trace
from traces.policies.labels import BASELINES, kinds_label, tau_label
from traces.policies.spec import Policy, check_policy
from traces.serving.admission import compose_trace
from traces.serving.arrivals import poisson
from traces.serving.figures import latency_figures, sustains
from traces.workloads.synthetic import synthesize

POLICY_SET = ("cpu", "static", "swap", "tide", "plan")


@dataclass(frozen=True)
class Point:
    study: str
    profile: str  # bundled name or JSON file
    model: str  # llada2-mini or llada2-flash
    gen_length: int = 256
    prompt_length: int = 64
    seed: int = 0
    pcie: float = 1.0
    cpu_cores: float = 1.0
    gpu_mem_gb: float | None = None  # None: the profile's GPU memory
    host_mem_gb: float | None = None
    policies: tuple[str, ...] = POLICY_SET
    taus: tuple[int, ...] = (1, 2, 4, 8)
    budgets: tuple[int | str, ...] = ("fit",)  # "fit": the largest uniform budget that fits
    budget_step: int = 8
    requests: int = 1  # requests of the workload (the same lengths each)
    batch_size: int = 1  # requests per forward (the runtime's continuous batching)
    arrival_rates: tuple[float, ...] = ()  # the plan also served to Poisson streams at these rates
    plan_taus: str = "all"  # the plan's tide candidates: every distinct tau ("all") or ``taus`` ("listed")

    def key(self) -> str:
        """A hash of everything the result depends on (the profile's content, not its name)."""
        d = asdict(self)
        d["profile_sha256"] = data_sha256(Profile.load(self.profile).data)
        d["tide"] = _version()
        return data_sha256(d)[:20]

    def box(self) -> Profile:
        return scale_profile(Profile.load(self.profile), self.pcie, self.cpu_cores, self.gpu_mem_gb, self.host_mem_gb)


def _version() -> str:
    try:
        return md.version("tide")
    except md.PackageNotFoundError:
        return "dev"


@functools.lru_cache(maxsize=8)
def workload(model: str, gen_length: int, prompt_length: int, seed: int, cache: str | None = None,
             requests: int = 1) -> Trace:
    """The synthetic trace of a point, made once per process (and kept in ``cache`` if given)."""
    more = f"-r{requests}" if requests > 1 else ""
    path = Path(cache) / f"{model}-g{gen_length}-p{prompt_length}-s{seed}{more}.parquet" if cache else None
    if path is not None and path.is_file():
        return read_trace(path)
    trace = synthesize(ModelShape.named(model), gen_length, prompt_length, seed, requests=requests)
    if path is not None and path.parent.is_dir():
        trace.write(path)
    return trace



def share_key(point: Point) -> tuple:
    """What points must have in common to share one replay of the candidates: the workload
    and the candidate grid (not the box, its knobs or its memory)."""
    return (point.model, point.gen_length, point.prompt_length, point.seed, point.taus, point.budgets,
            point.budget_step, point.requests, point.batch_size, point.plan_taus)


@dataclass(frozen=True)
class Group:
    """Points that share a workload and candidate grid (:func:`share_key`) and fit their boxes:
    one replay of the candidates serves them all. ``boxes`` holds one point per distinct box,
    in pricing order."""

    points: tuple[Point, ...]
    boxes: tuple[Point, ...]
    box_keys: tuple[str, ...]  # each box's profile hash
    cands: Candidates
    taus: tuple[int, ...]


def _point_trace(point: Point, cache: str | None) -> Trace:
    """The forwards the point runs: its workload, its requests composed at its batch size."""
    trace = workload(point.model, point.gen_length, point.prompt_length, point.seed, cache, point.requests)
    return compose_trace(trace, point.batch_size) if point.batch_size > 1 else trace


def _setting(point: Point, trace: Trace) -> tuple[dict, Profile, float]:
    """A point's box, its GPU memory limit, and the columns every row of it carries."""
    profile = point.box()
    gpu_gb = point.gpu_mem_gb if point.gpu_mem_gb is not None else profile.capacity("gpu_mem_bytes") / 1e9
    base = {"study": point.study, "key": point.key(), "profile": point.profile, "box": profile.name,
            "pcie": point.pcie, "cpu_cores": point.cpu_cores, "gpu_mem_gb": gpu_gb,
            "host_mem_gb": profile.capacity("host_mem_bytes") / 1e9,
            "h2d_gbps": float(profile.data["h2d"]["pinned"]["gbps"][-1]),
            "cores": profile.capacity("cpu_cores"), "model": trace.shape.name, "gen_length": point.gen_length,
            "requests": len(trace.requests), "batch_size": point.batch_size, "tokens": trace.tokens_generated, "tide": _version(), "profile_sha256": data_sha256(profile.data)}
    return base, profile, gpu_gb


def plan_group(points: list[Point], cache: str | None = None) -> tuple[dict[str, pd.DataFrame], Group | None]:
    """The rows of points whose model does not fit their box (one row saying why), and the
    group of the others with their shared candidates (every point's own budgets among them)."""
    first = points[0]
    if any(share_key(p) != share_key(first) for p in points):
        raise TideError("plan_group: the points differ in workload or candidate grid")
    trace = _point_trace(first, cache)
    out, live, own, boxes = {}, [], [], {}
    for point in points:
        base, profile, gpu_gb = _setting(point, trace)
        try:
            mem = memory([trace], profile, gpu_gb, point.batch_size, drive=False)  # the drive: drive_study
        except TideError as exc:
            out[base["key"]] = pd.DataFrame([{**base, "policy": "-", "status": str(exc)}])
            continue
        live.append(point)
        own += _budgets(point, mem)
        boxes.setdefault(base["profile_sha256"], point)
    if not live:
        return out, None
    taus = distinct_taus([trace], range(1, trace.decoding.steps + 1) if first.plan_taus == "all" else first.taus)
    cands = Candidates.grid(taus, budget_grid(trace.shape.experts, first.budget_step, own))
    return out, Group(tuple(live), tuple(boxes.values()), tuple(boxes), cands, tuple(taus))


def price_group(group: Group, cache: str | None = None, layers: Sequence[int] | None = None) -> Priced:
    """The group's candidates on ``layers`` (MoE layer indices, default all), replayed once and
    priced on each of its boxes."""
    return price_candidates(_point_trace(group.points[0], cache), [b.box() for b in group.boxes], group.cands, layers,
                            forwards=True)


def point_rows(point: Point, group: Group, priced: Priced, cache: str | None = None) -> pd.DataFrame:
    """Every policy setting of a point of ``group`` from the group's priced table (all layers,
    every box of the group)."""
    trace = _point_trace(point, cache)
    base, profile, gpu_gb = _setting(point, trace)
    mem = memory([trace], profile, gpu_gb, point.batch_size, drive=False)  # the drive: drive_study
    return _point_rows(point, trace, profile, mem, base, _budgets(point, mem), priced,
                       group.box_keys.index(base["profile_sha256"]), list(group.taus))


def evaluate(point: Point, cache: str | None = None) -> pd.DataFrame:
    """Every policy setting of ``point``: one row each (one row with a ``status`` if the
    model does not fit the box)."""
    return evaluate_group([point], cache)[point.key()]


def evaluate_group(points: list[Point], cache: str | None = None) -> dict[str, pd.DataFrame]:
    """:func:`evaluate` of points that share their workload and candidate grid (:func:`share_key`):
    the candidates are replayed once and priced on every box at once. Each point's results
    depend on its own inputs only (its program sees its own budgets), so a point gives the
    same rows alone or in any group. (The sweep runs the same three steps, the pricing split
    by layers and the points spread over its workers.)"""
    out, group = plan_group(points, cache)
    if group is not None:
        priced = price_group(group, cache)
        for point in group.points:
            out[point.key()] = point_rows(point, group, priced, cache)
    return out


def _budgets(point: Point, mem: MemoryBudget) -> list[int]:
    """The point's own candidate budgets: the program's at its memory limit and the budgets it prices."""
    return plan_budgets(mem, point.budget_step, [int(b) for b in point.budgets if b != "fit"])


def _point_rows(point: Point, trace: Trace, profile: Profile, mem: MemoryBudget, base: dict, own: list[int], priced: Priced,
                box: int, taus: list[int]) -> pd.DataFrame:
    """One point's rows: its uniform settings read off the priced table (column sums, which
    the simulator's time equals), its plan solved on its own candidates and replayed."""
    shape, cands = trace.shape, priced.cands
    L, E = shape.n_moe_layers, shape.experts
    seconds, fixed = priced.seconds[box], float(priced.fixed_s[box])
    per_f, fixed_f = priced.forward_s[box], priced.forward_fixed_s[box]  # [F, L, C], [F]
    n_req = len(trace.requests)

    def served(forward_s: np.ndarray) -> dict[str, float]:  # offline: requests/s, latency p50 and p99
        ends = offline_ends(trace, forward_s)
        return {"requests_per_s": n_req / float(np.sum(forward_s)), **latency_figures(ends)}
    b_fit = mem.largest_uniform()  # a uniform budget B fits iff B <= b_fit
    budgets = sorted({b_fit if b == "fit" else int(b) for b in point.budgets})
    rows = []

    def row(policy: str, tau: str, budget: str, s: float, t: dict[str, int], **more) -> None:
        g, c = t["gpu_tokens"], t["cpu_tokens"]
        rows.append({**base, "policy": policy, "tau": tau, "budget": budget, "seconds": s,
                     "tokens_per_s": trace.tokens_generated / s, "bytes_h2d": t["bytes_h2d"],
                     "bytes_act": t["bytes_act"], "cpu_tokens": c, "gpu_tokens": g, "migrations": t["migrations"],
                     "hit_ratio": g / (g + c) if g + c else 1.0, "status": "ok", **more})

    def uniform(policy: str, kind: str, b: int, tau: int = 0, label_tau: str = "-") -> None:
        c = cands.find(kind, b, tau)
        row(policy, label_tau, str(b), float(seconds[:, c].sum()) + fixed,
            {k: int(v[:, c].sum()) for k, v in priced.counters.items()},
            **served(per_f[:, :, c].sum(axis=1, dtype=np.float64) + fixed_f))

    def host_ok(kind: str, b: int) -> bool:
        return mem.host_need_bytes([kind] * L, [b] * L) <= mem.host_limit_bytes

    def unfit(name: str, b: int, kind: str | None = None) -> None:
        why = f"budget {b} does not fit ({b_fit} experts per layer fit)" if b > b_fit else \
            "swap needs a budget of at least 1" if name == "swap" and b < 1 else \
            f"the experts {kind or name} keeps in host memory ({mem.host_need_bytes([kind or name] * L, [b] * L) / 1e9:.0f} " \
            f"GB) do not fit its {mem.host_limit_bytes / 1e9:.0f} GB"
        rows.append({**base, "policy": name, "tau": "-", "budget": str(b), "status": why})

    for name in point.policies:
        if name == "cpu":
            if host_ok("cpu", 0):
                uniform("cpu", "cpu", 0)
            else:
                unfit("cpu", 0)
        elif name == "all":
            if b_fit == E:
                uniform("all", "static", E)
            else:
                unfit("all", E)
        elif name in ("static", "swap"):
            for b in budgets:
                if (1 if name == "swap" else 0) <= b <= b_fit and host_ok(name, b):
                    uniform(name, name, b)
                else:
                    unfit(name, b)
        elif name == "tide":
            for b in budgets:
                if b > b_fit or not host_ok("tide", b):
                    unfit(name, b)
                    continue
                for tau in point.taus:
                    label = Policy.make("tide", L, E, budget=b, tau=tau).label
                    uniform(label, "tide", b, same_tau([trace], taus, tau), str(tau))
        elif name == "plan":
            table = table_at(priced, box, mem, profile, own)
            sol = solve(table)
            tide_only = solve(table, kinds=["tide"])  # the per-layer program before kinds mixed (tide and cpu)
            rep = replay_policy(trace, sol.policy(E), cost=CostModel(profile, shape, trace.dtype))
            plan_cols = dict(kinds=kinds_label(sol.kind), plan_kind=" ".join(sol.kind), plan_tau=" ".join(map(str, sol.tau)),
                             plan_budget=" ".join(map(str, sol.budget)))
            row("plan", tau_label(sol.kind, sol.tau), span(sol.budget), rep.seconds(), rep.totals(), **plan_cols,
                program_s=sol.seconds + fixed, tide_only_s=tide_only.seconds + fixed, solve_s=sol.solve_s,
                **served(rep.times["layer_s"].sum(axis=1) + rep.times["fixed_s"]))

        else:
            check_policy(name, "--policies")
    return _frame(rows, b_fit)


def _frame(rows: list[dict], b_fit: int) -> pd.DataFrame:
    """A point's rows as a table, with each row's speedup over the baselines (at the largest
    uniform budget that fits) and the plan's margin over the best uniform setting."""
    cols = dict.fromkeys(k for r in rows for k in r)  # every row's columns (unfit rows have no seconds)
    df = pd.DataFrame(rows).reindex(columns=list(dict.fromkeys([*cols, "seconds", "tokens_per_s"])))
    ref = {}
    for b in BASELINES:  # baselines at the largest uniform budget that fits
        hit = df[(df["policy"] == b) & (df["budget"].isin(["0", str(b_fit)])) & (df["status"] == "ok")]
        ref[b] = float(hit["seconds"].iloc[0]) if len(hit) else np.nan
    for b in BASELINES:
        df[f"speedup_vs_{b}"] = ref[b] / df["seconds"]
    is_plan = df["policy"] == "plan"
    if is_plan.any():  # the best uniform setting priced here over the plan: at least 1 when the plan is optimal
        plan_s = df.loc[is_plan, "seconds"].iloc[0]
        df["plan_vs_best"] = np.where(is_plan, df.loc[~is_plan, "seconds"].min() / plan_s, np.nan)
        df["mixing_gain"] = np.where(is_plan, df.loc[is_plan, "tide_only_s"].iloc[0] / plan_s, np.nan)
    return df


def save(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def served_at_rates(point: Point, plan_row: pd.Series, cache: str | None = None) -> pd.DataFrame:
    """The point's plan (as its row records it: kind, tau and budget per layer) served to a
    Poisson stream of the workload's requests at each of ``point.arrival_rates``, at the
    point's batch size: one row each, with the p50 and p99 latency and whether the plan
    serves that rate at all (its offline requests/s at least the rate)."""
    trace = _point_trace(point, cache)
    shape = trace.shape
    policy = Policy.make("plan", shape.n_moe_layers, shape.experts, budget=[int(v) for v in plan_row["plan_budget"].split()],
                         tau=[int(v) for v in plan_row["plan_tau"].split()], kind=plan_row["plan_kind"].split())
    profile, n = point.box(), len(trace.requests)
    rows = []
    for rate in point.arrival_rates:
        res = simulate(trace, profile, policy, batch_size=point.batch_size, arrivals=poisson(rate, n, point.seed))
        rows.append({**{k: plan_row[k] for k in plan_row.index if not k.startswith(("arrival", "sustains"))},
                     "arrival_rate": rate, **latency_figures(res.requests["latency_s"], "arrival_latency"),
                     "sustains": sustains(plan_row["requests_per_s"], rate)})
    return pd.DataFrame(rows)
