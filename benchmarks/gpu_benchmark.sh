#!/usr/bin/env bash
# One device script (one GPU, no network, under 8 minutes in all, enforced): install the wheels carried in
# .whl/ (built by benchmarks/gpu_wheels.sh), check every import the steps need, then
#   1. the throughput table: project vs plain-PyTorch peer, 130m and 1b, seq 2048 (bench_gpu.py; a failed
#      row, e.g. an out-of-memory at 1b, is recorded in the table and the later steps still run);
#   2. a 20-step 130m PausePT pretrain on NCCL, then a resume to step 30;
#   3. a finetune (squad) from it, and an evaluation with KV-cached decoding on the GPU.
# Output (logs, tables, metrics) goes to $OUT (default runs/gpu_benchmark). A step that fails is reported and
# the script goes on; it exits non-zero if any did. CPU rehearsal of every step (tiny preset, CPU emulation,
# every time limit x5): GPU_BENCH_CPU=1 bash benchmarks/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K=1
if [ "${GPU_BENCH_CPU:-0}" = 1 ]; then K=5; fi  # 2 shared CPU cores
BUDGET=$((480 * K))
if [ -z "${GPU_BENCH_INNER:-}" ]; then  # the whole script under one time limit
  GPU_BENCH_INNER=1 exec timeout --kill-after=15 "$BUDGET" bash "$0" "$@"
fi
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_benchmark}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -f .whl/requirements.txt ]; then
  # A venv over the device's own packages: pip installs only what they lack (with dependencies), never
  # replacing the device's torch; --no-index: nothing but .whl/.
  "$PY" -m venv --system-site-packages --without-pip "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q --no-index --find-links .whl -r .whl/requirements.txt
  PY=$WORK/venv/bin/python
fi
# Every module the steps import (the project's lazy imports included), checked before anything runs.
MODULES=(torch numpy sentencepiece yaml psutil tqdm omegaconf megatron.core pause_megatron.pretrain
         data_prep.build_c4)
# lm-eval's stack (scikit-learn, scipy) does not fit in the 64 MiB a call carries (docs/performance.md):
# without it the finetune and evaluate steps are skipped, said so, and the rest runs.
EVAL=1
"$PY" -c 'import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]' datasets lm_eval \
  transformers pause_megatron.finetune pause_megatron.evaluate 2>/dev/null || EVAL=0
"$PY" - "${MODULES[@]}" <<'EOF' || { echo "install the missing wheels: bash benchmarks/gpu_wheels.sh" >&2; exit 2; }
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # an ImportError, or a module that fails on import (a version mismatch)
        missing.append(f"  {name}: {type(exc).__name__}: {exc}")
if missing:
    sys.exit("gpu_benchmark.sh: cannot import what the steps need:\n" + "\n".join(missing))
EOF

FAILED=()
LIMIT=60
limited() { timeout --kill-after=10 "$LIMIT" "$@"; }  # a step's commands run under its time limit
step() {  # step NAME SECONDS FUNCTION...: run FUNCTION (whose commands use `limited`); a failure is recorded
  local name=$1 t0=$SECONDS rc=0
  LIMIT=$(($2 * K))
  shift 2
  "$@" || rc=$?
  echo "$name: $((SECONDS - t0)) s, exit $rc"
  if [ "$rc" != 0 ]; then FAILED+=("$name (exit $rc)"); fi
}
if [ "$K" = 5 ]; then
  export PAUSE_MEGATRON_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  PRESET=tiny SEQ=128 BENCH=(--tiny) MICRO=(train.micro_batch_size=2 train.global_batch_size=8)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  PRESET=130m SEQ=2048 BENCH=(--only "130m:bf16,1b:bf16" --steps 6 --warmup 2)
  MICRO=(train.micro_batch_size=8 train.global_batch_size=32)
fi
"$PY" -m pause_megatron.kernels | tee "$OUT/kernels.txt"
bench() { limited "$PY" benchmarks/bench_gpu.py "${BENCH[@]}" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"; }
step bench 200 bench

data() {
  limited "$PY" -m data_prep.c4_sample "$WORK/json" --files 2 --docs-per-file 300 &&
    limited "$PY" -m data_prep.build_c4 build --input "$WORK/json" --output "$WORK/data" --seq-length "$SEQ" \
      --vocab-size 2000 --workers 4 >"$OUT/data_prep.log" 2>&1
}
step "data prep" 40 data
RUN=("model.preset=$PRESET" "data.path=$WORK/data" "train.output_dir=$WORK/pt" tracking.enabled=false "${MICRO[@]}")
pretrain() {  # pretrain STEPS LOG
  limited "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pause_megatron.pretrain "${RUN[@]}" \
    "train.steps=$1" 2>"$OUT/$2" | tail -3
}
step "pretrain 20" 90 pretrain 20 pretrain.err
step "resume to 30" 50 pretrain 30 resume.err
cp "$WORK/pt/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" 2>/dev/null || true

finetune() {
  limited "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pause_megatron.finetune task=squad \
    "train.init_from=$WORK/pt/checkpoints" "train.output_dir=$WORK/ft" train.steps=10 optim.warmup_steps=1 \
    train.micro_batch_size=2 train.global_batch_size=8 pauses.m_ft=10 tracking.enabled=false \
    data.task_dir=pause_megatron/sample_tasks 2>"$OUT/finetune.err" | tail -3
}
evaluate() {
  limited "$PY" -m pause_megatron.evaluate --checkpoint "$WORK/ft/checkpoints" --tasks squad \
    --data-dir pause_megatron/sample_tasks --limit 8 tracking.enabled=false 2>"$OUT/evaluate.err" |
    tee "$OUT/evaluate.txt"
}
if [ "$EVAL" = 1 ]; then
  step finetune 60 finetune
  step "evaluate (KV cache)" 60 evaluate
else
  echo "finetune, evaluate: SKIPPED: datasets / lm-eval not importable (their wheels exceed what a call carries)"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_benchmark.sh: failed: ${FAILED[*]} (logs in $OUT)" >&2
  exit 1
fi
echo "gpu_benchmark.sh: all steps ran (output in $OUT)"
