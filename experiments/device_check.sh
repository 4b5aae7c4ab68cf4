#!/usr/bin/env bash
# The GPU checks of prediction against reality, as one script for a lent GPU box (about
# 8 minutes on an H200). Needs only runtime/ and traces/ (the GPU box's own Python: torch
# with CUDA, numpy, pandas, pyarrow, safetensors, tqdm); simpy/pyomo are for the replay half,
# run afterwards anywhere:  python -m experiments.accuracy --replay-only OUT/accuracy
#
#   bash experiments/device_check.sh [OUT] [DEVICE]      # defaults: ${OUT:-out/device}, cuda
#
# 1. the expert kernels on this device: which one the engine picks, and both timed;
# 2. the device check (experiments.gpu_check --quick): mini-shape runs per policy, tokens
#    against all, measured over the cost model's bound;
# 3. the accuracy capture on the tiny preset (bf16 on a GPU), to replay with the simulator;
# 4. the engine's host time per MoE layer-forward per policy (experiments.bench_engine);
# 5. batches (experiments.batch_check): batch 1, 8 and 32 on the mini shape under all and
#    tide, each request's tokens checked against all in the same batched run;
# 6. the host CPU's side in bf16 (experiments.bench_cpu): TIDE's C kernel against torch's
#    (oneDNN where the CPU has AVX-512 BF16 or AMX), the head and sampling, tiny generate.
# Each step has its own time limit and writes under OUT; a failing step does not stop the rest.
# STEPS="batches gpu_check" runs only those steps; BATCH_PRESET (default mini) picks the
# batched step's checkpoint, BATCH_SIZES (default 1,8,32) and BATCH_GEN (default 64) its
# batch sizes and generation length (tests run it on the CPU with tiny, 1,8 and 32); PYTHON
# (default python) the interpreter; KERNEL_MODELS and KERNEL_SIZES (EXPERTSxTOKENS) the
# kernels step's shapes, CPU_TOKENS and CPU_BATCHES the bench_cpu step's sizes.
set -uo pipefail
OUT=${1:-${OUT:-out/device}}
DEVICE=${2:-cuda}
mkdir -p "$OUT"
STEPS=${STEPS:-kernels gpu_check accuracy_capture bench_engine batches bench_cpu}
BATCH_PRESET=${BATCH_PRESET:-mini}
PYTHON=${PYTHON:-python}  # the interpreter that runs every step (tests pass their own)
step() {  # step NAME SECONDS CMD...: run, keep its output, note its exit status
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name $rc" >> "$OUT/status.txt"
}
: > "$OUT/status.txt"
step kernels 60 "$PYTHON" -c "
import json, torch
from runtime.experts import choose_kernel
from traces.formats.shapes import ModelShape
dev = torch.device('$DEVICE'); dt = torch.bfloat16 if dev.type == 'cuda' else torch.float32
out = {}
for m in '${KERNEL_MODELS:-llada2-mini llada2-flash}'.split():
    s = ModelShape.named(m)
    for e, t in (tuple(map(int, c.split('x'))) for c in '${KERNEL_SIZES:-8x4 64x4 128x16}'.split()):
        name, times = choose_kernel.__wrapped__(dev, dt, s.hidden, s.moe_intermediate, experts=e, tokens_per_expert=t)
        out[f'{m} {e}x{t}'] = {'chosen': name, **{k: round(v * 1e6, 1) for k, v in times.items()}}
        print(m, e, t, out[f'{m} {e}x{t}'], flush=True)
json.dump(out, open('$OUT/kernels.json', 'w'), indent=1)
"
step gpu_check 240 "$PYTHON" -m experiments.gpu_check --quick --out "$OUT/gpu_check.json"
step accuracy_capture 240 "$PYTHON" -m experiments.accuracy --capture-only "$OUT/accuracy" --device "$DEVICE" --rounds 3
step bench_engine 120 "$PYTHON" -m experiments.bench_engine --device "$DEVICE" --json
step batches 180 "$PYTHON" -m experiments.batch_check --preset "$BATCH_PRESET" --device "$DEVICE" \
    --batch-sizes "${BATCH_SIZES:-1,8,32}" --gen-length "${BATCH_GEN:-64}" --checkpoint-dir "$OUT/checkpoints" \
    --out "$OUT/batches.json"
step bench_cpu 150 "$PYTHON" -m experiments.bench_cpu --dtypes bfloat16 --tokens "${CPU_TOKENS:-1,4,16,64}" \
    --batch-sizes "${CPU_BATCHES:-1,8}" --gen-lengths 128 --reps 3
cat "$OUT/status.txt"
