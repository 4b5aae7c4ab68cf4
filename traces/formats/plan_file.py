"""Plans: per MoE layer a policy kind, its GPU expert budget ``B`` and (tide) its refresh
interval ``tau``, with provenance.

JSON, format ``tide-plan`` version 4::

    {"format": "tide-plan", "version": 4,
     "model": {"name": "llada2-mini", "model_key": "...", "experts": 256},
     "dtype": "bfloat16", "gpu_mem_bytes": 24e9, "batch_size": 8,
     "layers": [{"layer": 1, "kind": "tide", "tau": 4, "budget": 96},   # every MoE layer, in order
                {"layer": 2, "kind": "swap", "budget": 64},
                {"layer": 3, "kind": "static", "budget": 2, "resident": [7, 40]},
                {"layer": 4, "kind": "cpu", "budget": 0}, ...],
     "host": {"kind": "tide", "host_mem_bytes": 64e9,        # optional: the host tier
              "budget": [256, 200, ...], "tau": [1, 4, ...]},  # experts kept in host memory per MoE layer
     "predicted": {"seconds": ..., "tokens_per_s": ..., "speedup": {"cpu": ..., "static": ...}},
     "provenance": {"created": ..., "trace": ..., "profile": ..., "solver": ...}}

Kinds are ``cpu`` (budget 0: every routed token on the CPU), ``static``, ``swap`` and
``tide`` (:data:`traces.formats.vocabulary.KINDS`); only tide layers have a ``tau``; a static layer
may list its ``resident`` experts (as many as its budget: the runtime loads them straight
onto the fast device and keeps only the others in host memory). ``host`` (version 4) gives the
host tier (:mod:`traces.policies.host`): its kind, and per MoE layer the experts host memory
keeps (the rest are read from the drive) and the refresh interval; absent, host memory holds
every expert. ``batch_size`` is the
requests per forward the plan was made for (absent: 1). Version-1 plans (no kinds: every
layer tide) version-2 plans (no batch size, no residents) and version-3 plans (no host tier) still load. The planner
writes plans; the runtime and the simulator run them as the ``plan`` policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traces.common.checks import check_batch_size
from traces.common.errors import TideError
from traces.common.files import read_json, write_json
from traces.common.values import get, need_dict, need_float, need_int, need_list, need_str
from traces.formats.header import read_header
from traces.formats.shapes import DTYPE_BYTES, ModelShape
from traces.formats.vocabulary import KINDS

FORMAT = "tide-plan"
VERSION = 4
READS = (1, 2, 3, 4)  # versions this TIDE reads


@dataclass
class Plan:
    model: dict[str, Any]
    layers: list[int]
    tau: list[int]  # 0 where the kind is not tide
    budget: list[int]
    kind: list[str] = field(default_factory=list)  # empty: every layer tide (version 1)
    dtype: str = "bfloat16"
    gpu_mem_bytes: float | None = None
    batch_size: int = 1  # requests per forward the plan was made for
    resident: dict[int, list[int]] = field(default_factory=dict)  # static layers' residents, by MoE layer index
    host: dict[str, Any] | None = None  # the host tier: kind, budget [L], tau [L], host_mem_bytes (None: every expert held)
    predicted: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_shape(cls, shape: ModelShape, tau: Any, budget: Any, kind: Any = "tide", **kw: Any) -> "Plan":
        L = shape.n_moe_layers
        k = [kind] * L if isinstance(kind, str) else list(kind)
        t = np.broadcast_to(np.asarray(tau), (L,)).astype(int).tolist()
        b = np.broadcast_to(np.asarray(budget), (L,)).astype(int).tolist()
        t = [tt if kk == "tide" else 0 for tt, kk in zip(t, k)]
        plan = cls(model={"name": shape.name, "model_key": shape.model_key, "experts": shape.experts},
                   layers=shape.moe_layers, tau=t, budget=b, kind=k, **kw)
        plan.validate()
        return plan

    @property
    def kinds(self) -> list[str]:
        return self.kind or ["tide"] * len(self.layers)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for i, (l, k, t, b) in enumerate(zip(self.layers, self.kinds, self.tau, self.budget)):
            rows.append({"layer": l, "kind": k, "tau": t, "budget": b} if k == "tide" else {"layer": l, "kind": k, "budget": b})
            if i in self.resident:
                rows[-1]["resident"] = [int(e) for e in self.resident[i]]
        return {
            "format": FORMAT, "version": VERSION, "model": self.model, "dtype": self.dtype,
            "gpu_mem_bytes": self.gpu_mem_bytes, "batch_size": self.batch_size, "layers": rows,
            **({"host": self.host} if self.host is not None else {}),
            "predicted": self.predicted, "provenance": self.provenance,
        }

    def write(self, path: str | Path) -> Path:
        self.validate()
        return write_json(path, self.to_json())

    @classmethod
    def from_json(cls, d: Any, where: str = "plan") -> "Plan":
        version = read_header(d, where, FORMAT, READS, "plan")
        model = need_dict(d.get("model"), f"{where}: model")
        need_int(get(model, "experts", f"{where}: model"), f"{where}: model.experts", lo=1)
        rows = need_list(d.get("layers"), f"{where}: layers", nonempty=True)
        layers, kind, tau, budget, resident = [], [], [], [], {}
        for i, r in enumerate(rows):
            w = f"{where}: layers[{i}]"
            r = need_dict(r, w)
            layers.append(need_int(get(r, "layer", w), f"{w}.layer", lo=0))
            kind.append(need_str(get(r, "kind", w), f"{w}.kind", KINDS) if version >= 2 else "tide")
            if kind[-1] == "tide":
                tau.append(need_int(get(r, "tau", w), f"{w}.tau", lo=1))
            else:  # a tau the reader ignores is still checked as the command line's --tau is
                if r.get("tau") is not None:
                    need_int(r["tau"], f"{w}.tau", lo=1)
                tau.append(0)
            budget.append(need_int(get(r, "budget", w), f"{w}.budget", lo=0))
            if r.get("resident") is not None and version >= 3:
                resident[i] = [need_int(e, f"{w}.resident", lo=0) for e in need_list(r["resident"], f"{w}.resident")]
        dtype = need_str(d.get("dtype", "bfloat16"), f"{where}: dtype", tuple(DTYPE_BYTES))
        gpu_mem = d.get("gpu_mem_bytes")
        if gpu_mem is not None:
            gpu_mem = need_float(gpu_mem, f"{where}: gpu_mem_bytes", positive=True)
        predicted = need_dict(d.get("predicted") or {}, f"{where}: predicted")
        provenance = need_dict(d.get("provenance") or {}, f"{where}: provenance")
        batch = check_batch_size(d.get("batch_size", 1), f"{where}: batch_size") if version >= 3 else 1
        host = None
        if version >= 4 and d.get("host") is not None:
            host = _read_host(need_dict(d["host"], f"{where}: host"), f"{where}: host", len(layers))
        plan = cls(model=model, layers=layers, tau=tau, budget=budget, kind=kind, dtype=dtype,
                   gpu_mem_bytes=gpu_mem, batch_size=batch, resident=resident, host=host, predicted=predicted,
                   provenance=provenance)
        plan.validate(where)
        return plan

    @classmethod
    def read(cls, path: str | Path) -> "Plan":
        return cls.from_json(read_json(path, "plan"), where=str(path))

    def validate(self, where: str = "plan") -> None:
        E = self.model.get("experts")
        for name, vals in (("layer", self.layers), ("tau", self.tau), ("budget", self.budget)):
            for v in vals:
                if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                    raise TideError(f"{where}: {name} values must be integers, got {v!r}")
        if list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
            raise TideError(f"{where}: layer ids must be distinct, non-negative and increasing")
        kinds = self.kinds
        if len(kinds) != len(self.layers) or any(k not in KINDS for k in kinds):
            raise TideError(f"{where}: every layer needs a kind among {', '.join(KINDS)}")
        for l, k, t, b in zip(self.layers, kinds, self.tau, self.budget):
            if k == "tide" and t < 1:
                raise TideError(f"{where}: tau must be at least 1 (layer {l})")
            if not 0 <= b <= E:
                raise TideError(f"{where}: budgets must lie in 0..{E}")
            if k == "swap" and b < 1:
                raise TideError(f"{where}: a swap layer needs a budget of at least 1 (layer {l})")
            if k == "cpu" and b != 0:
                raise TideError(f"{where}: a cpu layer has budget 0 (layer {l})")
        for i, ids in self.resident.items():
            l = self.layers[i] if 0 <= i < len(self.layers) else i
            if not 0 <= i < len(self.layers) or kinds[i] != "static":
                raise TideError(f"{where}: only a static layer lists its residents (layer {l})")
            if len(set(ids)) != len(ids) or len(ids) != self.budget[i] or any(not 0 <= e < E for e in ids):
                raise TideError(f"{where}: layer {l} lists {len(ids)} residents; a static layer lists exactly its "
                                f"budget ({self.budget[i]}) of distinct experts in 0..{E - 1}")
        check_batch_size(self.batch_size, f"{where}: batch_size")
        if self.host is not None and any(not 0 <= b <= E for b in self.host["budget"]):
            raise TideError(f"{where}: host budgets must lie in 0..{E}")

    def check_model(self, shape: ModelShape, where: str = "plan") -> None:
        """The plan must be for this model's MoE layers and experts."""
        if self.model.get("experts") != shape.experts or list(self.layers) != shape.moe_layers:
            raise TideError(f"{where}: plan is for {self.model.get('name')} (MoE layers {self.layers[0]}..{self.layers[-1]}, "
                            f"{self.model.get('experts')} experts), not {shape.name} (MoE layers "
                            f"{shape.moe_layers[0]}..{shape.moe_layers[-1]}, {shape.experts} experts)")

    def expert_bytes_on_gpu(self, shape: ModelShape) -> int:
        return int(sum(self.budget)) * shape.expert_bytes(self.dtype)


