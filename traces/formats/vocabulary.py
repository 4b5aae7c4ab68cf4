"""The words the formats share: policy names, the kinds a plan's layer may run, the kinds of
forward a trace records, and the counters a policy's run adds to it. Defined here, below
every format and policy, so each reader checks against the same words."""
from __future__ import annotations

#: What ``--policy`` may name (``plan``: a kind per layer, read from a plan file).
POLICIES: tuple[str, ...] = ("all", "cpu", "static", "swap", "tide", "plan")
#: What a layer of a plan may run (``all`` is ``static`` with every expert).
KINDS: tuple[str, ...] = ("cpu", "static", "swap", "tide")
#: How a layer's host memory changes which experts it keeps (:mod:`traces.policies.host`).
HOST_KINDS: tuple[str, ...] = ("tide", "static", "lru")
#: The forwards of a block-diffusion run, as a trace records them.
FORWARD_KINDS: tuple[str, ...] = ("prefill", "step", "commit")
#: The contract's counters (:mod:`traces.policies.counters` defines them), per forward and MoE layer.
COUNTERS: tuple[str, ...] = ("gpu_tokens", "cpu_tokens", "migrations", "setup_migrations", "bytes_h2d", "bytes_act")
