"""Turning a user's placement settings into a Policy: one implementation for the runtime's
and the simulator's command lines (``--policy --tau --gpu-experts --gpu-mem-gb --plan``, and the
host tier's ``--host-mem-gb --host-policy --host-tau``)."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from traces.common.errors import TideError
from traces.costs.memory import MemoryBudget
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.policies.host import HostPolicy
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
FLAGS = {"policy": "--policy", "budget": "--gpu-experts", "tau": "--tau", "host_policy": "--host-policy",
         "host_budget": "--host-mem-gb", "host_tau": "--host-tau"}
#: The host tier's refresh interval without ``--host-tau``: its held set re-ranked every few
#: steps (every step would read in whatever one step's routing favoured).
HOST_TAU = 4


def add_host_flags(ap) -> None:
    """The host tier's flags, the same on every command that runs a placement."""
    from traces.common.cli import integer, number
    from traces.formats.vocabulary import HOST_KINDS
    ap.add_argument("--host-mem-gb", type=number, default=None,
                    help="host memory for experts (GB); below what the placement keeps there, each layer keeps the "
                         "largest host budget that fits and reads the rest from the drive (a plan's own host tier "
                         "otherwise)")
    ap.add_argument("--host-policy", default=None, choices=HOST_KINDS,
                    help="how host memory changes the experts it keeps (default tide; lru: what mapping the file gives)")
    ap.add_argument("--host-tau", type=integer, default=None, help=f"tide host tier: re-rank every this many steps "
                                                                   f"(default {HOST_TAU})")


def with_host(policy: Policy, mem: MemoryBudget, host_mem_gb: float | None, host_policy: str | None,
              host_tau: int | None, host_bytes: float | None) -> Policy:
    """The policy with its host tier: a plan's own unless ``--host-mem-gb`` is given; with it,
    the largest host budget every layer can have beside the placement's other needs (none
    when host memory holds them all). ``host_bytes``: the machine's memory, bounding the flag."""
    if host_mem_gb is None:
        if host_policy is not None or host_tau is not None:
            if policy.host is None:
                raise TideError("--host-policy and --host-tau need --host-mem-gb (or a plan with a host tier)")
            try:
                policy = policy.with_host(HostPolicy.make(host_policy or policy.host.kind, policy.n_layers,
                                                          mem.shape.experts, policy.host.budget,
                                                          host_tau if host_tau is not None else policy.host.tau))
            except PolicyError as exc:
                raise exc.for_flags(FLAGS) from None
        return policy
    limit = MemoryBudget.host_limit(host_mem_gb, host_bytes, "this machine")
    mem = replace(mem, host_limit_bytes=limit)
    h = mem.uniform_host_budget(policy.kinds, policy.budget)
    budgets = [h] * policy.n_layers
    if mem.host_need_bytes(policy.kinds, policy.budget, budgets) > limit:
        need = mem.host_need_bytes(policy.kinds, policy.budget, [0] * policy.n_layers)
        raise TideError(f"--host-mem-gb {host_mem_gb:g}: too little for reads from the drive to land in "
                        f"(at least {need / 1e9:.2f} GB)")
    if h >= mem.shape.experts:
        return policy.with_host(None)
    try:
        host = HostPolicy.make(host_policy or "tide", policy.n_layers, mem.shape.experts, budgets,
                               host_tau if host_tau is not None else HOST_TAU)
    except PolicyError as exc:
        raise exc.for_flags(FLAGS) from None
    return policy.with_host(host)


def resolve_policy(name: str, shape: ModelShape, dtype: str, *, tau: int | None = None,
                   gpu_experts: int | Sequence[int] | None = None, gpu_mem_gb: float | None = None,
                   plan: str | None = None, kv_tokens: int = 0, mem_limit_bytes: float | None = None,
                   host_mem_gb: float | None = None, host_policy: str | None = None, host_tau: int | None = None,
                   host_bytes: float | None = None) -> Policy:
    """Validate the flags together and build the policy; a budget that cannot fit is a TideError.

    The budget is ``--gpu-experts`` per layer, or the largest uniform one that fits in
    ``--gpu-mem-gb`` beside the non-expert weights and a KV cache of ``kv_tokens``
    (:class:`traces.costs.memory.MemoryBudget`). ``mem_limit_bytes`` (the device's or the
    profile's memory) bounds ``--gpu-mem-gb`` and, without it, the budget. The host tier:
    :func:`with_host` (``host_bytes``: the machine's memory).
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
    return with_host(policy, mem, host_mem_gb, host_policy, host_tau, host_bytes)
