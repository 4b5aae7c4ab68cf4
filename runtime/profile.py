"""The hardware profiler: measures this box in the profile format of ``traces.formats.profile_file``.

``python -m runtime.profile --out FILE [--checkpoint DIR] [--device cuda|cpu] [--quick]``

Measures capacities, transfer bandwidth against size (pinned and pageable, both
directions; host copies when the fast device is the CPU), the engine's grouped expert
computation on the fast device over experts x tokens, one expert's FFN on the CPU against
tokens (per weight dtype), a MoE layer's and a dense layer's non-expert time against tokens
and context, the head's time against tokens, and overheads (launch, synchronisation, CPU
expert dispatch). Shapes come from the checkpoint's ``config.json`` (LLaDA2.0-mini's when
none is given); weights are random, since times do not depend on values. Every value is
marked ``measured``. ``--quick`` keeps grids small (under a minute on 2 cores). With
``--checkpoint``, the drive holding it is measured too (:mod:`runtime.profile_drive`); a
checkpoint larger than this machine's memory is not loaded (the in-run step uses a stand-in
of its shape).
"""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from runtime.calibrate import BATCH_PROMPTS, BATCH_SIZES, QUICK_BATCH_PROMPTS, QUICK_BATCH_SIZES, InRunCalibration
from runtime.checkpoint import dtype_name, torch_dtype
from runtime.config import ModelConfig
from runtime.device import check_device, give_back_freed_memory, host_memory_bytes, speed_reference_s
from runtime.model import LLaDA2
from runtime.profile_host import HostCosts
from runtime.profile_tables import TableBench, measured, measured_where, timer
from traces.common.cli import ArgumentParser, run_cli
from traces.common.files import check_out_path
from traces.formats.profile_file import FORMAT, VERSION, Profile
from traces.formats.shapes import ModelShape


class Profiler(TableBench, HostCosts, InRunCalibration):
    """Measures a box: the tables (:mod:`runtime.profile_tables`), the engine's host costs
    (:mod:`runtime.profile_host`) and their level inside a run (:mod:`runtime.calibrate`)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, quick: bool, progress: bool = True,
                 model: LLaDA2 | None = None, batches: bool = True, spread_s: float | None = None,
                 full_batches: bool | None = None):
        self.cfg, self.device, self.dtype, self.quick, self.model = cfg, device, dtype, quick, model
        self.batches = batches  # measure what a batch adds per request (member_s)
        self.reps = 3 if quick else 7
        full = not quick if full_batches is None else full_batches  # the batch calibration's workload
        self.batch_prompts = BATCH_PROMPTS if full else QUICK_BATCH_PROMPTS
        self.batch_sizes = BATCH_SIZES if full else QUICK_BATCH_SIZES
        self.cycles = 1 if quick else 5  # the in-run replays' turns (runtime.calibrate): quick, one after the warm-up
        # the in-run replays go on for this long at least, to see the box's slow phases too
        self.spread_s = (2.0 if quick else 10.0) if spread_s is None else spread_s
        # Every cell is timed for tens of milliseconds (its median), never rescaled: the speed
        # reference is only recorded, so that a validation can report how the box moved since.
        self.time = timer(device, 0.02 if quick else 0.1)
        self.reference_s = speed_reference_s()
        self.bar = tqdm(total=8, desc="profiling", disable=not progress)

    def _step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    # ---- transfers -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        h2d, d2h = self.bandwidths()
        gpu_experts = self.gpu_experts()
        cpu_ffn = self.cpu_expert_ffn()
        non_expert = self.non_expert()
        over = self.overheads()
        cuda = self.device.type == "cuda"
        host_mem = host_memory_bytes()
        gpu_mem = torch.cuda.get_device_properties(self.device).total_memory if cuda else host_mem
        host_bw = self.memory_bandwidth(torch.device("cpu"))
        gpu_bw = self.memory_bandwidth(self.device) if cuda else host_bw
        key = self.cfg.shape.expert_shape_key
        name = f"{socket.gethostname()}-{self.device.type}"
        data = {
            "format": FORMAT, "version": VERSION, "name": name,
            "measured": {**measured_where(), "reference_s": self.reference_s},
            "about": (f"Measured by runtime.profile on {platform.node()} ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                      f"{torch.cuda.get_device_name(self.device) if cuda else 'fast device = CPU'}, "
                      f"{'quick' if self.quick else 'full'} grids, dtype {dtype_name(self.dtype)}, model {self.cfg.shape.name}."),
            "box": {"gpu": torch.cuda.get_device_name(self.device) if cuda else "none (CPU)",
                    "cpu": platform.processor() or platform.machine(), "pcie": "unknown"},
            "fast_device": "cuda" if cuda else "cpu",
            "capacities": {"gpu_mem_bytes": measured(gpu_mem), "host_mem_bytes": measured(host_mem),
                           "cpu_cores": measured(os.cpu_count() or 1), "host_mem_bw_gbps": measured(host_bw),
                           "gpu_mem_bw_gbps": measured(gpu_bw)},
            "overheads": over,
            "h2d": h2d, "d2h": d2h,
            "gpu_experts": {key: gpu_experts},
            "cpu_expert_ffn": {key: cpu_ffn},
            "non_expert": non_expert,
        }
        data["host"] = {**self.host_costs(), "forward_s": measured(0.0)}
        forward_s, in_run = self.in_run(data)
        data["host"]["forward_s"] = {**measured(forward_s), "note": "measured with runtime.decoding.Generator, per forward"}
        if in_run:
            data["in_run"] = in_run
        self._step("in a run")
        self.bar.close()
        return data


def in_run_text(prof: Profile) -> str:
    """A profile's in-run factors (``dense x1.38, ...``) and batch member costs, or ''."""
    f = prof.data.get("in_run") or {}
    parts = ", ".join(f"{k} x{v:.2f}" for k, v in f.items() if k not in ("note", "member_s", "replay_s"))
    member = f.get("member_s") or {}
    more = ("; each further request of a batched forward adds " + ", ".join(
        f"{k} {1e3 * v:.2f} ms" for k, v in member.items())) if member else ""
    return parts + more


