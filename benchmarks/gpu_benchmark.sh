#!/usr/bin/env bash
# One command on one GPU (at most 10 minutes on an H100): install what is missing, then measure pretraining
# throughput for 130m and 1b in bf16 and fp8 and print a summary table.
#   bash benchmarks/gpu_benchmark.sh            (in an NGC PyTorch container, or any CUDA machine with pip)
# Wheels carried in .whl/ (no network) are installed first; see docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
"$PY" -c "import megatron.core" 2>/dev/null || "$PY" -m pip install -q "megatron-core>=0.16.1,<0.20"
"$PY" -c "import transformer_engine.pytorch" 2>/dev/null || "$PY" -m pip install -q --no-build-isolation "transformer-engine[pytorch]" || echo "note: no Transformer Engine: fp8 rows will fail"
"$PY" -c "import omegaconf, sentencepiece, mlflow, psutil, tqdm" 2>/dev/null || "$PY" -m pip install -q omegaconf sentencepiece mlflow psutil tqdm
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 540 "$PY" benchmarks/bench_gpu.py "$@"
