#!/usr/bin/env bash
# Build .whl/ (git-ignored): every wheel benchmarks/gpu_benchmark.sh needs on the device machine beyond what
# that machine already has. Run it on a machine with network to PyPI; it needs a Python 3.12 (the device's),
# taken from PATH or pyenv, and resolves natively (this machine: manylinux x86_64, like the device).
#   bash benchmarks/gpu_wheels.sh        -> .whl/*.whl, .whl/requirements.txt; fails over LIMIT_MIB (60)
# The device has no network and each `run` call carries at most 64 MiB, so the set is the closure of what the
# script's steps import, with the device's own packages (and everything they require) left out:
#   DEVICE  what the device has (docs/performance.md): resolved here only to know their requirements;
#   NEED    the project's runtime requirements and its `eval` extra, pinned by constraints/py3.12.txt, less
#           mlflow (the device script runs with tracking.enabled=false: its stack would not fit) and less
#           transformers (the device's 5.x is used: see docs/performance.md on the `eval` extra's <5 pin).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=${LIMIT_MIB:-60}
DEST=.whl
# python3.12 from PATH when it runs, else pyenv's newest 3.12 (pyenv's shim fails for a non-global version).
PY=${PY312:-$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
  || echo "$(pyenv root)/versions/$(pyenv latest 3.12)/bin/python3.12")}
DEVICE=(torch==2.11.0 triton numpy sentencepiece pyyaml psutil tqdm matplotlib "transformers>=5,<6" pandas pyarrow)
NEED=("megatron-core>=0.19,<0.20" "omegaconf>=2.3" "protobuf>=4" "datasets>=3,<5" "lm-eval>=0.4.5,<0.5")
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || {
  echo "gpu_wheels.sh: needs Python 3.12 (set PY312=...)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
resolve() {  # resolve REPORT [pip args...]: a dry-run install into an empty target, its report as name==version
  local report=$1; shift
  "$PY" -m pip install -q --dry-run --ignore-installed --target "$WORK/target" --report "$WORK/$report.json" "$@"
  "$PY" -c 'import json, sys
for p in json.load(open(sys.argv[1]))["install"]:
    print(p["metadata"]["name"].lower().replace("_", "-") + "==" + p["metadata"]["version"])' \
    "$WORK/$report.json" | sort >"$WORK/$report.txt"
}
resolve device "${DEVICE[@]}"
# The project's pins, less every package the device brings (its versions win, e.g. huggingface-hub 1.x); a
# package whose version the project needs differs from the device's (fsspec for datasets) is carried.
cut -d= -f1 "$WORK/device.txt" >"$WORK/device.names"
grep -v '^#' constraints/py3.12.txt | awk -F'==' 'NR==FNR {have[$1]; next}
  {n = tolower($1); gsub("_", "-", n); if (!(n in have)) print}' "$WORK/device.names" - >"$WORK/pins.txt"
resolve need -c "$WORK/pins.txt" "${NEED[@]}" "${DEVICE[@]}"
comm -23 "$WORK/need.txt" "$WORK/device.txt" >"$WORK/carry.txt"
rm -rf "$DEST"
mkdir -p "$DEST"
# Wheels as published; the few sdist-only packages (antlr4-python3-runtime, rouge-score, ...) built here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" -r "$WORK/carry.txt"
sed 's/^/  /' "$WORK/carry.txt"
printf '%s\n' "${NEED[@]}" >"$DEST/requirements.txt"
size=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$((size / 1048576))
echo "$DEST: $(wc -l <"$WORK/carry.txt") wheels, $mib MiB (limit $LIMIT_MIB MiB)"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels.sh: .whl/ is $mib MiB, over $LIMIT_MIB MiB: it cannot travel in one run call. Largest:" >&2
  du -m "$DEST"/*.whl | sort -rn | head -5 >&2
  exit 1
fi
