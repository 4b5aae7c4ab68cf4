"""Hugging Face layout checkpoints: ``config.json`` plus ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``, under the published parameter names.

Loading streams one tensor at a time into a model built on the meta device, so the model is
never in memory twice. Routed experts go into per-layer stacked tensors wherever
``experts_device`` says (host memory, pinned when a GPU is present, by default).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from runtime.config import ModelConfig
from runtime.experts import ExpertWeights
from runtime.model import LLaDA2
from traces.common.errors import TideError
from traces.common.files import read_json
from traces.common.values import get, need_dict, need_str

if TYPE_CHECKING:
    from runtime.drive import ExpertFiles

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TideError(f"--dtype: unknown dtype {name!r} (expected one of {', '.join(DTYPES)})") from None


def dtype_name(dt: torch.dtype) -> str:
    """The name traces and profiles use for a torch dtype."""
    for name, t in DTYPES.items():
        if t == dt:
            return name
    raise TideError(f"unsupported dtype {dt}")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its shape (the published names)."""
    s = cfg.shape
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (s.vocab, s.hidden), "model.norm.weight": (s.hidden,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (s.vocab, s.hidden)
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    for l in range(s.layers):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = (s.hidden,)
        out[f"{p}.post_attention_layernorm.weight"] = (s.hidden,)
        out[f"{p}.attention.query_key_value.weight"] = (qkv, s.hidden)
        if cfg.use_qkv_bias:
            out[f"{p}.attention.query_key_value.bias"] = (qkv,)
        out[f"{p}.attention.dense.weight"] = (s.hidden, s.heads * s.head_dim)
        if cfg.use_bias:
            out[f"{p}.attention.dense.bias"] = (s.hidden,)
        if cfg.use_qk_norm:
            out[f"{p}.attention.query_layernorm.weight"] = (s.head_dim,)
            out[f"{p}.attention.key_layernorm.weight"] = (s.head_dim,)
        if l < s.first_k_dense:
            for proj, shp in (("gate_proj", (s.intermediate, s.hidden)), ("up_proj", (s.intermediate, s.hidden)),
                              ("down_proj", (s.hidden, s.intermediate))):
                out[f"{p}.mlp.{proj}.weight"] = shp
            continue
        out[f"{p}.mlp.gate.weight"] = (s.experts, s.hidden)
        if cfg.use_expert_bias:
            out[f"{p}.mlp.gate.expert_bias"] = (s.experts,)
        if s.shared_experts:
            si = s.moe_intermediate * s.shared_experts
            for proj, shp in (("gate_proj", (si, s.hidden)), ("up_proj", (si, s.hidden)), ("down_proj", (s.hidden, si))):
                out[f"{p}.mlp.shared_experts.{proj}.weight"] = shp
        for e in range(s.experts):
            for proj, shp in (("gate_proj", (s.moe_intermediate, s.hidden)), ("up_proj", (s.moe_intermediate, s.hidden)),
                              ("down_proj", (s.hidden, s.moe_intermediate))):
                out[f"{p}.mlp.experts.{e}.{proj}.weight"] = shp
    return out


def checkpoint_dtype(folder: str | Path) -> str:
    """The dtype a checkpoint loads in without ``--dtype``, by its config's ``torch_dtype``
    (bfloat16 where it names none we know), for sizing memory before anything loads."""
    cfg = read_json(Path(folder) / "config.json", "config")
    name = cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return name if name in DTYPES else "bfloat16"


def checkpoint_files(folder: Path) -> dict[Path, list[str] | None]:
    """The safetensors files of a checkpoint, each with the names the index puts there."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = need_dict(read_json(index, "safetensors index"), str(index))
        weight_map = need_dict(get(data, "weight_map", str(index)), f"{index}: weight_map")
        files: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            fname = need_str(fname, f"{index}: weight_map[{name!r}]")
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise TideError(f"{index}: weight_map[{name!r}] must be a file name in the checkpoint folder, got {fname!r}")
            files.setdefault(folder / fname, []).append(name)
        for f in files:
            if not f.is_file():
                raise TideError(f"{folder}: shard {f.name} named in {index.name} is missing")
        return files
    if single.is_file():
        return {single: None}
    raise TideError(f"{folder}: no model.safetensors nor model.safetensors.index.json")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build modules without initialising weights (the loader assigns them all)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def expert_bias(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device, fp32: bool = False) -> torch.Tensor:
    """The router's ``expert_bias`` as the published code computes with it: loaded in the
    model's dtype (``torch_dtype=bfloat16`` casts every parameter), so its values are
    rounded to that dtype, then added to fp32 scores. ``fp32=True`` keeps the checkpoint's
    full precision instead (more exact, but choices can differ from the published model's
    on near-tied experts)."""
    if not fp32 and dtype is not None:
        t = t.to(dtype)
    return t.to(device=device, dtype=torch.float32, copy=True)


def _assign(model: LLaDA2, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
               experts_device: str | torch.device = "cpu", pin: bool | None = None, bias_fp32: bool = False,
               on_device: dict[int, Sequence[int]] | None = None, drive_layers: Sequence[int] = ()) -> LLaDA2:
    """Load a checkpoint; any missing shard, missing tensor, wrong shape or dtype is a TideError.
    ``on_device`` (model layer id -> expert ids): see :func:`build_model`. ``drive_layers``
    (model layer ids): layers whose routed experts stay on the drive, not read now (a host
    tier reads them as forwards need them: :func:`drive_files`); their shapes and dtypes are
    checked from the files' headers, their values when read."""
    from runtime.device import keep_freed_memory
    keep_freed_memory()  # a run's large temporaries reused, not faulted in again every forward
    folder = Path(folder)
    cfg = ModelConfig.load(folder)
    files = checkpoint_files(folder)
    on_drive = set(int(l) for l in drive_layers)
    skipped = {n for n in expected_tensors(cfg) if (m := _EXPERT.match(n)) and int(m.group(1)) in on_drive}

    def stream() -> Iterator[tuple[str, torch.Tensor, str]]:
        for path, names in files.items():
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise TideError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
            with handle as f:
                keys = list(f.keys())
                if names is not None:
                    absent = sorted(set(names) - set(keys))
                    if absent:
                        raise TideError(f"{path}: index says it holds {absent[0]}, but it does not")
                for name in keys:
                    if name in skipped:
                        continue  # read by the host tier when a forward needs it
                    yield name, f.get_tensor(name), str(path)

    return build_model(cfg, stream(), device, dtype, experts_device, pin, where=str(folder), bias_fp32=bias_fp32,
                       on_device=on_device, drive_layers=on_drive)


def load_on_drive(folder: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> tuple[LLaDA2, "ExpertFiles"]:
    """The checkpoint with every MoE layer's experts left on the drive, and their files: a
    model any policy's host tier runs on (a layer it keeps whole is read in by its engine)."""
    cfg = ModelConfig.load(folder)
    layers = set(cfg.shape.moe_layers)
    return load_model(folder, device=device, dtype=dtype, experts_device="cpu", drive_layers=layers), \
        drive_files(folder, cfg, layers)


def drive_files(folder: str | Path, cfg: ModelConfig, layers: set[int], queue_depth: int = 8) -> "ExpertFiles":
    """The routed experts of ``layers`` (model layer ids) as the host tier reads them: every one
    present, in the shape the config implies and a floating-point dtype, or a TideError."""
    from runtime.drive import ExpertFiles, expert_spans
    folder = Path(folder)
    spans = expert_spans(list(checkpoint_files(folder)), layers)
    s = cfg.shape
    expected = expected_tensors(cfg)
    for l in sorted(layers):
        for e in range(s.experts):
            got = spans.get((l, e))
            if got is None:
                raise TideError(f"{folder}: tensor model.layers.{l}.mlp.experts.{e}.*_proj.weight missing from the checkpoint")
            for proj, span in zip(("gate_proj", "up_proj", "down_proj"), got):
                name = f"model.layers.{l}.mlp.experts.{e}.{proj}.weight"
                if span.shape != expected[name]:
                    raise TideError(f"{span.path}: {name} has shape {list(span.shape)}, the config implies {list(expected[name])}")
                if span.nbytes != int(np.prod(span.shape)) * torch.tensor([], dtype=span.dtype).element_size():
                    raise TideError(f"{span.path}: {name}: its byte range does not match its shape and dtype")
    return ExpertFiles(spans, queue_depth)


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor, str]], device: str | torch.device = "cpu",
                dtype: str | None = None, experts_device: str | torch.device = "cpu", pin: bool | None = None,
                where: str = "checkpoint", bias_fp32: bool = False,
                on_device: dict[int, Sequence[int]] | None = None, drive_layers: set[int] = frozenset()) -> LLaDA2:
    """Build the model from ``(name, tensor, source)`` items, one tensor in memory at a time.

    Routed experts go into per-layer stacked tensors on ``experts_device`` (pinned host
    memory when a GPU is present); everything else to ``device``. ``on_device`` names, per
    MoE layer (model layer id), experts that go straight to ``device`` instead, in a stack of
    their own in increasing id order (``MoE.resident``, ``MoE.resident_ids``), with no host
    copy: that layer's host stack then holds only the others (``MoE.host_row`` maps an
    expert to its row, -1 where it has none). Only the offload engine runs such a model
    (static layers whose residents these are, or layers wholly on the device).
    """
    expected = expected_tensors(cfg)
    device, experts_device = torch.device(device), torch.device(experts_device)
    if pin is None:
        pin = torch.cuda.is_available() and experts_device.type == "cpu"
    with torch.device("meta"), _no_init():
        model = LLaDA2(cfg)
    rows = _device_rows(cfg, on_device, where)
    stacks = _Stacks(cfg, rows, expected, device, experts_device, pin, torch_dtype(dtype) if dtype else None)
    seen: set[str] = set()
    biases: dict[str, torch.Tensor] = {}
    for name, t, path in tensors:
        if name not in expected:
            continue  # buffers and extras published checkpoints may carry
        _check_tensor(name, t, path, expected[name])
        if stacks.target is None and not name.endswith("expert_bias"):
            stacks.target = t.dtype
        seen.add(name)
        m = _EXPERT.match(name)
        if m:
            stacks.put(int(m.group(1)), int(m.group(2)), m.group(3), name, t)
        elif name.endswith("expert_bias"):
            biases[name] = t  # assigned once the model's dtype is known
        else:
            # a copy: a tensor left on the file's memory map would crash the run (SIGBUS) if the file
            # were truncated while it runs, where reads from it give one clear line
            _assign(model, name, t.to(device=device, dtype=stacks.target, copy=True))
    for name, t in biases.items():
        _assign(model, name, expert_bias(t, stacks.target, device, bias_fp32))
    missing = [n for n in expected if n not in seen and not ((m := _EXPERT.match(n)) and int(m.group(1)) in drive_layers)]
    if missing:
        raise TideError(f"{where}: tensor {missing[0]} missing from the checkpoint"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.word_embeddings.weight
    stacks.attach(model, cfg, device, drive_layers)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise TideError(f"{where}: tensor {leftover[0]} missing from the checkpoint")
    return model.eval()


def _check_tensor(name: str, t: torch.Tensor, path: str, shape: tuple[int, ...]) -> None:
    """A tensor as the config implies it: its shape, a floating-point type, finite values."""
    if tuple(t.shape) != shape:
        raise TideError(f"{path}: {name} has shape {list(t.shape)}, the config implies {list(shape)}")
    if not t.is_floating_point():
        raise TideError(f"{path}: {name} has dtype {t.dtype}, expected a floating-point type")
    if not bool(torch.isfinite(t).all()):
        raise TideError(f"{path}: {name} holds NaN or infinite values")


def _device_rows(cfg: ModelConfig, on_device: dict[int, Sequence[int]] | None, where: str) -> dict[int, np.ndarray]:
    """Per MoE layer with experts loaded straight onto the device: each expert's row, its host
    stack's row (from 0) or, on the device, ``-2 - position`` in the device stack."""
    s = cfg.shape
    rows: dict[int, np.ndarray] = {}
    for l, ids in (on_device or {}).items():
        ids = sorted({int(e) for e in ids})
        if l not in s.moe_layers or any(not 0 <= e < s.experts for e in ids):
            raise TideError(f"{where}: experts to load onto the device name layer {l} or experts outside the model")
        row = np.zeros(s.experts, np.int64)
        on = np.zeros(s.experts, bool)
        on[ids] = True
        row[~on] = np.arange(int((~on).sum()))
        row[on] = -2 - np.arange(len(ids))
        rows[l] = row
    return rows


class _Stacks:
    """The routed experts' stacked weights as they stream in: per layer and projection, a host
    stack (pinned where a GPU is present) and, for layers with experts on the device, a device
    stack of those."""

    def __init__(self, cfg: ModelConfig, rows: dict[int, np.ndarray], expected: dict[str, tuple[int, ...]],
                 device: torch.device, experts_device: torch.device, pin: bool, target: torch.dtype | None):
        self.cfg, self.rows, self.expected = cfg, rows, expected
        self.device, self.experts_device, self.pin, self.target = device, experts_device, pin, target
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        self.resident: dict[int, dict[str, torch.Tensor]] = {}

    def put(self, l: int, e: int, proj: str, name: str, t: torch.Tensor) -> None:
        s, rows = self.cfg.shape, self.rows
        layer = self.host.setdefault(l, {})
        row = rows[l][e] if l in rows else e
        if proj not in layer:
            n_host = int((rows[l] >= 0).sum()) if l in rows else s.experts
            buf = torch.empty((n_host, *self.expected[name]), dtype=self.target or t.dtype, device=self.experts_device)
            layer[proj] = buf.pin_memory() if self.pin and self.experts_device.type == "cpu" else buf
            if l in rows:
                self.resident.setdefault(l, {})[proj] = torch.empty((s.experts - n_host, *self.expected[name]),
                                                                    dtype=self.target or t.dtype, device=self.device)
        if row >= 0:
            layer[proj][row].copy_(t)
        else:  # straight to the fast device: no host copy
            self.resident[l][proj][-2 - row].copy_(t)

    def attach(self, model: LLaDA2, cfg: ModelConfig, device: torch.device, drive_layers: set[int] = frozenset()) -> None:
        """Hand each MoE layer its stacks (and, without expert bias, a zero bias); a drive
        layer gets empty ones (its experts are the host tier's)."""
        s = cfg.shape
        for l, layer in enumerate(model.model.layers):
            if l < s.first_k_dense:
                continue
            if l in drive_layers:
                dt = self.target or torch.float32
                layer.mlp.experts = ExpertWeights(*(torch.empty((0, *shp), dtype=dt) for shp in (
                    (s.moe_intermediate, s.hidden), (s.moe_intermediate, s.hidden), (s.hidden, s.moe_intermediate))))
                layer.mlp.on_drive = True
                if not cfg.use_expert_bias:
                    _assign(model, f"model.layers.{l}.mlp.gate.expert_bias", torch.zeros(s.experts, device=device))
                continue
            st = self.host[l]
            layer.mlp.experts = ExpertWeights(gate=st["gate_proj"], up=st["up_proj"], down=st["down_proj"])
            if l in self.rows:
                r = self.resident[l]
                layer.mlp.resident = ExpertWeights(gate=r["gate_proj"], up=r["up_proj"], down=r["down_proj"])
                layer.mlp.resident_ids = np.flatnonzero(self.rows[l] < 0)
                layer.mlp.host_row = np.where(self.rows[l] >= 0, self.rows[l], -1)
            if not cfg.use_expert_bias:
                _assign(model, f"model.layers.{l}.mlp.gate.expert_bias", torch.zeros(s.experts, device=device))


def iter_state(model: LLaDA2) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the published names (experts unstacked), for writing."""
    for name, p in model.named_parameters():
        yield name, p.detach()
    for blk in model.moe_blocks:
        for e in range(blk.experts.gate.shape[0]):
            for proj, t in (("gate_proj", blk.experts.gate), ("up_proj", blk.experts.up), ("down_proj", blk.experts.down)):
                yield f"model.layers.{blk.layer}.mlp.experts.{e}.{proj}.weight", t[e]
