"""The runtime's view of a checkpoint's ``config.json``: the shape plus what the math needs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from traces.common.errors import TideError
from traces.common.files import read_json
from traces.common.values import need_bool, need_dict, need_float, need_int, need_list, need_str
from traces.formats.shapes import ModelShape

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
        def opt(key: str, default: Any, check: Any, **kw: Any) -> Any:
            v = cfg.get(key)
            return default if v is None else check(v, f"{source}: {key}", **kw)

        if opt("model_type", "llada2_moe", need_str) != "llada2_moe":
            raise TideError(f"{source}: model_type {cfg.get('model_type')!r} is not llada2_moe")
        if opt("score_function", "sigmoid", need_str) != "sigmoid":
            raise TideError(f"{source}: score_function {cfg.get('score_function')!r} is not supported (LLaDA2.0 uses sigmoid)")
        if opt("hidden_act", "silu", need_str) != "silu":
            raise TideError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (LLaDA2.0 uses silu)")
        scaling = opt("rope_scaling", None, need_dict)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise TideError(f"{source}: rope_scaling {scaling!r} is not supported (LLaDA2.0 uses default RoPE)")
        factor = opt("partial_rotary_factor", 1.0, need_float, positive=True, hi=1.0)
        rope_dim = int(shape.head_dim * factor)
        if rope_dim % 2 or not 0 < rope_dim <= shape.head_dim:
            raise TideError(f"{source}: partial_rotary_factor gives rotary dim {rope_dim}, not an even number in 2..{shape.head_dim}")
        mask_id = opt("mask_token_id", MASK_ID, need_int)
        eos = cfg.get("eos_token_id", EOS_ID)
        if isinstance(eos, list):
            eos = need_list(eos, f"{source}: eos_token_id", nonempty=True)[0]
        eos = need_int(eos, f"{source}: eos_token_id")
        for name, v in (("mask_token_id", mask_id), ("eos_token_id", eos)):
            if not 0 <= v < shape.vocab:
                raise TideError(f"{source}: {name} {v} is outside the vocabulary of {shape.vocab} (set it in config.json)")
        flag = lambda key, default: opt(key, default, need_bool)  # noqa: E731
        return cls(
            shape=shape, rope_theta=opt("rope_theta", 600000.0, need_float, positive=True), rope_dim=rope_dim,
            rms_norm_eps=opt("rms_norm_eps", 1e-6, need_float, positive=True),
            routed_scaling_factor=opt("routed_scaling_factor", 1.0, need_float, positive=True),
            norm_topk_prob=flag("norm_topk_prob", True), use_qk_norm=flag("use_qk_norm", True),
            use_qkv_bias=flag("use_qkv_bias", False), use_bias=flag("use_bias", False),
            use_expert_bias=flag("moe_router_enable_expert_bias", True),
            tie_word_embeddings=flag("tie_word_embeddings", False), mask_id=mask_id, eos_id=eos,
        )

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise TideError(f"{folder}: no config.json (not a checkpoint folder)")
        cfg = need_dict(read_json(path, "model config"), str(path))
        return cls.from_dict(cfg, source=str(path))
