"""Hardware profiles: what one GPU-CPU box can do, measured or derived, as validated JSON.

Format ``tide-profile`` version 2 (all times in seconds, bandwidths in GB/s = 1e9 B/s,
memory in bytes). Every value says whether it was ``measured`` on the box or ``derived``
from public specifications: scalars as ``{"value": v, "source": s}``, tables with a
``source`` that is one string or a nested list of strings shaped like the values.

* ``fast_device``: ``cuda``, or ``cpu`` when the "fast device" is the CPU itself (tests,
  boxes without a GPU): then fast-device and CPU work share the same cores.
* ``capacities``: ``gpu_mem_bytes``, ``host_mem_bytes``, ``cpu_cores``,
  ``host_mem_bw_gbps``, ``gpu_mem_bw_gbps``.
* ``overheads``: ``launch_s`` (one kernel launch from eager PyTorch), ``sync_s`` (per MoE
  layer: the routing reaching the host), ``cpu_task_s`` (dispatching one expert on the CPU).
* ``host``: what the engine's host thread spends, measured with the engine's own code
  (:mod:`runtime.profile`): per forward ``forward_s`` (the decoding loop's own work:
  embedding, rotary tables, the engine's begin and end, acceptance); per MoE layer-forward ``decide_s`` (the policy's decision),
  ``refresh_s`` (a decision that re-places the layer: tide's refresh), ``swap_s`` plus
  ``swap_wave_s`` per wave (swap's decision grows with its waves; ``swap_wave_s`` is optional:
  without it ``swap_s`` is the whole decision), ``issue_s`` (sorting tokens, gathers, combining, bookkeeping); per expert
  ``copy_call_s`` (issuing one expert's copy, beyond moving its bytes), ``expert_call_s``
  (issuing one resident expert's kernels: 0 when the fast device is the CPU, whose grouped
  table is already host time) and ``miss_call_s`` (sending one missed expert's tokens to the
  CPU path); optional, per further request of a batched forward: ``member_s`` (the loop's;
  absent: ``forward_s``), and, for a row-exact batch (fp32, the CPU as the fast device: each
  request's rows of an expert in a call of its own, in waves), ``batch_segment_s`` per further
  (request, expert) call beyond its table price (signed: negative where such calls cost less
  than the table says) and ``batch_wave_s`` per wave of a call run in waves (a gather, a
  call, a scatter; absent: zero).
  A version-1 profile (no ``host``) still loads: its ``sync_s`` included the
  decision and the issue, and the rest is priced at zero.
* ``h2d`` / ``d2h``: per ``pinned`` / ``pageable``, bandwidth against transfer size
  (``bytes``, ``gbps``), interpolated in log size.
* ``gpu_experts``: per expert shape (``HIDDENxINTER``) and dtype, the time to compute
  ``experts`` experts grouped, with ``tokens_per_expert`` tokens each (a grid), from a stack
  holding just those experts; optional ``group_s``: what each further stack entry without
  tokens adds to a call (a grouped kernel walks the whole slot stack; absent: zero).
* ``cpu_expert_ffn``: per expert shape and weight dtype, one expert's FFN on the CPU
  against ``tokens``.
* ``non_expert``: per model key (:attr:`traces.formats.shapes.ModelShape.model_key`), the time of
  a MoE layer's non-expert work (norms, attention, router, shared expert) and of a dense
  layer against ``tokens`` and ``context``, and of the ``head`` (final norm, lm_head and
  choosing the tokens from the logits) against ``tokens``; optional ``member_s`` per part:
  what each further request of a batched forward adds beyond its tokens (its own attention
  call, its sampling; absent: zero), see :meth:`traces.costs.cost_model.CostModel.batched_s`.

* ``drive`` (optional): the drive the checkpoint lives on, the third tier under host memory:
  ``read_gbps`` (what expert-sized reads reach at the runtime's queue depth, bypassing the
  page cache), ``read_latency_s`` (one read's latency at queue depth 1), ``queue_depth``
  (reads the runtime keeps in flight), ``capacity_bytes``; a ``name`` and, for a derived
  drive, a ``datasheet`` note. Without it no expert can live on the drive only.

* ``measured`` (optional, written by ``runtime.profile``): when and where the profile was
  taken (``created``, ``host``, ``threads``, ``cores``, ``load_avg_1m``), so a validation can
  tell whether it runs on the same box under the same load, and ``reference_s``, the speed
  reference at the start (validations report the box's drift against it; no time is scaled by it).
* ``in_run`` (optional, written by ``runtime.profile`` when the fast device is the CPU): what
  each part costs inside a forward over what its table priced (``dense``, ``moe``, ``head``,
  ``experts``, ``decide``, ``copies``), measured by replaying a synthetic trace through the
  engine; the tables and host costs were scaled by these factors (kept so a reader sees how);
  ``member_s``: the per-request costs of a batched forward found so (also in the tables);
  ``replay_s``: the level replay's seconds per forward on the checkpoint itself (a run's
  same-work speed reference: ``runtime.calibrate.replay_seconds``).

Lookups interpolate linearly between measured points; below the first point the first
value holds; above the last the last segment's slope continues.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from traces.common.errors import TideError
from traces.common.files import read_json, write_json
from traces.common.values import need_dict, need_float, need_list, need_numbers, need_str
from traces.formats.header import fail, read_header
from traces.formats.tables import Table1, Table2

FORMAT = "tide-profile"
VERSION = 2
READS = (1, 2)  # versions this TIDE reads
SOURCES = ("measured", "derived")
CAPACITIES = ("gpu_mem_bytes", "host_mem_bytes", "cpu_cores", "host_mem_bw_gbps", "gpu_mem_bw_gbps")
OVERHEADS = ("launch_s", "sync_s", "cpu_task_s")
HOST = ("forward_s", "decide_s", "refresh_s", "swap_s", "issue_s", "copy_call_s", "expert_call_s", "miss_call_s",
        "swap_wave_s", "member_s", "batch_segment_s", "batch_wave_s")
#: absent: zero (profiles measured before they were); member_s: forward_s
HOST_OPTIONAL = ("swap_wave_s", "member_s", "batch_segment_s", "batch_wave_s")
_SIGNED = ("batch_segment_s",)  # a further call may cost less than its table says (see runtime.profile)
DRIVE = ("read_gbps", "read_latency_s", "queue_depth", "capacity_bytes")
_POSITIVE = ("gpu_mem_bytes", "host_mem_bytes", "host_mem_bw_gbps", "gpu_mem_bw_gbps",  # they divide or bound
             "read_gbps", "queue_depth", "capacity_bytes")
BUNDLED = {
    "h200": "h200.json",
    "a100-40gb": "a100-40gb.json",
    "rtx4090": "rtx4090.json",
    "rtx4090-64gb": "rtx4090-64gb.json",
}


def _check_source(where: str, src: Any, shape: tuple[int, ...]) -> None:
    if isinstance(src, str):
        if src not in SOURCES:
            raise fail(where, f"source {src!r} must be 'measured' or 'derived'")
        return
    try:
        arr = np.asarray(src, dtype=object)
    except ValueError:
        arr = np.asarray(None, dtype=object)
    if arr.shape != shape or not all(s in SOURCES for s in arr.reshape(-1)):
        raise fail(where, f"source must be 'measured', 'derived' or a list of those shaped {list(shape)}")


def _axis(where: str, t: dict, key: str) -> np.ndarray:
    if key not in t:
        raise fail(where, f"lacks {key!r}")
    a = np.asarray(need_numbers(t[key], f"{where}: {key}"), dtype=np.float64)
    if a.ndim != 1 or len(a) < 1 or not np.isfinite(a).all() or (a <= 0).any() or (np.diff(a) <= 0).any():
        raise fail(where, f"{key} must be a non-empty, increasing list of positive numbers")
    return a


def _values(where: str, t: dict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in t:
        raise fail(where, f"lacks {key!r}")
    v = np.asarray(_nested_numbers(t[key], f"{where}: {key}", len(shape)), dtype=np.float64)
    if v.shape != shape:
        raise fail(where, f"{key} has shape {list(v.shape)}, expected {list(shape)}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise fail(where, f"{key} must be finite and non-negative")
    _check_source(where, t.get("source"), shape)
    return v


def _nested_numbers(v: Any, where: str, depth: int) -> Any:
    """A list (of lists, ``depth`` deep) of finite numbers, rows of equal length."""
    if depth == 0:
        return need_float(v, where)
    rows = [_nested_numbers(x, f"{where}[{i}]", depth - 1) for i, x in enumerate(need_list(v, where, nonempty=True))]
    if depth > 1 and len({len(r) for r in rows}) > 1:
        raise fail(where, "rows must all have the same length")
    return rows


class Profile:
    """A validated hardware profile with interpolating lookups."""

    def __init__(self, data: dict[str, Any], where: str = "profile"):
        self.data = data
        self.where = where
        self._validate()

    # ---- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, ref: str | Path) -> "Profile":
        """A bundled name (:data:`BUNDLED`) or a JSON file."""
        if str(ref) in BUNDLED:
            text = resources.files("traces.data.profiles").joinpath(BUNDLED[str(ref)]).read_text()
            return cls(json.loads(text), where=f"profile {ref}")
        path = Path(ref)
        if not path.is_file():
            raise TideError(f"{ref}: no such profile file (bundled profiles: {', '.join(BUNDLED)})")
        return cls(read_json(path, "profile"), where=str(path))

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.data)

    @property
    def name(self) -> str:
        return str(self.data.get("name", "unnamed"))

    @property
    def fast_device(self) -> str:
        return self.data["fast_device"]

    @property
    def shares_cores(self) -> bool:
        """True when the fast device is the CPU: its work and the CPU's contend for the same cores."""
        return self.fast_device == "cpu"

    def capacity(self, key: str) -> float:
        return float(self.data["capacities"][key]["value"])

    def overhead(self, key: str) -> float:
        return float(self.data["overheads"][key]["value"])

    def has_host(self, key: str) -> bool:
        sec = self.data.get("host")
        return sec is not None and key in sec

    def host(self, key: str) -> float:
        """A host-thread cost (``HOST``); zero in a version-1 profile, which had none, and for an
        optional cost the profile does not hold."""
        sec = self.data.get("host")
        return float(sec[key]["value"]) if sec is not None and key in sec else 0.0

    # ---- validation ---------------------------------------------------------------
    def _validate(self) -> None:
        d, w = self.data, self.where
        version = read_header(d, w, FORMAT, READS, "profile")
        if d.get("name") is not None:
            need_str(d["name"], f"{w}: name")
        if d.get("measured") is not None:
            need_dict(d["measured"], f"{w}: measured")
        if d.get("in_run") is not None:  # what the tables were scaled by: numbers, and a note
            for k, v in need_dict(d["in_run"], f"{w}: in_run").items():
                if k == "note":
                    need_str(v, f"{w}: in_run.note")
                elif k == "member_s":  # what each further request of a batched forward added, per part
                    for part, x in need_dict(v, f"{w}: in_run.member_s").items():
                        need_float(x, f"{w}: in_run.member_s.{part}")
                else:
                    need_float(v, f"{w}: in_run.{k}", positive=True)
        if d.get("fast_device") not in ("cuda", "cpu"):
            raise fail(w, f"fast_device must be 'cuda' or 'cpu', got {d.get('fast_device')!r}")
        groups = [("capacities", CAPACITIES), ("overheads", OVERHEADS)] + ([("host", HOST)] if version >= 2 else [])
        for group, keys in groups + [("drive", DRIVE)]:  # the drive lane is optional: a box may have none
            sec = d.get(group)
            if group == "drive" and sec is None:
                continue
            if not isinstance(sec, dict):
                raise fail(w, f"lacks the {group!r} section")
            for k in keys:
                v = sec.get(k)
                if v is None and k in HOST_OPTIONAL and group == "host":
                    continue
                if not isinstance(v, dict) or "value" not in v:
                    raise fail(w, f"{group}.{k} missing (expected {{'value': ..., 'source': ...}})")
                need_float(v["value"], f"{w}: {group}.{k}", lo=None if k in _SIGNED else 0.0, positive=k in _POSITIVE)
                _check_source(f"{w}: {group}.{k}", v.get("source"), ())
        if self.capacity("cpu_cores") < 1:
            raise fail(w, "capacities.cpu_cores must be at least 1")
        if self.has_drive and self.drive("queue_depth") < 1:
            raise fail(w, "drive.queue_depth must be at least 1")
        self._h2d = self._bandwidths("h2d")
        self._d2h = self._bandwidths("d2h")
        self._gpu: dict[tuple[str, str], Table2] = {}
        self._group: dict[tuple[str, str], float] = {}
        for shape, per in self._section("gpu_experts").items():
            for dt, t in per.items():
                where = f"{w}: gpu_experts.{shape}.{dt}"
                t = need_dict(t, where)
                xs, ys = _axis(where, t, "experts"), _axis(where, t, "tokens_per_expert")
                self._gpu[(shape, dt)] = Table2(xs, ys, _values(where, t, "seconds", (len(xs), len(ys))))
                self._group[(shape, dt)] = need_float(t.get("group_s", 0.0), f"{where}.group_s", lo=0.0)
        self._cpu: dict[tuple[str, str], Table1] = {}
        for shape, per in self._section("cpu_expert_ffn").items():
            for dt, t in per.items():
                where = f"{w}: cpu_expert_ffn.{shape}.{dt}"
                t = need_dict(t, where)
                xs = _axis(where, t, "tokens")
                self._cpu[(shape, dt)] = Table1(xs, _values(where, t, "seconds", (len(xs),)))
        self._non: dict[tuple[str, str], Table1 | Table2] = {}
        self._member: dict[tuple[str, str], float] = {}
        for key, per in self._section("non_expert").items():
            for part in ("moe_layer", "dense_layer", "head"):
                where = f"{w}: non_expert.{key}.{part}"
                if part not in per:
                    raise fail(where, "missing")
                t = need_dict(per[part], where)
                if t.get("member_s") is not None:  # may be negative: a batch shares more than the rule assumes
                    self._member[(key, part)] = need_float(t["member_s"], f"{where}.member_s")
                xs = _axis(where, t, "tokens")
                if part == "head":
                    self._non[(key, part)] = Table1(xs, _values(where, t, "seconds", (len(xs),)))
                else:
                    ys = _axis(where, t, "context")
                    self._non[(key, part)] = Table2(xs, ys, _values(where, t, "seconds", (len(xs), len(ys))))
        self._check_signed()

    @property
    def has_drive(self) -> bool:
        return self.data.get("drive") is not None

    def drive(self, key: str) -> float:
        """A drive figure (:data:`DRIVE`); a TideError naming the profile when it has no drive."""
        sec = self.data.get("drive")
        if sec is None:
            raise fail(self.where, "has no 'drive' section: experts cannot live on the drive only "
                                   "(measure one with python -m runtime.profile --checkpoint DIR)")
        return float(sec[key]["value"])

    def drive_read_s(self, reads: Any, nbytes: float) -> np.ndarray:
        """Seconds to read ``reads`` experts of ``nbytes`` each from the drive, ``queue_depth``
        at a time: each read's latency shared by the reads in flight, plus the bytes at the
        read bandwidth."""
        n = np.asarray(reads, dtype=np.float64)
        if not self.has_drive:
            if np.any(n > 0):
                self.drive("read_gbps")  # the one line saying why
            return np.zeros_like(n)
        lat, qd, bw = self.drive("read_latency_s"), self.drive("queue_depth"), self.drive("read_gbps")
        return np.where(n > 0, np.ceil(n / qd) * lat + n * nbytes / (bw * 1e9), 0.0)

    def _check_signed(self) -> None:
        """A signed cost's real bound: ``batch_segment_s`` corrects the price of each further
        (request, expert) call of a row-exact batch, and what a call saves is part of the expert
        work the tables price; so it is at least minus the tables' largest cell (a whole grouped
        call of the most experts at the most tokens). A fitted value is far inside it (tiny:
        tens of microseconds against milliseconds); a value past it would price expert work
        below nothing, as would any task the simulator's box then refuses."""
        seg = self.host("batch_segment_s")
        if seg >= 0 or not self._gpu:
            return
        floor = max(float(t.zs.max()) for t in self._gpu.values())
        if seg < -floor:
            raise fail(self.where, f"host.batch_segment_s must be at least -{floor:.3g} (minus the largest cell of "
                                   f"gpu_experts: a further call cannot save more than all the expert work), got {seg:.3g}")

    def _section(self, name: str) -> dict[str, dict[str, Any]]:
        sec = self.data.get(name)
        if not isinstance(sec, dict):
            raise fail(self.where, f"lacks the {name!r} section")
        for k, v in sec.items():
            if not isinstance(v, dict):
                raise fail(self.where, f"{name}.{k} must be an object")
        return sec

    def _bandwidths(self, name: str) -> dict[str, Table1]:
        sec = self._section(name)
        out = {}
        for kind in ("pinned", "pageable"):
            where = f"{self.where}: {name}.{kind}"
            if kind not in sec:
                raise fail(where, "missing")
            t = sec[kind]
            xs = _axis(where, t, "bytes")
            gb = _values(where, t, "gbps", (len(xs),))
            if (gb <= 0).any():
                raise fail(where, "gbps must be positive")
            out[kind] = Table1(np.log(xs), gb)
        return out

    # ---- lookups --------------------------------------------------------------------
    def transfer_s(self, direction: str, nbytes: Any, chunk: Any = None, pinned: bool = True) -> np.ndarray:
        """Seconds to move ``nbytes`` in transfers of ``chunk`` bytes each (default: one transfer)."""
        table = (self._h2d if direction == "h2d" else self._d2h)["pinned" if pinned else "pageable"]
        nbytes = np.asarray(nbytes, dtype=np.float64)
        chunk = nbytes if chunk is None else np.asarray(chunk, dtype=np.float64)
        gbps = table(np.log(np.maximum(chunk, 1.0)))
        xs = np.exp(table.xs)
        gbps = np.where(chunk < xs[0], table.ys[0], gbps)
        gbps = np.where(chunk > xs[-1], table.ys[-1], gbps)
        return np.where(nbytes > 0, nbytes / (gbps * 1e9), 0.0)

    def gpu_experts_s(self, shape_key: str, dtype: str, experts: Any, tokens_per_expert: Any) -> np.ndarray:
        """Grouped computation of ``experts`` experts with ``tokens_per_expert`` tokens each."""
        t = self._lookup(self._gpu, "gpu_experts", shape_key, dtype)
        experts = np.asarray(experts, dtype=np.float64)
        return np.where(experts > 0, t(experts, np.maximum(tokens_per_expert, 1)), 0.0)

    def gpu_group_s(self, shape_key: str, dtype: str) -> float:
        """Seconds each stack entry without tokens adds to a grouped call (zero when not measured)."""
        self._lookup(self._gpu, "gpu_experts", shape_key, dtype)
        return self._group[(shape_key, dtype)]

    def cpu_expert_s(self, shape_key: str, dtype: str, tokens: Any) -> np.ndarray:
        """One expert's FFN on the CPU with ``tokens`` tokens (0 tokens: no time)."""
        t = self._lookup(self._cpu, "cpu_expert_ffn", shape_key, dtype)
        tokens = np.asarray(tokens, dtype=np.float64)
        return np.where(tokens > 0, t(np.maximum(tokens, 1)), 0.0)

    def measured_range(self, shape_key: str, dtype: str, model_key: str, cpu_dtype: str | None = None) -> dict[str, float]:
        """How far the tables go: tokens per expert on the fast device and on the CPU, and a
        forward's tokens and context; past them a lookup extrapolates (the last segment's slope)."""
        gpu, cpu = self._lookup(self._gpu, "gpu_experts", shape_key, dtype), None
        if (shape_key, cpu_dtype or dtype) in self._cpu:
            cpu = self._cpu[(shape_key, cpu_dtype or dtype)]
        non = self._non.get((model_key, "moe_layer"))
        return {"gpu_tokens_per_expert": float(gpu.ys[-1]),
                "cpu_tokens_per_expert": float(cpu.xs[-1]) if cpu is not None else float("inf"),
                "forward_tokens": float(non.xs[-1]) if non is not None else float("inf"),
                "context": float(non.ys[-1]) if non is not None else float("inf")}

    def cpu_expert_knots(self, shape_key: str, dtype: str) -> np.ndarray:
        """The token counts at which the CPU expert table is given (its interpolation knots)."""
        return self._lookup(self._cpu, "cpu_expert_ffn", shape_key, dtype).xs

    def cpu_dtypes(self, shape_key: str) -> list[str]:
        return [dt for (s, dt) in self._cpu if s == shape_key]

    def non_expert_s(self, model_key: str, part: str, tokens: Any, context: Any = None) -> np.ndarray:
        t = self._non.get((model_key, part))
        if t is None:
            have = sorted({k for k, _ in self._non})
            raise fail(self.where, f"no non-expert times for model shape {model_key} (has: {', '.join(have) or 'none'}); "
                                    "profile this model with python -m runtime.profile --checkpoint DIR")
        if part == "head":
            return t(tokens)
        return t(tokens, context)

    def member_s(self, model_key: str, part: str) -> float:
        """What each further request of a batched forward adds to ``part`` (0 when not measured)."""
        return self._member.get((model_key, part), 0.0)

    def has_model(self, model_key: str) -> bool:
        return (model_key, "moe_layer") in self._non

    def _lookup(self, tables: dict, section: str, shape_key: str, dtype: str):
        t = tables.get((shape_key, dtype))
        if t is None:
            have = sorted(f"{s}/{d}" for s, d in tables)
            raise fail(self.where, f"no {section} entry for expert shape {shape_key} in {dtype} (has: {', '.join(have) or 'none'})")
        return t

    def reference_s(self) -> float | None:
        """The speed reference measured when the profile started (``runtime.device.speed_reference_s``):
        what a validation compares the box's speed now against (reported as drift only)."""
        m = self.data.get("measured")
        v = m.get("reference_s") if isinstance(m, dict) else None
        return need_float(v, f"{self.where}: measured.reference_s", positive=True) if v is not None else None

    def origin(self) -> dict[str, Any]:
        """Where and when the profile was measured (empty for a derived box) and its reference
        figure: host memory bandwidth, when measured."""
        m = self.data.get("measured")
        out = dict(m) if isinstance(m, dict) else {}
        bw = self.data["capacities"]["host_mem_bw_gbps"]
        if bw.get("source") == "measured":
            out["host_mem_bw_gbps"] = float(bw["value"])
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "fast_device": self.fast_device,
            **{k: self.capacity(k) for k in CAPACITIES}, **{k: self.overhead(k) for k in OVERHEADS},
            **{f"host_{k}": self.host(k) for k in HOST},
            "h2d_pinned_gbps_max": float(self._h2d["pinned"].ys.max()),
            "d2h_pinned_gbps_max": float(self._d2h["pinned"].ys.max()),
            **({f"drive_{k}": self.drive(k) for k in DRIVE} if self.has_drive else {}),
        }