def in_run_line(prof: Profile) -> str:
    """The in-run factors of a profile, as one line (what its tables were scaled by)."""
    text = in_run_text(prof)
    return f"in-run level (tables scaled by measured over priced in a replay): {text}" if text else \
        "in-run level: none applied (a GPU's work is timed on the device)"


def profile_box(cfg: ModelConfig, device: torch.device, dtype: str, quick: bool, progress: bool = True,
                model: LLaDA2 | None = None, batches: bool = True, spread_s: float | None = None,
                full_batches: bool | None = None) -> Profile:
    """Measure this box for ``cfg``'s shapes; with ``model`` (loaded, experts in host memory)
    the decoding loop's host cost is measured on that model itself, and with ``batches`` what
    a batched forward adds per request; each in-run replay repeats for ``spread_s`` seconds at
    least (default 2 quick, 10 full); ``full_batches`` (default: not ``quick``) takes the batch
    terms on the full batch workload (:data:`runtime.calibrate.BATCH_PROMPTS`) with quick grids."""
    data = Profiler(cfg, device, torch_dtype(dtype), quick, progress, model, batches, spread_s, full_batches).run()
    give_back_freed_memory()  # the tables' temporaries, gigabytes at large shapes: no run reuses them
    return Profile(data, where="measured profile")


def fits_in_memory(cfg: ModelConfig, dtype: str, share: float = 0.8) -> bool:
    """Whether the whole model fits in ``share`` of this machine's memory (else the profiler
    leaves its experts on the drive and calibrates on a stand-in)."""
    s = cfg.shape
    return s.non_expert_bytes(dtype) + s.routed_expert_bytes(dtype) <= share * host_memory_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m runtime.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", default=None, help="take the model shape from this checkpoint (default: LLaDA2.0-mini)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on a GPU) or float32 (default on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small grids: under a minute on 2 cores")
    a = ap.parse_args(argv)
    check_out_path(a.out)
    device = check_device(a.device)
    cfg = ModelConfig.load(a.checkpoint) if a.checkpoint else ModelConfig.from_dict(ModelShape.named("llada2-mini").config)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    t0 = time.perf_counter()
    model = None
    if a.checkpoint:  # the in-run step replays the checkpoint itself (experts in host memory, as the engine keeps them)
        from runtime.checkpoint import load_model
        whole = fits_in_memory(cfg, dtype)
        if not whole:
            print(f"note: {a.checkpoint} is larger than this machine's memory: the in-run step replays its non-expert "
                  "weights with stand-in experts", file=sys.stderr)
        model = load_model(a.checkpoint, device=device, dtype=dtype, experts_device="cpu",
                           drive_layers=() if whole else cfg.shape.moe_layers)
    prof = profile_box(cfg, device, dtype, a.quick, model=model)
    if a.checkpoint:  # the drive its experts are read from (a host tier's third tier)
        from runtime.profile_drive import drive_line, with_drive
        prof = with_drive(prof, a.checkpoint, cfg, a.quick)
        print(drive_line(prof.data["drive"]))
    prof.write(a.out)
    s = prof.summary()
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s: {s['name']}, fast device {s['fast_device']}, "
          f"h2d pinned up to {s['h2d_pinned_gbps_max']:.1f} GB/s, launch {s['launch_s'] * 1e6:.1f} us")
    print(in_run_line(prof))
    return 0


if __name__ == "__main__":
    run_cli(main)
