"""Turning a user's placement settings into a Policy: one implementation for the runtime's
and the simulator's command lines (``--policy --tau --gpu-experts --gpu-mem-gb --plan``)."""
from __future__ import annotations

from typing import Sequence

from traces.errors import TideError
from traces.plan import Plan
from traces.policies import POLICIES, Policy
from traces.shapes import ModelShape
from traces.values import need_float


def parse_budget(text: str | None) -> int | list[int] | None:
    """``--gpu-experts``: one integer, or one per MoE layer separated by commas."""
    if text is None:
        return None
    try:
        vals = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise TideError("--gpu-experts: one integer, or one per MoE layer separated by commas") from None
    return vals[0] if len(vals) == 1 else vals


def resolve_policy(name: str, shape: ModelShape, dtype: str, *, tau: int | None = None,
                   gpu_experts: int | Sequence[int] | None = None, gpu_mem_gb: float | None = None,
                   plan: str | None = None, kv_tokens: int = 0, mem_limit_bytes: float | None = None) -> Policy:
    """Validate the flags together and build the policy; a budget that cannot fit is a TideError.

    The budget is ``--gpu-experts`` per layer, or what fits in ``--gpu-mem-gb`` after the
    non-expert weights and a KV cache of ``kv_tokens``. ``mem_limit_bytes`` (the device's or
    the profile's memory) is checked when no ``--gpu-mem-gb`` is given.
    """
    if name not in POLICIES:
        raise TideError(f"--policy: unknown policy {name!r} (expected one of {', '.join(POLICIES)})")
    if tau is not None and tau < 1:
        raise TideError(f"--tau must be at least 1, got {tau}")
    if gpu_experts is not None and gpu_mem_gb is not None:
        raise TideError("give --gpu-experts or --gpu-mem-gb, not both")
    if gpu_mem_gb is not None:
        need_float(gpu_mem_gb, "--gpu-mem-gb", positive=True)
        if mem_limit_bytes is not None and gpu_mem_gb * 1e9 > mem_limit_bytes:
            raise TideError(f"--gpu-mem-gb {gpu_mem_gb:g}: more than the device's memory ({mem_limit_bytes / 1e9:.1f} GB)")
    L, E = shape.n_moe_layers, shape.experts
    budget: int | Sequence[int] | None = gpu_experts
    if name == "plan":
        if plan is None:
            raise TideError("--policy plan needs --plan FILE")
        p = Plan.read(plan)
        pol = p.policy(shape)
        budget, tau = pol.budget, pol.tau
    elif plan is not None:
        raise TideError("--plan needs --policy plan")
    elif budget is None and gpu_mem_gb is not None and name not in ("all", "cpu"):
        budget = shape.experts_fitting(gpu_mem_gb * 1e9, dtype, kv_tokens=kv_tokens)
        if budget < 1:
            raise TideError(f"--gpu-mem-gb {gpu_mem_gb}: the non-expert weights ({shape.non_expert_bytes(dtype) / 1e9:.2f} GB) "
                            "and KV cache leave no room for one expert per layer")
    if name == "tide" and tau is None:
        tau = 1
    policy = Policy.make(name, L, E, budget=budget, tau=tau if name in ("tide", "plan") else None)
    need = (shape.non_expert_bytes(dtype) + kv_tokens * shape.kv_bytes_per_token(dtype)
            + int(policy.budget.sum()) * shape.expert_bytes(dtype))
    limit = gpu_mem_gb * 1e9 if gpu_mem_gb is not None else mem_limit_bytes
    if limit is not None and need > limit:
        raise TideError(f"budget does not fit: {need / 1e9:.2f} GB of weights, expert slots and KV cache, "
                        f"{limit / 1e9:.2f} GB available")
    return policy
