"""Random-weight checkpoints in the published LLaDA2.0 layout.

``python -m runtime.make_checkpoint --preset tiny|mini|flash --out DIR --seed S [--layers N]
[--router-skew S] [--dtype bfloat16] [--shard-gb 2]``

``tiny`` (4 layers, 32 experts, hidden 64, vocabulary 512) runs the tests on 2 cores;
``mini`` is LLaDA2.0-mini's real shape (32 GB in bf16); ``flash`` (200 GB) only with
``--layers``. Linear and embedding weights are ``N(0, initializer_range)``, norms are
ones, and each MoE layer's ``expert_bias`` is ``router_skew x N(0, 1)``, so expert
popularity is skewed like a trained router's. Checkpoints larger than ``--shard-gb`` are
sharded with a ``model.safetensors.index.json``. The folder appears whole or not at all.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from runtime.checkpoint import expected_tensors, torch_dtype
from runtime.config import ModelConfig
from traces.common import checks
from traces.common.checks import check_seed
from traces.common.cli import ArgumentParser, integer, number, run_cli
from traces.common.errors import TideError
from traces.common.files import check_out_path, remove_stale, temp_name
from traces.formats.shapes import ModelShape

TINY: dict[str, Any] = {
    "name": "llada2-tiny", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "vocab_size": 512,
    "mask_token_id": 511, "eos_token_id": 510, "pad_token_id": 510, "initializer_range": 0.3, "rotary_dim": 8,
    "max_position_embeddings": 4096,
}


def preset_config(preset: str, layers: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a preset, optionally with fewer layers."""
    if preset not in ("tiny", "mini", "flash"):
        raise TideError(f"--preset: unknown preset {preset!r} (expected tiny, mini or flash)")
    base = dict(ModelShape.named("llada2-mini" if preset != "flash" else "llada2-flash").config)
    if preset == "tiny":
        base.update(TINY)
    if preset == "flash" and layers is None:
        raise TideError("--layers: the flash preset is 200 GB; give --layers N to reduce it")
    if layers is not None:
        first = base.get("first_k_dense_replace", 0)
        if layers <= first:
            raise TideError(f"--layers: need more than {first} layer(s) to keep a MoE layer")
        base["num_hidden_layers"] = layers
        base["max_window_layers"] = min(base.get("max_window_layers", layers), layers)
        base["name"] = f"{base.get('name', preset)}-{layers}l"
    base.setdefault("architectures", ["LLaDA2MoeModelLM"])
    return base


def random_tensors(cfg: ModelConfig, seed: int, dtype: torch.dtype, router_skew: float,
                   init_std: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, made one at a time (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("expert_bias"):
            yield name, (torch.randn(shape, generator=gen) * router_skew).float()
        elif "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm weights
            yield name, torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, dtype=dtype)
        else:
            yield name, (torch.randn(shape, generator=gen) * init_std).to(dtype)


def random_model(config: dict[str, Any], seed: int = 0, dtype: str = "bfloat16", router_skew: float = 0.0,
                 device: str | torch.device = "cpu", experts_device: str | torch.device = "cpu"):
    """The model a checkpoint written with the same arguments holds, built in memory (no disk)."""
    from runtime.checkpoint import build_model
    cfg = ModelConfig.from_dict(config, source="preset")
    init_std = float(config.get("initializer_range", 0.02))
    items = ((n, t, "random") for n, t in random_tensors(cfg, seed, torch_dtype(dtype), router_skew, init_std))
    return build_model(cfg, items, device=device, dtype=dtype, experts_device=experts_device)


def write_checkpoint(out: str | Path, config: dict[str, Any], seed: int = 0, dtype: str = "bfloat16",
                     router_skew: float = 0.0, shard_bytes: float = 2e9, progress: bool = False) -> Path:
    """Write a random checkpoint to ``out`` (which must not hold files yet)."""
    out = check_out_path(out, "--out", folder=True)
    if out.exists() and any(out.iterdir()):
        raise TideError(f"--out {out}: folder exists and is not empty")
    check_seed(seed)
    cfg = ModelConfig.from_dict(config, source="preset")
    tdtype = torch_dtype(dtype)
    config = dict(config, torch_dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # half-written folders of killed runs
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(out), suffix=".tmp", dir=out.parent))
    try:
        total = sum(torch.Size(s).numel() for s in expected_tensors(cfg).values())
        bar = tqdm(total=total, unit="param", unit_scale=True, desc="writing", disable=not progress)
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        names: list[tuple[int, str]] = []

        def flush(i: int) -> None:
            save_file(shards[i], str(tmp / f"shard-{i}.safetensors"), metadata={"format": "pt"})
            shards[i] = {}

        init_std = float(config.get("initializer_range", 0.02))
        for name, t in random_tensors(cfg, seed, tdtype, router_skew, init_std):
            nbytes = t.numel() * t.element_size()
            if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                flush(len(shards) - 1)
                shards.append({})
                sizes.append(0)
            shards[-1][name] = t.contiguous()
            sizes[-1] += nbytes
            names.append((len(shards) - 1, name))
            bar.update(t.numel())
        flush(len(shards) - 1)
        bar.close()
        n = len(shards)
        if n == 1:
            (tmp / "shard-0.safetensors").rename(tmp / "model.safetensors")
        else:
            fname = lambda i: f"model-{i + 1:05d}-of-{n:05d}.safetensors"  # noqa: E731
            for i in range(n):
                (tmp / f"shard-{i}.safetensors").rename(tmp / fname(i))
            index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": {nm: fname(i) for i, nm in names}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m runtime.make_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help="tiny, mini or flash")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=checks.seed, default=0)
    ap.add_argument("--layers", type=integer, default=None, help="keep only the first N layers")
    ap.add_argument("--router-skew", type=number, default=0.0, help="expert_bias = S x N(0, 1) per MoE layer")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default for mini/flash) or float32 (default for tiny)")
    ap.add_argument("--shard-gb", type=number, default=2.0, help="largest shard, GB")
    a = ap.parse_args(argv)
    if a.shard_gb <= 0:
        raise TideError("--shard-gb must be positive")
    config = preset_config(a.preset, a.layers)
    dtype = a.dtype or ("float32" if a.preset == "tiny" else "bfloat16")
    t0 = time.perf_counter()
    out = write_checkpoint(a.out, config, a.seed, dtype, a.router_skew, a.shard_gb * 1e9, progress=True)
    shape = ModelShape.from_config(config)
    print(f"wrote {out}: {shape.name}, {shape.total_params() / 1e9:.3f}B parameters in {dtype}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
