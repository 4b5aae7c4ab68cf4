"""Model shapes: what the cost model, the planner and the trace readers need to know
about a LLaDA2.0 architecture (layers, experts, sizes, bytes), from a name or any
checkpoint's ``config.json``.

Sizes follow the published modeling code: fused QKV, GQA, per-head q/k RMSNorm,
dense first ``first_k_dense_replace`` layers, MoE layers with ``num_experts`` routed
SwiGLU experts of ``moe_intermediate_size`` plus shared experts of
``moe_intermediate_size * num_shared_experts``, an fp32 ``expert_bias``, untied ``lm_head``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from traces.common.errors import TideError
from traces.common.files import read_json
from traces.common.values import need_bool, need_dict, need_int

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}

#: Names the bundled architectures answer to.
MODEL_NAMES: dict[str, str] = {
    "llada2-mini": "llada2-mini.config.json",
    "llada2-flash": "llada2-flash.config.json",
    "mini": "llada2-mini.config.json",
    "flash": "llada2-flash.config.json",
}

_REQUIRED = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
    "vocab_size",
)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name; unknown names are a TideError."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise TideError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_BYTES)})") from None


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts of one LLaDA2.0-style MoE model."""

    name: str
    layers: int
    first_k_dense: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    moe_intermediate: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    shared_experts: int
    vocab: int
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str | None = None, source: str = "config") -> "ModelShape":
        """Build from a Hugging Face ``config.json`` dict; a missing or bad field is a TideError."""
        if not isinstance(config, Mapping):
            raise TideError(f"{source}: a model config is a JSON object, got {type(config).__name__}")
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise TideError(f"{source}: config lacks {', '.join(missing)}")
        c = {k: need_int(config[k], f"{source}: {k}", lo=1) for k in _REQUIRED}

        def opt(key: str, default: int, lo: int) -> int:
            v = config.get(key)
            return default if v is None else need_int(v, f"{source}: {key}", lo=lo)

        heads, hidden = c["num_attention_heads"], c["hidden_size"]
        head_dim = opt("head_dim", hidden // heads, 1)
        experts, top_k = c["num_experts"], c["num_experts_per_tok"]
        n_group = opt("n_group", 1, 1)
        topk_group = opt("topk_group", n_group, 1)
        first_k = opt("first_k_dense_replace", 0, 0)
        shared = opt("num_shared_experts", 0, 0)
        if head_dim < 1:
            raise TideError(f"{source}: hidden_size {hidden} / num_attention_heads {heads} leaves no head dimension")
        if top_k > experts:
            raise TideError(f"{source}: num_experts_per_tok {top_k} exceeds num_experts {experts}")
        if experts % n_group:
            raise TideError(f"{source}: num_experts {experts} is not a multiple of n_group {n_group}")
        if topk_group > n_group:
            raise TideError(f"{source}: topk_group {topk_group} exceeds n_group {n_group}")
        if top_k > topk_group * (experts // n_group):
            raise TideError(f"{source}: top-{top_k} cannot be chosen from {topk_group} groups of {experts // n_group}")
        if n_group > 1 and experts // n_group < 2:
            raise TideError(f"{source}: n_group {n_group} leaves fewer than 2 experts per group (groups are scored by their top 2)")
        if not first_k < c["num_hidden_layers"]:
            raise TideError(f"{source}: first_k_dense_replace {first_k} leaves no MoE layer")
        if heads % c["num_key_value_heads"]:
            raise TideError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
        for key in ("tie_word_embeddings", "use_qk_norm"):
            if config.get(key) is not None:
                need_bool(config[key], f"{source}: {key}")
        label = name if name is not None else config.get("name") or config.get("_name_or_path") or "custom"
        return cls(
            name=str(label), layers=c["num_hidden_layers"], first_k_dense=first_k, hidden=hidden, heads=heads,
            kv_heads=c["num_key_value_heads"], head_dim=head_dim,
            intermediate=c["intermediate_size"], moe_intermediate=c["moe_intermediate_size"],
            experts=experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
            shared_experts=shared, vocab=c["vocab_size"],
            config=dict(config),
        )

    @classmethod
    def named(cls, name: str) -> "ModelShape":
        """One of the bundled architectures: ``llada2-mini`` or ``llada2-flash``."""
        try:
            fname = MODEL_NAMES[name.lower()]
        except KeyError:
            raise TideError(f"unknown model {name!r} (expected llada2-mini or llada2-flash, or a config.json)") from None
        text = resources.files("traces.data.models").joinpath(fname).read_text()
        canonical = "llada2-" + fname.split("-")[1].split(".")[0]
        return cls.from_config(json.loads(text), name=canonical, source=fname)

    @classmethod
    def load(cls, ref: str | Path) -> "ModelShape":
        """A bundled name, a ``config.json`` path, or a checkpoint folder holding one."""
        if str(ref).lower() in MODEL_NAMES:
            return cls.named(str(ref))
        path = Path(ref)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise TideError(f"{ref}: unknown model: not a bundled name (llada2-mini, llada2-flash) "
                            "nor a config.json or checkpoint folder")
        config = need_dict(read_json(path, "model config"), f"{path}")
        label = config.get("name") if isinstance(config.get("name"), str) else path.parent.name
        return cls.from_config(config, name=label, source=str(path))

    def replace(self, **config_overrides: Any) -> "ModelShape":
        """A reduced or altered shape (tests use fewer layers, experts, smaller sizes)."""
        cfg = dict(self.config)
        cfg.update(config_overrides)
        return ModelShape.from_config(cfg, name=config_overrides.get("name", self.name))

    # ---- derived facts ------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        """Model layer indices of the MoE layers (the first ``first_k_dense`` are dense)."""
        return list(range(self.first_k_dense, self.layers))

    @property
    def n_moe_layers(self) -> int:
        return self.layers - self.first_k_dense

    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    def expert_bytes(self, dtype: str = "bfloat16") -> int:
        return self.expert_params() * dtype_bytes(dtype)

    def routed_expert_bytes(self, dtype: str = "bfloat16") -> int:
        """All routed experts of all MoE layers."""
        return self.expert_bytes(dtype) * self.experts * self.n_moe_layers

    def attention_params(self) -> int:
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        out = self.heads * self.head_dim * self.hidden
        qk_norm = 2 * self.head_dim if self.config.get("use_qk_norm", True) else 0
        return qkv + out + qk_norm + 2 * self.hidden  # + input and post-attention RMSNorm

    def non_expert_params(self) -> int:
        """Everything but routed experts (the expert_bias, kept in fp32, counted apart)."""
        embed = self.vocab * self.hidden
        head = 0 if self.config.get("tie_word_embeddings") else self.vocab * self.hidden
        dense_mlp = 3 * self.hidden * self.intermediate
        shared = 3 * self.hidden * self.moe_intermediate * self.shared_experts
        gate = self.experts * self.hidden
        per_layer = self.attention_params()
        return (embed + head + self.hidden + self.layers * per_layer
                + self.first_k_dense * dense_mlp + self.n_moe_layers * (shared + gate))

    def non_expert_bytes(self, dtype: str = "bfloat16") -> int:
        """Weights that always live on the fast device: all but routed experts."""
        return self.non_expert_params() * dtype_bytes(dtype) + self.n_moe_layers * self.experts * 4

    def total_params(self) -> int:
        return self.non_expert_params() + self.n_moe_layers * (self.experts * (self.expert_params() + 1))

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Keys and values of one token over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes(dtype)

    @property
    def expert_shape_key(self) -> str:
        """Key of the expert FFN shape in hardware profiles: ``hidden x moe_intermediate``."""
        return f"{self.hidden}x{self.moe_intermediate}"

    @property
    def model_key(self) -> str:
        """Key of the non-expert shape in hardware profiles (what non-expert time depends on)."""
        return (f"h{self.hidden}-a{self.heads}x{self.kv_heads}x{self.head_dim}-d{self.intermediate}"
                f"-s{self.shared_experts}x{self.moe_intermediate}-e{self.experts}-v{self.vocab}")

    def arch_config(self) -> dict[str, Any]:
        """The config dict recorded in traces and plans (enough to rebuild this shape)."""
        return dict(self.config)

    def summary(self, dtype: str = "bfloat16") -> dict[str, Any]:
        return {
            "name": self.name, "layers": self.layers, "moe_layers": self.n_moe_layers,
            "experts": self.experts, "top_k": self.top_k, "hidden": self.hidden,
            "moe_intermediate": self.moe_intermediate, "dtype": dtype,
            "expert_bytes": self.expert_bytes(dtype),
            "routed_expert_bytes": self.routed_expert_bytes(dtype),
            "non_expert_bytes": self.non_expert_bytes(dtype),
            "kv_bytes_per_token": self.kv_bytes_per_token(dtype),
            "total_params": self.total_params(),
        }
