"""Block-diffusion generation as LLaDA2.0 decodes, with an exact block-level KV cache.

The answer is laid out in whole blocks after the prompt, all ``mask_id``. Block by block,
each denoising step predicts every masked position of the current block; positions whose
confidence exceeds ``threshold`` are accepted, or, if fewer than the step's scheduled count
pass, the most confident ones. Greedy by default; temperature / top-k / top-p sampling
with a seed. Generation stops after a block that holds ``eos``; the answer ends at the
first ``eos`` (kept) or at ``gen_length``. These are the published ``generate()``'s
semantics.

With the KV cache (default) a prefill forward caches the prompt's whole blocks, each step
runs only the current block against the cache, and one commit forward writes a finished
block's final keys and values. Attention is block-causal, so this is exact. Without it
(``--no-kv-cache``) every step re-runs the whole prefix, as the published code does.

The library; ``python -m runtime.generate`` is its command line.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from runtime.capture import TraceRecorder
from runtime.model import KVCache, LLaDA2, Segment, block_causal_mask
from runtime.trace_replay import ChoiceReplay, check_replayable, replay_prompt
from traces.common.checks import check_seed, resolve_batch_size
from traces.common.errors import TideError
from traces.common.values import need_float, need_int
from traces.formats.trace_file import Decoding, Trace
from traces.serving.admission import Admission, Recorded, seating
from traces.serving.arrivals import Arrivals
from traces.serving.loop import ServeLoop

if TYPE_CHECKING:
    from runtime.offload import OffloadEngine


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab: int) -> "Sampling":
        """Values torch would reject mid-run, refused before any work."""
        need_float(self.temperature, "--temperature", lo=0.0)
        need_int(self.top_k, "--top-k", lo=0, hi=vocab)
        need_float(self.top_p, "--top-p", hi=1.0, positive=True)
        check_seed(self.seed)
        return self


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens each step must accept at least: ``block_length / steps``, remainder first."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its probability per row of ``logits [n, vocab]``."""
    if s.temperature == 0:  # max, not argmax: the same first maximal index, in half the time on a CPU
        tok = logits.max(dim=-1, keepdim=True).indices
        return tok[:, 0], F.softmax(logits, dim=-1).gather(-1, tok)[:, 0]
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, s.top_k)[0][..., -1, None]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    if s.top_p < 1.0:
        srt, order = torch.sort(logits, descending=True)
        drop = torch.cumsum(F.softmax(srt, dim=-1), dim=-1) > s.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    tok = torch.multinomial(probs, 1, generator=gen)
    return tok[:, 0], probs.gather(-1, tok)[:, 0]


def accept(block: torch.Tensor, tok: torch.Tensor, prob: torch.Tensor, mask_id: int, n: int,
           threshold: float | None = None) -> int:
    """Unmask positions of ``block`` (in place) with their sampled tokens: every masked position
    whose confidence exceeds ``threshold`` if at least ``n`` do, else the ``n`` most confident
    (fewer if fewer are masked). Returns how many were accepted."""
    active = block == mask_id
    conf = torch.where(active, prob, torch.full_like(prob, float("-inf")))
    transfer = conf > threshold if threshold is not None else None
    if transfer is None or int(transfer.sum()) < n:
        transfer = torch.zeros_like(active)
        transfer[torch.topk(conf, k=min(n, int(active.sum()))).indices] = True
    block.copy_(torch.where(transfer, tok, block))
    return int(transfer.sum())


@dataclass
class Result:
    tokens: list[int]
    forwards: int = 0
    step_forwards: int = 0
    committed: int = 0
    seconds: float = 0.0
    #: with ``Generator(margins=True)``, per generated position: the forward that committed
    #: it and its logits' top-2 gap relative to the largest |logit| then (near-tie checks)
    committed_at: list[int] | None = None
    margin: list[float] | None = None
    #: in a batched run: the batched forwards it took part in, its first and last forward's
    #: start and end (seconds from the run's start)
    batch_forwards: list[int] = field(default_factory=list)
    start_s: float = 0.0
    end_s: float = 0.0
    arrival_s: float = 0.0  # when it was let in (``arrivals``; 0 otherwise)


