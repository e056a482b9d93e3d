#!/usr/bin/env bash
# One device script (one GPU, no network, under 8 minutes): install the wheels carried in .whl/, then
#   1. the throughput table: project vs plain-PyTorch peer, 130m and 1b, seq 2048 (bench_gpu.py);
#   2. a 20-step 130m PausePT pretrain on NCCL, then a resume to step 30;
#   3. a finetune (squad) from it, and an evaluation with KV-cached decoding on the GPU.
# Output (logs, tables, metrics) goes to $OUT (default runs/gpu_benchmark). CPU rehearsal of every step
# (tiny preset, CPU emulation): GPU_BENCH_CPU=1 bash benchmarks/gpu_benchmark.sh
# Building .whl/ on a machine with network: see docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_benchmark}
mkdir -p "$OUT"
WORK=$(mktemp -d)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl
  export PYTHONPATH=$WORK/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
"$PY" -c "import megatron.core, omegaconf, sentencepiece" || { echo "missing wheels: see docs/performance.md"; exit 2; }
if [ "${GPU_BENCH_CPU:-0}" = 1 ]; then
  export PAUSE_MEGATRON_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  K=5  # 2 shared CPU cores: every time limit x5
  PRESET=tiny SEQ=128 BENCH=(--tiny) MICRO=(train.micro_batch_size=2 train.global_batch_size=8)
else
  K=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  PRESET=130m SEQ=2048 BENCH=(--only 130m:bf16,1b:bf16 --steps 6 --warmup 2)
  MICRO=(train.micro_batch_size=8 train.global_batch_size=32)
fi
"$PY" -m pause_megatron.kernels | tee "$OUT/kernels.txt"
t0=$SECONDS
timeout $((240 * K)) "$PY" benchmarks/bench_gpu.py "${BENCH[@]}" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
echo "bench: $((SECONDS - t0)) s"

t0=$SECONDS
"$PY" -m data_prep.c4_sample "$WORK/json" --files 2 --docs-per-file 300
"$PY" -m data_prep.build_c4 build --input "$WORK/json" --output "$WORK/data" --seq-length "$SEQ" \
  --vocab-size 2000 --workers 4 >"$OUT/data_prep.log" 2>&1
echo "data prep: $((SECONDS - t0)) s"
RUN=(model.preset=$PRESET data.path=$WORK/data train.output_dir=$WORK/pt tracking.enabled=false "${MICRO[@]}")
t0=$SECONDS
timeout $((150 * K)) "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pause_megatron.pretrain \
  "${RUN[@]}" train.steps=20 2>"$OUT/pretrain.err" | tail -3
timeout $((90 * K)) "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pause_megatron.pretrain \
  "${RUN[@]}" train.steps=30 2>"$OUT/resume.err" | tail -3
cp "$WORK/pt/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
echo "pretrain 20 + resume to 30: $((SECONDS - t0)) s"

t0=$SECONDS
timeout $((120 * K)) "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pause_megatron.finetune task=squad \
  train.init_from=$WORK/pt/checkpoints train.output_dir=$WORK/ft train.steps=10 optim.warmup_steps=1 \
  train.micro_batch_size=2 train.global_batch_size=8 pauses.m_ft=10 tracking.enabled=false \
  data.task_dir=pause_megatron/sample_tasks 2>"$OUT/finetune.err" | tail -3
timeout $((120 * K)) "$PY" -m pause_megatron.evaluate --checkpoint "$WORK/ft/checkpoints" --tasks squad \
  --data-dir pause_megatron/sample_tasks --limit 8 tracking.enabled=false 2>"$OUT/evaluate.err" | tee "$OUT/evaluate.txt"
echo "finetune + evaluate (KV cache): $((SECONDS - t0)) s"