def median_of(profiles: list["Profile"]) -> "Profile":
    """One profile from several measurements of the same box: every time and every bandwidth
    the median (on a box whose speed drifts, a run sees the typical speed; the least time of
    many short measurements would be luckier than any run); the rest from the first. Tables
    must have the same axes."""
    def merge(key: str, vals: list[Any]) -> Any:
        first = vals[0]
        if isinstance(first, dict):
            return {k: merge(k, [v[k] for v in vals]) if all(isinstance(v, dict) and k in v for v in vals) else first[k]
                    for k in first}
        if isinstance(first, list):
            if all(isinstance(v, list) and len(v) == len(first) for v in vals) and key in ("seconds", "gbps"):
                return [merge(key, [v[i] for v in vals]) for i in range(len(first))]
            return first
        if isinstance(first, (int, float)) and not isinstance(first, bool) and (
                key in ("seconds", "gbps") or key.endswith("_s") or key.endswith("_gbps")):
            return float(np.median(vals))
        return first

    data = merge("", [p.data for p in profiles])
    for group in ("overheads", "host", "capacities", "drive"):  # {"value": v} scalars: the key is the entry's name
        if isinstance(data.get(group), dict):
            for k, v in data[group].items():
                if isinstance(v, dict) and "value" in v:
                    v["value"] = merge(k, [(p.data.get(group) or {}).get(k, v)["value"] for p in profiles])
    return Profile(data, where=profiles[0].where)


def list_profiles() -> list[str]:
    return list(BUNDLED)
