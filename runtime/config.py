"""The runtime's view of a checkpoint's ``config.json``: the shape plus what the math needs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from traces.errors import TideError
from traces.shapes import ModelShape

#: The published mask and end-of-sequence token ids; a config may name others.
MASK_ID = 156895
EOS_ID = 156892


@dataclass(frozen=True)
class ModelConfig:
    shape: ModelShape
    rope_theta: float
    rope_dim: int
    rms_norm_eps: float
    routed_scaling_factor: float
    norm_topk_prob: bool
    use_qk_norm: bool
    use_qkv_bias: bool
    use_bias: bool
    use_expert_bias: bool
    tie_word_embeddings: bool
    mask_id: int
    eos_id: int

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        shape = ModelShape.from_config(cfg, name=cfg.get("name") or cfg.get("_name_or_path"), source=source)
        if cfg.get("model_type", "llada2_moe") not in ("llada2_moe",):
            raise TideError(f"{source}: model_type {cfg.get('model_type')!r} is not llada2_moe")
        if cfg.get("score_function", "sigmoid") != "sigmoid":
            raise TideError(f"{source}: score_function {cfg.get('score_function')!r} is not supported (LLaDA2.0 uses sigmoid)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise TideError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (LLaDA2.0 uses silu)")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise TideError(f"{source}: rope_scaling {scaling!r} is not supported (LLaDA2.0 uses default RoPE)")
        rope_dim = int(shape.head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        if rope_dim % 2 or not 0 < rope_dim <= shape.head_dim:
            raise TideError(f"{source}: partial_rotary_factor gives rotary dim {rope_dim}, not an even number in 2..{shape.head_dim}")
        mask_id = int(cfg.get("mask_token_id", MASK_ID))
        eos = cfg.get("eos_token_id", EOS_ID)
        eos = int(eos[0] if isinstance(eos, list) else eos)
        for name, v in (("mask_token_id", mask_id), ("eos_token_id", eos)):
            if not 0 <= v < shape.vocab:
                raise TideError(f"{source}: {name} {v} is outside the vocabulary of {shape.vocab} (set it in config.json)")
        return cls(
            shape=shape, rope_theta=float(cfg.get("rope_theta", 600000)), rope_dim=rope_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)), use_qk_norm=bool(cfg.get("use_qk_norm", True)),
            use_qkv_bias=bool(cfg.get("use_qkv_bias", False)), use_bias=bool(cfg.get("use_bias", False)),
            use_expert_bias=bool(cfg.get("moe_router_enable_expert_bias", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), mask_id=mask_id, eos_id=eos,
        )

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise TideError(f"{folder}: no config.json (not a checkpoint folder)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TideError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(cfg, source=str(path))
