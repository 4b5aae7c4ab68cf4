"""Turning a user's placement settings into a Policy: one implementation for the runtime's
and the simulator's command lines (``--policy --tau --gpu-experts --gpu-mem-gb --plan``)."""
from __future__ import annotations

from typing import Sequence

from traces.common.errors import TideError
from traces.costs.memory import MemoryBudget
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.policies.spec import Policy, PolicyError, check_policy


def parse_budget(text: str | None) -> int | list[int] | None:
    """``--gpu-experts``: one integer, or one per MoE layer separated by commas."""
    if text is None:
        return None
    try:
        vals = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise TideError("--gpu-experts: one integer, or one per MoE layer separated by commas") from None
    return vals[0] if len(vals) == 1 else vals


#: How the runtime's and the simulator's flags name a policy's parameters.
FLAGS = {"policy": "--policy", "budget": "--gpu-experts", "tau": "--tau"}


def resolve_policy(name: str, shape: ModelShape, dtype: str, *, tau: int | None = None,
                   gpu_experts: int | Sequence[int] | None = None, gpu_mem_gb: float | None = None,
                   plan: str | None = None, kv_tokens: int = 0, mem_limit_bytes: float | None = None) -> Policy:
    """Validate the flags together and build the policy; a budget that cannot fit is a TideError.

    The budget is ``--gpu-experts`` per layer, or the largest uniform one that fits in
    ``--gpu-mem-gb`` beside the non-expert weights and a KV cache of ``kv_tokens``
    (:class:`traces.costs.memory.MemoryBudget`). ``mem_limit_bytes`` (the device's or the
    profile's memory) bounds ``--gpu-mem-gb`` and, without it, the budget.
    """
    check_policy(name)
    if tau is not None and tau < 1:
        raise TideError(f"--tau must be at least 1, got {tau}")
    if gpu_experts is not None and gpu_mem_gb is not None:
        raise TideError("give --gpu-experts or --gpu-mem-gb, not both")
    mem = MemoryBudget.on_device(shape, dtype, gpu_mem_gb, mem_limit_bytes, kv_tokens)
    limit = None if mem.limit_bytes == float("inf") else mem.limit_bytes
    if limit is not None and mem.fixed_bytes > limit:
        kv = kv_tokens * shape.kv_bytes_per_token(dtype)
        raise TideError(f"--gpu-mem-gb {limit / 1e9:g}: the non-expert weights ({shape.non_expert_bytes(dtype) / 1e9:.4f} GB) "
                        f"and the KV cache ({kv / 1e9:.4f} GB: {kv_tokens} tokens for the batch, see --batch-size) "
                        "alone leave no room for one expert per layer")
    L, E = shape.n_moe_layers, shape.experts
    budget: int | Sequence[int] | None = gpu_experts
    if name == "plan":
        if plan is None:
            raise TideError("--policy plan needs --plan FILE")
        policy = Policy.from_plan(Plan.read(plan), shape)
    elif plan is not None:
        raise TideError("--plan needs --policy plan")
    else:
        if budget is None and gpu_mem_gb is not None and name not in ("all", "cpu"):
            budget = mem.largest_uniform()
            if budget < 1:
                raise TideError(f"--gpu-mem-gb {gpu_mem_gb}: the non-expert weights ({shape.non_expert_bytes(dtype) / 1e9:.2f} GB) "
                                "and KV cache leave no room for one expert per layer")
        try:
            policy = Policy.make(name, L, E, budget=budget, tau=(1 if tau is None else tau) if name == "tide" else None)
        except PolicyError as exc:
            raise exc.for_flags(FLAGS) from None
    if limit is not None:
        mem.check(policy.budget, "budget")
    return policy