def _read_host(h: dict[str, Any], where: str, n_layers: int) -> dict[str, Any]:
    """A plan's host tier, checked: a kind, and a budget and a tau per MoE layer."""
    from traces.formats.vocabulary import HOST_KINDS
    kind = get(h, "kind", where)
    if isinstance(kind, list):
        if len(kind) != n_layers:
            raise TideError(f"{where}.kind: expected one kind or one per MoE layer ({n_layers}), got {len(kind)}")
        kind = [need_str(k, f"{where}.kind[{i}]", HOST_KINDS) for i, k in enumerate(kind)]
    else:
        kind = need_str(kind, f"{where}.kind", HOST_KINDS)
    out: dict[str, Any] = {"kind": kind}
    for key, lo in (("budget", 0), ("tau", 1)):
        vals = need_list(get(h, key, where), f"{where}.{key}", nonempty=True)
        if len(vals) != n_layers:
            raise TideError(f"{where}.{key}: expected one value per MoE layer ({n_layers}), got {len(vals)}")
        out[key] = [need_int(v, f"{where}.{key}[{i}]", lo=lo) for i, v in enumerate(vals)]
    if h.get("host_mem_bytes") is not None:
        out["host_mem_bytes"] = need_float(h["host_mem_bytes"], f"{where}.host_mem_bytes", positive=True)
    return out
