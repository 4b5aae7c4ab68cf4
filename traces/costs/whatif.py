"""What-if boxes: a hardware profile with one or more knobs turned.

The sweeps and notebooks ask how a box would do with a faster link, more CPU cores or more
memory. :func:`scale_profile` answers from a profile (measured or derived), changing only
what the knob touches, and marks every changed value ``derived`` with a note saying how:

* ``pcie``: every host-device bandwidth times ``pcie`` (2 = PCIe gen4 -> gen5);
* ``cpu_cores``: the CPU's compute times ``cpu_cores``: each CPU expert time above the
  per-task overhead divides by it, but never below what host memory bandwidth allows
  (reading the expert's weights once), since more cores do not add memory bandwidth;
* ``gpu_mem_gb`` / ``host_mem_gb``: the capacities, in GB (1e9 bytes);
* ``drive``: another drive (a key of :data:`traces.costs.boxes.DRIVES`, from its datasheet).
"""
from __future__ import annotations

import copy

import numpy as np

from traces.common.errors import TideError
from traces.formats.profile_file import Profile
from traces.formats.shapes import dtype_bytes


def scale_profile(profile: Profile, pcie: float = 1.0, cpu_cores: float = 1.0, gpu_mem_gb: float | None = None,
                  host_mem_gb: float | None = None, drive: str | None = None) -> Profile:
    """A copy of ``profile`` with the knobs turned (all at their defaults: an equal copy)."""
    for name, v in (("pcie", pcie), ("cpu_cores", cpu_cores), ("gpu_mem_gb", gpu_mem_gb), ("host_mem_gb", host_mem_gb)):
        if v is not None and not v > 0:
            raise TideError(f"--{name.replace('_', '-')} must be positive, got {v}")
    d = copy.deepcopy(profile.data)
    notes = []
    if pcie != 1.0:
        for direction in ("h2d", "d2h"):
            for table in d[direction].values():
                table["gbps"] = [g * pcie for g in table["gbps"]]
                table["source"] = "derived"
        notes.append(f"PCIe x{pcie:g}")
    if cpu_cores != 1.0:
        task = d["overheads"]["cpu_task_s"]["value"]
        bw = d["capacities"]["host_mem_bw_gbps"]["value"] * 1e9
        for key, per_dtype in d["cpu_expert_ffn"].items():
            hidden, inter = (int(v) for v in key.split("x"))
            for dtype, table in per_dtype.items():
                floor = task + 3 * hidden * inter * dtype_bytes(dtype) / bw
                s = np.asarray(table["seconds"], dtype=np.float64)
                scaled = task + (s - task) / cpu_cores
                table["seconds"] = np.minimum(s, np.maximum(scaled, floor)).tolist() if cpu_cores > 1 else scaled.tolist()
                table["source"] = "derived"
        d["capacities"]["cpu_cores"] = {"value": d["capacities"]["cpu_cores"]["value"] * cpu_cores,
                                        "source": "derived", "note": f"x{cpu_cores:g}"}
        notes.append(f"CPU cores x{cpu_cores:g}")
    for cap, gb, label in (("gpu_mem_bytes", gpu_mem_gb, "GPU memory"), ("host_mem_bytes", host_mem_gb, "host memory")):
        if gb is not None:
            d["capacities"][cap] = {"value": gb * 1e9, "source": "derived", "note": "what-if"}
            notes.append(f"{label} {gb:g} GB")
    if drive is not None:
        from traces.costs.boxes import DRIVES
        if drive not in DRIVES:
            raise TideError(f"--drive: unknown drive {drive!r} (expected one of {', '.join(DRIVES)})")
        d["drive"] = DRIVES[drive].section()
        notes.append(f"{drive} drive")
    if notes:
        d["name"] = f"{profile.name} ({', '.join(notes)})"
        # the text as it has always read ("traces.whatif"): a profile's hash keys sweep points
        d["about"] = f"{d.get('about', '')} What-if: {', '.join(notes)} (traces.whatif).".strip()
    return Profile(d, where=f"{profile.where} (what-if)")
