"""Derived hardware profiles: boxes nobody here has measured, from public specifications.

The bundled boxes' specifications and rooflines; ``python -m traces.derive`` (:mod:`traces.derive`)
rewrites the bundled profiles in ``traces/data/profiles``:

* ``h200``: the measured H200 box (PCIe gen5, 16-core Xeon with AMX; see
  ``h200-pcie5-measured.source.json``) with what its measurement lacks (non-expert layer
  times, overheads, expert groups smaller than 256, small transfers) derived;
* ``a100-40gb``: A100 40 GB, PCIe gen4 x16, a 48-core AVX2 server CPU;
* ``rtx4090``: a 24 GB consumer GPU, PCIe gen4 x16, a 16-core AVX-512 desktop CPU, 128 GiB
  of RAM; ``rtx4090-64gb`` the same with 64 GiB.

Every box has the drive its checkpoint lives on (:data:`DRIVES`, from datasheets).

The derivations are rooflines with efficiency factors, stated in :class:`BoxSpec`:
GPU work costs ``launches x launch_s + max(bytes / HBM bandwidth, flops / peak)``; a
transfer of ``s`` bytes moves at ``s / (latency + s / peak)``; one expert on the CPU costs
``cpu_task_s + weight bytes / memory bandwidth + flops / CPU peak``. They are marked
``derived`` until ``python -m runtime.profile`` measures the box.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from traces.formats.profile_file import FORMAT, VERSION
from traces.formats.shapes import DTYPE_BYTES, ModelShape

GiB = 1 << 30
TRANSFER_SIZES = (4096, 65536, 1 << 20, 6291456, 25165824, 1 << 30)
TOKENS = (1, 4, 16, 64, 256, 1024)
GROUP_EXPERTS = (1, 8, 32, 64, 128, 256)
GROUP_TOKENS = (1, 4, 16, 64, 256, 1024)  # a batch puts many tokens on an expert
NON_EXPERT_TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048)
NON_EXPERT_CONTEXT = (32, 128, 512, 1024, 2048, 4096, 8192)
#: Eager PyTorch kernel launches (derived by counting the ops of one layer).
LAUNCHES = {"moe_layer": 32, "dense_layer": 22, "head": 3, "grouped_experts": 6,
            "engine_layer": 16, "expert_call": 6, "expert_copy": 3}
#: The engine's policy decisions are host numpy work whose time depends on the CPU, not the
#: GPU: measured at 256 experts on a 2-core x86 VM (experiments.bench_engine), per MoE layer;
#: swap's grows with its waves (20 us + 20 us per wave, fitted over mini and flash traces at
#: budgets 8..256: 1 to 12 waves).
DECISION_S = {"decide_s": 5e-6, "refresh_s": 40e-6, "swap_s": 20e-6, "swap_wave_s": 20e-6}
#: The decoding loop's own host work per forward (embedding, rotary tables, acceptance), same VM.
FORWARD_S = 300e-6
#: Host numpy work per missed expert (its rows in the gather), same VM.
MISS_CALL_S = 1e-6
DTYPE_GPU = "bfloat16"


@dataclass(frozen=True)
class DriveSpec:
    """An NVMe drive from its datasheet: sequential read (what reads of whole experts, megabytes
    each, approach) and 4 KiB random reads at queue depth 1 (a read's latency)."""

    name: str
    seq_read_gbps: float
    qd1_iops: float
    capacity_bytes: float
    #: Of the sequential figure, what expert-sized reads at the runtime's queue depth reach
    #: (a file system, several MB per read, not one long stream).
    efficiency: float = 0.85
    queue_depth: int = 8

    def section(self) -> dict[str, Any]:
        """The profile's ``drive`` section, derived."""
        sheet = f"datasheet: {self.seq_read_gbps:g} GB/s sequential read, {self.qd1_iops:,.0f} IOPS 4 KiB random read at QD1"
        return {
            "name": self.name, "datasheet": sheet,
            "read_gbps": _scalar(self.seq_read_gbps * self.efficiency, "derived",
                                 f"{self.efficiency:g} x the datasheet's sequential read"),
            "read_latency_s": _scalar(1.0 / self.qd1_iops, "derived", "1 / the datasheet's QD1 random-read IOPS"),
            "queue_depth": _scalar(self.queue_depth, "derived", "reads the runtime keeps in flight"),
            "capacity_bytes": _scalar(self.capacity_bytes, "derived"),
        }


#: Drives a box may have (datasheet figures): a PCIe gen4 and a gen5 consumer NVMe drive, and
#: gen4 and gen5 data-centre drives.
DRIVES: dict[str, DriveSpec] = {
    "gen4": DriveSpec("Samsung 990 PRO 2 TB (NVMe, PCIe gen4 x4)", 7.45, 22_000, 2e12),
    "gen5": DriveSpec("Crucial T705 2 TB (NVMe, PCIe gen5 x4)", 14.5, 22_000, 2e12),
    "dc-gen4": DriveSpec("Samsung PM9A3 3.84 TB (NVMe, PCIe gen4 x4)", 6.9, 12_500, 3.84e12),
    "dc-gen5": DriveSpec("Samsung PM1743 3.84 TB (NVMe, PCIe gen5 x4)", 13.0, 12_500, 3.84e12),
}


@dataclass(frozen=True)
class BoxSpec:
    """Public specifications of a box and the efficiency factors applied to them."""

    name: str
    gpu: str
    cpu: str
    pcie: str
    gpu_mem_bytes: float
    gpu_mem_bw_gbps: float  # peak HBM/GDDR bandwidth
    gpu_tflops: float  # dense bf16 tensor-core peak
    host_mem_bytes: float
    host_mem_bw_gbps: float  # peak DRAM bandwidth
    cpu_cores: int
    cpu_tflops: dict[str, float]  # peak per weight dtype the CPU computes in
    h2d_gbps: dict[str, float]  # large-transfer bandwidth, pinned / pageable
    d2h_gbps: dict[str, float]
    transfer_latency_s: float = 10e-6
    launch_s: float = 8e-6
    sync_s: float = 20e-6
    cpu_task_s: float = 20e-6
    gpu_bw_eff: float = 0.85
    gpu_flops_eff: float = 0.6
    cpu_bw_eff: float = 0.6
    cpu_flops_eff: float = 0.5
    #: Fixed cost of PyTorch's bf16 CPU matmul path at small token counts, calibrated on the
    #: measured Xeon (225 us for one token against a 45 us roofline).
    cpu_bf16_overhead_s: float = 180e-6
    #: The drive the checkpoint lives on (a key of :data:`DRIVES`; the measured H200 box's own
    #: drive was not measured: a data-centre gen5 drive is assumed).
    drive: str = "gen4"


SPECS: dict[str, BoxSpec] = {
    "h200": BoxSpec(
        name="h200", gpu="NVIDIA H200 NVL 141 GB (PCIe)", cpu="Intel Xeon (Emerald Rapids), 16 cores, AMX-BF16",
        pcie="gen5 x16", gpu_mem_bytes=139.9 * GiB, gpu_mem_bw_gbps=4800, gpu_tflops=835, host_mem_bytes=125 * GiB,
        host_mem_bw_gbps=307, cpu_cores=16, cpu_tflops={"bfloat16": 16.0, "float32": 2.4},
        h2d_gbps={"pinned": 55.4, "pageable": 9.1}, d2h_gbps={"pinned": 55.4, "pageable": 15.7},
        transfer_latency_s=8e-6, launch_s=6e-6, sync_s=15e-6, cpu_task_s=10e-6, drive="dc-gen5"),
    "a100-40gb": BoxSpec(
        name="a100-40gb", gpu="NVIDIA A100 40 GB (PCIe)", cpu="AMD EPYC, 48 cores, AVX2 (no native bf16)",
        pcie="gen4 x16", gpu_mem_bytes=40 * GiB, gpu_mem_bw_gbps=1555, gpu_tflops=312, host_mem_bytes=256 * GiB,
        host_mem_bw_gbps=204.8, cpu_cores=48, cpu_tflops={"bfloat16": 1.2, "float32": 3.5},
        h2d_gbps={"pinned": 25.0, "pageable": 10.0}, d2h_gbps={"pinned": 26.0, "pageable": 11.0}, drive="dc-gen4"),
    "rtx4090": BoxSpec(
        name="rtx4090", gpu="NVIDIA GeForce RTX 4090 24 GB", cpu="AMD Ryzen 9 (Zen 4), 16 cores, AVX-512 BF16",
        pcie="gen4 x16", gpu_mem_bytes=24 * GiB, gpu_mem_bw_gbps=1008, gpu_tflops=165, host_mem_bytes=128 * GiB,
        host_mem_bw_gbps=83.2, cpu_cores=16, cpu_tflops={"bfloat16": 2.3, "float32": 1.15},
        h2d_gbps={"pinned": 25.0, "pageable": 11.0}, d2h_gbps={"pinned": 25.0, "pageable": 11.0}),
}
# the box most people own: the same with 64 GiB of RAM
SPECS["rtx4090-64gb"] = replace(SPECS["rtx4090"], name="rtx4090-64gb", host_mem_bytes=64 * GiB)
MODELS = ("llada2-mini", "llada2-flash")


def _scalar(value: float, source: str, note: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"value": float(value), "source": source}
    if note:
        d["note"] = note
    return d


def transfer_gbps(spec: BoxSpec, peak: float, size: float) -> float:
    return size / (spec.transfer_latency_s + size / (peak * 1e9)) / 1e9


def gpu_roofline_s(spec: BoxSpec, launches: int, nbytes: float, flops: float) -> float:
    return launches * spec.launch_s + max(nbytes / (spec.gpu_mem_bw_gbps * 1e9 * spec.gpu_bw_eff),
                                          flops / (spec.gpu_tflops * 1e12 * spec.gpu_flops_eff))


def cpu_expert_s(spec: BoxSpec, shape: ModelShape, dtype: str, tokens: float) -> float:
    p = shape.expert_params()
    fixed = spec.cpu_task_s + (spec.cpu_bf16_overhead_s if dtype == "bfloat16" else 0.0)
    return (fixed + p * DTYPE_BYTES[dtype] / (spec.host_mem_bw_gbps * 1e9 * spec.cpu_bw_eff)
            + 2 * p * tokens / (spec.cpu_tflops[dtype] * 1e12 * spec.cpu_flops_eff))


def non_expert_tables(spec: BoxSpec, shape: ModelShape) -> dict[str, Any]:
    b = DTYPE_BYTES[DTYPE_GPU]
    attn = shape.attention_params()
    kv_layer = 2 * shape.kv_heads * shape.head_dim * b
    moe_w = attn + 3 * shape.hidden * shape.moe_intermediate * shape.shared_experts + shape.experts * shape.hidden
    dense_w = attn + 3 * shape.hidden * shape.intermediate

    def layer(weights: int, launches: int) -> list[list[float]]:
        rows = []
        for n in NON_EXPERT_TOKENS:
            row = []
            for c in NON_EXPERT_CONTEXT:
                nbytes = weights * b + c * kv_layer + 4 * n * shape.hidden * b
                flops = 2 * weights * n + 4 * n * c * shape.heads * shape.head_dim
                row.append(gpu_roofline_s(spec, launches, nbytes, flops))
            rows.append(row)
        return rows

    head_w = shape.vocab * shape.hidden
    return {
        "moe_layer": {"source": "derived", "tokens": list(NON_EXPERT_TOKENS), "context": list(NON_EXPERT_CONTEXT),
                      "seconds": layer(moe_w, LAUNCHES["moe_layer"])},
        "dense_layer": {"source": "derived", "tokens": list(NON_EXPERT_TOKENS), "context": list(NON_EXPERT_CONTEXT),
                        "seconds": layer(dense_w, LAUNCHES["dense_layer"])},
        "head": {"source": "derived", "tokens": list(NON_EXPERT_TOKENS),
                 "seconds": [gpu_roofline_s(spec, LAUNCHES["head"], head_w * b, 2 * head_w * n) for n in NON_EXPERT_TOKENS]},
    }


def gpu_group_table(spec: BoxSpec, shape: ModelShape, measured_256: dict[int, float] | None) -> dict[str, Any]:
    """Grouped expert time over (experts, tokens per expert); the measured 256-expert row where known."""
    b = DTYPE_BYTES[DTYPE_GPU]
    p = shape.expert_params()
    seconds, source = [], []
    for e in GROUP_EXPERTS:
        row, src = [], []
        for n in GROUP_TOKENS:
            if measured_256 and e == 256 and n in measured_256:
                row.append(measured_256[n])
                src.append("measured")
            else:
                row.append(gpu_roofline_s(spec, LAUNCHES["grouped_experts"], e * p * b, 2 * p * e * n))
                src.append("derived")
        seconds.append(row)
        source.append(src)
    flat = {s for r in source for s in r}
    return {"source": flat.pop() if len(flat) == 1 else source, "experts": list(GROUP_EXPERTS),
            "tokens_per_expert": list(GROUP_TOKENS), "seconds": seconds}


def _measured_source() -> dict[str, Any]:
    return json.loads(resources.files("traces.data.profiles").joinpath("h200-pcie5-measured.source.json").read_text())


def host_costs(spec: BoxSpec) -> dict[str, Any]:
    """The engine's host thread, derived: its decisions as measured elsewhere (host numpy), and
    what it issues as counted kernel launches and copies times the box's launch cost."""
    why = "derived: {} kernel launches x launch_s"
    out = {k: _scalar(v, "derived", "the engine's decision at 256 experts, measured on a 2-core x86 VM")
           for k, v in DECISION_S.items()}
    out["issue_s"] = _scalar(LAUNCHES["engine_layer"] * spec.launch_s, "derived",
                             why.format(LAUNCHES["engine_layer"]) + " (sort, gathers, combine)")
    out["copy_call_s"] = _scalar(LAUNCHES["expert_copy"] * spec.launch_s, "derived",
                                 why.format(LAUNCHES["expert_copy"]) + " (one copy per weight tensor)")
    out["expert_call_s"] = _scalar(LAUNCHES["expert_call"] * spec.launch_s, "derived",
                                   why.format(LAUNCHES["expert_call"]) + " (one expert's matmul chain)")
    out["forward_s"] = _scalar(FORWARD_S, "derived", "the decoding loop's host work per forward, measured on a 2-core x86 VM")
    out["miss_call_s"] = _scalar(MISS_CALL_S, "derived", "host numpy per missed expert, measured on a 2-core x86 VM")
    return out


def build(spec: BoxSpec) -> dict[str, Any]:
    """The profile JSON of one box."""
    measured = _measured_source() if spec.name == "h200" else None
    shapes = [ModelShape.named(m) for m in MODELS]
    tag = {"llada2-mini": "mini", "llada2-flash": "flash"}

    def bandwidth(direction: str, kind: str) -> dict[str, Any]:
        peak = (spec.h2d_gbps if direction == "h2d" else spec.d2h_gbps)[kind]
        sizes, gbps, src = list(TRANSFER_SIZES), [], []
        m = measured[f"{direction}_GBps"] if measured else {}
        by_size = {6291456: f"mini/{kind}", 25165824: f"flash/{kind}", 1 << 30: f"1GiB/{kind}"}
        for s in sizes:
            key = by_size.get(s)
            if key in m:
                gbps.append(m[key])
                src.append("measured")
            else:
                gbps.append(transfer_gbps(spec, peak, s))
                src.append("derived")
        return {"source": src if len(set(src)) > 1 else src[0], "bytes": sizes, "gbps": gbps}

    gpu_experts, cpu_ffn, non_expert = {}, {}, {}
    for shape in shapes:
        key = shape.expert_shape_key
        m256 = None
        if measured:
            m256 = {int(k): v for k, v in measured["gpu_bmm256_layer_s"][tag[shape.name]]["bf16"].items()}
        gpu_experts[key] = {DTYPE_GPU: gpu_group_table(spec, shape, m256)}
        cpu_ffn[key] = {}
        for dt in ("bfloat16", "float32"):
            if measured:
                pts = measured["cpu_expert_ffn_s"][tag[shape.name]][dt]
                cpu_ffn[key][dt] = {"source": "measured", "tokens": [int(k) for k in pts], "seconds": list(pts.values())}
            else:
                cpu_ffn[key][dt] = {"source": "derived", "tokens": list(TOKENS),
                                    "seconds": [cpu_expert_s(spec, shape, dt, n) for n in TOKENS]}
        non_expert[shape.model_key] = non_expert_tables(spec, shape)
    about = (f"{spec.gpu}, PCIe {spec.pcie}, {spec.cpu}. "
             + ("Transfers at 6 MB, 25 MB and 1 GiB, CPU expert FFN times and the 256-expert grouped GPU times are "
                "measured (traces/data/profiles/h200-pcie5-measured.source.json; CPU times are cache-warm medians with "
                "16 threads); everything else is derived from public specifications by traces.derive."
                if measured else "Derived from public specifications by traces.derive; nothing measured."))
    gpu_mem_src = "measured" if measured else "derived"
    return {
        "format": FORMAT, "version": VERSION, "name": spec.name, "about": about,
        "box": {"gpu": spec.gpu, "cpu": spec.cpu, "pcie": spec.pcie},
        "fast_device": "cuda",
        "capacities": {
            "gpu_mem_bytes": _scalar(spec.gpu_mem_bytes, gpu_mem_src),
            "host_mem_bytes": _scalar(spec.host_mem_bytes, gpu_mem_src),
            "cpu_cores": _scalar(spec.cpu_cores, gpu_mem_src),
            "host_mem_bw_gbps": _scalar(spec.host_mem_bw_gbps, "derived", "peak DRAM bandwidth from the platform's specification"),
            "gpu_mem_bw_gbps": _scalar(spec.gpu_mem_bw_gbps, "derived", "peak from the GPU's specification"),
        },
        "overheads": {
            "launch_s": _scalar(spec.launch_s, "derived", "eager PyTorch dispatch and launch of one kernel"),
            "sync_s": _scalar(spec.sync_s, "derived", "one host-device synchronisation: the routing reaching the host"),
            "cpu_task_s": _scalar(spec.cpu_task_s, "derived", "dispatching one expert's work on the CPU"),
        },
        "host": host_costs(spec),
        "drive": DRIVES[spec.drive].section(),
        "h2d": {k: bandwidth("h2d", k) for k in ("pinned", "pageable")},
        "d2h": {k: bandwidth("d2h", k) for k in ("pinned", "pageable")},
        "gpu_experts": gpu_experts,
        "cpu_expert_ffn": cpu_ffn,
        "non_expert": non_expert,
    }