@dataclass(frozen=True)
class Planned:
    """One forward of a schedule: its kind, block and step, the tokens it must commit at least
    (``threshold`` may commit more; ``None``: exactly that many), the trace forward it replays."""

    kind: str
    block: int
    step: int
    commit: int
    threshold: float | None = None
    forward: int | None = None


@dataclass
class _Request:
    """One request in flight: its canvas, its own KV cache and sampler, its schedule of
    forwards (live or from a trace), the next forward it asks for, and its result so far."""

    request: int
    x: torch.Tensor
    P: int
    G: int
    decoding: Decoding
    schedule: Iterator[Planned]
    cache: KVCache | None
    sampler: torch.Generator | None
    res: Result = field(default_factory=lambda: Result(tokens=[]))
    notes: dict[int, tuple[int, float]] = field(default_factory=dict)
    next: Planned | None = None
    start_s: float = 0.0
    end_s: float = 0.0
    arrival_s: float = 0.0
    batch_forwards: list[int] = field(default_factory=list)  # the batched forwards it took part in

    def advance(self) -> bool:
        """Fetch the next forward this request asks for; False when it has finished."""
        self.next = next(self.schedule, None)
        return self.next is not None


@dataclass
class Generator:
    """Runs prompts on one model, one after another or several at once (``batch_size``:
    continuous batching at forward granularity, :mod:`traces.serving.admission`); the offload engine
    keeps its state across them."""

    model: LLaDA2
    decoding: Decoding = field(default_factory=Decoding)
    sampling: Sampling = field(default_factory=Sampling)
    recorder: TraceRecorder | None = None
    engine: "OffloadEngine | None" = None
    margins: bool = False
    progress: Any = None  # a tqdm bar (or anything with update(n)): one step per forward run
    forwards_run: int = field(default=0, init=False)  # batched forwards run so far (every call)

    def _accept(self, q: _Request, s0: int, logits: torch.Tensor, n: int, threshold: float | None = None,
                rows: torch.Tensor | None = None) -> int:
        """Sample and commit in ``x[s0:s0 + block]``; ``rows``: the block positions ``logits``
        hold (the masked ones) when not all; with ``margins``, note each committed
        position's forward and top-2 logit gap (relative to the largest |logit|)."""
        block = q.x[s0:s0 + (logits.shape[0] if rows is None else q.decoding.block_length)]
        masked = block == self.model.cfg.mask_id if self.margins else None
        with self.model.clock("head"):
            tok, prob = sample(logits, self.sampling, q.sampler)
        if rows is not None:  # positions without logits are not masked: they never commit
            tok = block.clone().index_copy_(0, rows, tok)
            prob = torch.zeros(len(block), dtype=prob.dtype, device=prob.device).index_copy_(0, rows, prob)
        n = accept(block, tok, prob, self.model.cfg.mask_id, n, threshold)
        if masked is not None:
            lf = logits.float()
            top2 = lf.topk(2, dim=-1).values
            rel = ((top2[:, 0] - top2[:, 1]) / lf.abs().amax(dim=-1).clamp_min(1e-30)).tolist()
            at = list(range(len(block))) if rows is None else rows.tolist()
            where = {p: i for i, p in enumerate(at)}
            for i in (masked & (block != self.model.cfg.mask_id)).nonzero().flatten().tolist():
                q.notes[s0 + i] = (q.res.forwards, rel[where[i]])
        return n

    def _finish(self, q: _Request) -> Result:
        res = q.res
        if self.margins:
            notes = [q.notes.get(p, (-1, float("inf"))) for p in range(q.P, q.P + q.G)]
            res.committed_at = [f for f, _ in notes]
            res.margin = [m for _, m in notes]
        res.tokens = q.x[q.P:q.P + q.G].tolist()
        res.seconds = q.end_s - q.start_s
        res.start_s, res.end_s, res.batch_forwards = q.start_s, q.end_s, q.batch_forwards
        res.arrival_s = q.arrival_s
        return res

    def check_prompts(self, prompts: list[list[int]], gen_lengths: list[int], where: list[str] | None = None) -> None:
        """Every prompt usable with its generation length (ids in the vocabulary, within the
        model's positions), before any work: one line, prefixed with ``where`` (a prompt's
        file and line, or flag) when given."""
        d, cfg = self.decoding, self.model.cfg
        if d.block_length < 1 or d.steps < 1:
            raise TideError("--block-length and --steps must be at least 1")
        need_float(d.threshold, "--threshold", lo=0.0, hi=1.0)
        max_pos = cfg.shape.config.get("max_position_embeddings")
        for i, (prompt, g) in enumerate(zip(prompts, gen_lengths)):
            at = f"{where[i]}: " if where is not None else (f"prompt {i + 1}: " if len(prompts) > 1 else "")
            if not prompt:
                raise TideError(f"{at}empty prompt")
            if g < 1:
                raise TideError(f"{at}--gen-length must be at least 1, got {g}")
            if isinstance(max_pos, int) and not isinstance(max_pos, bool) and len(prompt) + g > max_pos:
                raise TideError(f"{at}the prompt's {len(prompt)} tokens plus a generation length of {g} exceed "
                                f"the model's max_position_embeddings ({max_pos})")
            bad = [t for t in prompt if not 0 <= t < cfg.shape.vocab]
            if bad:
                raise TideError(f"{at}prompt token id {bad[0]} is outside the vocabulary of {cfg.shape.vocab}")

    def _live(self, prompt: list[int], gen_length: int, request: int) -> _Request:
        x = self._canvas(prompt, gen_length)
        sampler = torch.Generator(device=x.device).manual_seed(self.sampling.seed + request) \
            if self.sampling.temperature > 0 else None
        d = self.decoding
        cache = KVCache(self.model.cfg, len(x), x.device, self.model.dtype) if d.kv_cache else None
        return _Request(request, x, len(prompt), gen_length, d, self._live_schedule(x, len(prompt), gen_length),
                        cache, sampler)

    @torch.no_grad()
    def generate(self, prompt: list[int], gen_length: int, request: int = 0) -> Result:
        """One request alone (a batch of one)."""
        return self.generate_batch([prompt], [gen_length], 1, [request])[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], gen_lengths: list[int], batch_size: int,
                       requests: list[int] | None = None, arrivals: Sequence[float] | None = None) -> list[Result]:
        """Every prompt, up to ``batch_size`` in each forward; results in prompt order, each
        ending at its first ``eos`` (kept) or at its generation length."""
        requests = list(range(len(prompts))) if requests is None else requests
        self.check_prompts(prompts, gen_lengths)
        reqs = [self._live(p, g, r) for p, g, r in zip(prompts, gen_lengths, requests)]
        out = self._run(reqs, Admission(resolve_batch_size(batch_size)), arrivals=_stream(arrivals))
        eos = self.model.cfg.eos_id
        for res in out:
            if eos in res.tokens:  # the answer ends at the first eos (kept)
                cut = res.tokens.index(eos) + 1
                if res.margin is not None:
                    res.committed_at, res.margin = res.committed_at[:cut], res.margin[:cut]
                res.tokens = res.tokens[:cut]
        return out

    @torch.no_grad()
    def replay(self, trace: Trace, request: int = 0) -> Result:
        """Run one request of a KV-cache trace: its forwards in order, its commit counts
        (most confident first), its experts (``runtime.trace_replay``); no early stop at eos."""
        return self.replay_batch(trace, [request], 1)[0]

    @torch.no_grad()
    def replay_batch(self, trace: Trace, requests: list[int], batch_size: int | None = None,
                     arrivals: Sequence[float] | None = None) -> list[Result]:
        """Requests of a KV-cache trace, each replayed as :meth:`replay` does: in the forwards
        the trace recorded (``batch_size`` None), or composed anew, up to ``batch_size`` in
        each forward (the batched forwards the same prompts make at that batch size: routing
        is per token, attention per request)."""
        cfg = self.model.cfg
        check_replayable(trace, self.model)
        reqs = []
        for request in requests:
            req = next((r for r in trace.requests if r["request"] == request), None)
            if req is None:
                raise TideError(f"--replay-trace: no request {request} in the trace")
            P, G = req["prompt_length"], req["gen_length"]
            x = self._canvas(replay_prompt(P, cfg.shape.vocab, (cfg.mask_id, cfg.eos_id)), G, trace.decoding.block_length)
            cache = KVCache(cfg, len(x), x.device, self.model.dtype)
            reqs.append(_Request(request, x, P, G, trace.decoding, self._trace_schedule(trace, request), cache, None))
        with ChoiceReplay(trace, self.model) as chooser:
            return self._run(reqs, seating(trace, batch_size, arrivals, requests), chooser, _stream(arrivals))

    # ---- the forward schedule: live (decided as the tokens commit) or read from a trace ----------
    def _canvas(self, prompt: list[int], gen_length: int, block_length: int | None = None) -> torch.Tensor:
        """The prompt, then masks to the end of the last whole block."""
        bl = block_length or self.decoding.block_length
        total = math.ceil((len(prompt) + gen_length) / bl) * bl
        x = torch.full((total,), self.model.cfg.mask_id, dtype=torch.long, device=self.model.device)
        x[:len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=x.device)
        return x

    def _live_schedule(self, x: torch.Tensor, P: int, gen_length: int) -> Iterator[Planned]:
        """The published schedule: a prefill of the prompt's whole blocks (KV cache), then per
        block up to ``steps`` denoising steps while masks remain, and a commit forward unless
        the block holds ``eos`` (which ends the answer) or is the last."""
        d, cfg = self.decoding, self.model.cfg
        bl = d.block_length
        steps = min(d.steps, gen_length)
        schedule = transfer_schedule(bl, steps)
        n_blocks, first = len(x) // bl, P // bl
        if d.kv_cache and first:
            yield Planned("prefill", 0, 0, 0)
        for b in range(first, n_blocks):
            s0, e = b * bl, (b + 1) * bl
            for step in range(steps):
                if not bool((x[s0:e] == cfg.mask_id).any()):
                    break
                yield Planned("step", b, step, schedule[step], d.threshold)
            stop = bool((x[P:e] == cfg.eos_id).any())
            if d.kv_cache and not stop and b < n_blocks - 1:
                yield Planned("commit", b, 0, 0)
            if stop:
                return

    @staticmethod
    def _trace_schedule(trace: Trace, request: int) -> Iterator[Planned]:
        """A recorded request's forwards, each committing exactly what it committed then."""
        fw = trace.forwards
        rows = fw[fw["request"] == request]  # read once: a pandas lookup per forward costs more than a tiny forward
        for f, kind, block, step, committed in zip(rows.index.tolist(), rows["kind"].tolist(), rows["block"].tolist(),
                                                   rows["step"].tolist(), rows["tokens_committed"].tolist()):
            yield Planned(str(kind), int(block), int(step), int(committed), None, int(f))

    def _segment(self, q: _Request, p: Planned) -> tuple[Segment, int]:
        """What request ``q`` runs in forward ``p``, and the first of its rows whose choices a
        trace keeps (without the KV cache, only the current block's)."""
        bl, dev = q.decoding.block_length, q.x.device
        s0, e = p.block * bl, (p.block + 1) * bl
        if p.kind == "prefill":
            P0 = (q.P // bl) * bl
            return Segment(q.x[:P0], 0, q.cache, block_causal_mask(P0, bl, dev), None), 0
        if p.kind == "commit":
            return Segment(q.x[s0:e], s0, q.cache, None, None), 0
        # the head and sampling only for the still-masked positions (the rest never commit):
        # greedy decoding and not row-exact (in fp32 on the CPU every row is computed, as batch 1 does)
        rows = (q.x[s0:e] == self.model.cfg.mask_id).nonzero().flatten() \
            if self.sampling.temperature == 0 and not self.model.row_exact else None
        if q.cache is not None:
            return Segment(q.x[s0:e], s0, q.cache, None, 0, rows), 0
        return Segment(q.x[:e], 0, None, block_causal_mask(e, bl, dev), s0, rows), s0

    def _run(self, reqs: list[_Request], seats: Admission | Recorded, chooser: ChoiceReplay | None = None,
             arrivals: Arrivals | None = None) -> list[Result]:
        """Run the requests' forwards: the one serving loop (:class:`traces.serving.loop.ServeLoop`)
        on the wall clock, one loop for live and replayed decoding at any batch size. ``seats``:
        :class:`traces.serving.admission.Admission` at a batch size (a request leaves after its
        last forward and the next joins at the very next one), or the forwards a trace recorded
        (``Recorded``). ``arrivals``: a request is held until its offset has passed (the serving
        simulator's stream, run for real). Results in the order of ``reqs``."""
        by_id = {q.request: q for q in reqs}
        loop = ServeLoop([q.request for q in reqs], seats, arrivals)
        if self.recorder is not None:
            self.recorder.batch_size = max(self.recorder.batch_size, seats.batch_size)
        first = self.forwards_run  # this run's forwards count from here
        t0 = time.perf_counter()
        while True:
            now = time.perf_counter() - t0
            seated = loop.next(now)
            if seated is None:
                break
            if isinstance(seated, float):  # nothing in flight or waiting: hold until the next arrival
                time.sleep(max(seated - now, 0.0))
                continue
            members = [q for q in (by_id[r] for r in seated) if q.next is not None or self._join(q, loop, now)]
            if members:
                self._forward(members, chooser, self.forwards_run - first)
                now = time.perf_counter() - t0
                for q in members:
                    if not q.advance():
                        q.end_s = now
                        loop.leave(q.request, now)
        for r, at in loop.arrival.items():
            by_id[r].arrival_s = at
        return [self._finish(q) for q in reqs]

    def _join(self, q: _Request, loop: ServeLoop, now: float) -> bool:
        """A newcomer's first forward: recorded, fetched; False (and its seat freed) when it has none."""
        if self.recorder is not None:
            self.recorder.add_request(q.request, q.P, q.G)
        if not q.advance():
            loop.leave(q.request, now)
            return False
        q.start_s = now
        return True

    def _forward(self, members: list[_Request], chooser: ChoiceReplay | None, index: int) -> None:
        """One batched forward of ``members``, the ``index``-th of this run: their segments
        through the model (and the engine, the recorder), then each step's sampling and commits."""
        plans = [q.next for q in members]
        if chooser is not None:
            chooser.set_forwards([p.forward for p in plans])
        segs = [self._segment(q, p) for q, p in zip(members, plans)]
        if self.engine is not None:
            self.engine.begin(plans[0].kind, plans[0].step, [(p.kind, p.step) for p in plans[1:]])
        if self.recorder is not None:
            self.recorder.begin([dict(request=q.request, kind=p.kind, block=p.block, step=p.step,
                                      tokens_run=sg.ids.shape[0], context=sg.pos0 + sg.ids.shape[0],
                                      choice_start=sg.pos0 + cf, choice_tokens=sg.ids.shape[0] - cf)
                                 for q, p, (sg, cf) in zip(members, plans, segs)])
        logits = self.model.forward_batch([sg for sg, _ in segs])
        committed = []
        for q, p, (sg, _), lg in zip(members, plans, segs, logits):
            n = 0
            if p.kind == "step":
                n = self._accept(q, p.block * q.decoding.block_length, lg, p.commit, p.threshold, sg.logit_rows)
                q.res.step_forwards += 1
                q.res.committed += n
            committed.append(n)
            q.res.forwards += 1
            q.batch_forwards.append(index)
        counters = self.engine.end() if self.engine is not None else None
        if self.recorder is not None:
            self.recorder.end(committed, counters)
        self.forwards_run += 1
        if self.progress is not None:
            self.progress.update(1)


def _stream(offsets: Sequence[float] | None) -> Arrivals | None:
    """Arrival offsets given as numbers (one per request), as a stream; None: all at 0."""
    return None if offsets is None else Arrivals(offsets=tuple(offsets), label="arrivals")


def warm_up(model: LLaDA2, decoding: Decoding, prompt: list[int], sampling: Sampling | None = None,
            engine: "OffloadEngine | None" = None) -> None:
    """One denoising step of one block, not timed (kernels, allocator, caches), then a fresh
    placement for the engine: what every timed run does first."""
    bl = decoding.block_length
    Generator(model, Decoding(bl, 1, decoding.threshold, decoding.kv_cache), sampling or Sampling(),
              engine=engine).generate(prompt[:bl], 1)
    if engine is not None:
        engine.reset()
