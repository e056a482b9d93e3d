# shellcheck shell=bash
# Shared by the sbatch scripts in slurm/: the environment in one block, and one srun step that starts every
# rank (one task per GPU; pause_megatron.runtime reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and takes the
# first host of SLURM_JOB_NODELIST as the rendezvous address). Every setting can be overridden from the
# environment of `sbatch` (sbatch exports it by default):
#   PAUSE_HOME             the project checkout (default: the directory sbatch was run from)
#   PAUSE_PYTHON           the Python that has pause-megatron installed (default: $PAUSE_HOME/.venv/bin/python,
#                          else python)
#   PAUSE_CONFIG           a recipe file (each script sets its own default)
#   PAUSE_OVERRIDES        extra dotted overrides, e.g. "parallel.tensor=2 train.steps=1000"
#   PAUSE_DATA             data.path (a data_prep/build_c4.py output directory)
#   PAUSE_OUTPUT           train.output_dir (checkpoints, metrics.jsonl)
#   PAUSE_MAX_REQUEUES     requeues in a row after stops that saved no newer checkpoint (default 3)
#   PAUSE_STOP_DIR         where a stopped step leaves .stop-<job id> (default: PAUSE_OUTPUT, else PAUSE_HOME/runs)
#   PAUSE_CONTAINER_IMAGE  run inside this image with pyxis/enroot (e.g. nvcr.io/nvidia/pytorch:25.04-py3,
#                          which brings Transformer Engine and apex); PAUSE_CONTAINER_MOUNTS for srun's mounts

PAUSE_HOME=${PAUSE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ -z "${PAUSE_PYTHON:-}" ]; then
  if [ -x "$PAUSE_HOME/.venv/bin/python" ]; then PAUSE_PYTHON=$PAUSE_HOME/.venv/bin/python; else PAUSE_PYTHON=python; fi
fi
PAUSE_OVERRIDES=${PAUSE_OVERRIDES:-}
PAUSE_CONTAINER_IMAGE=${PAUSE_CONTAINER_IMAGE:-}
PAUSE_CONTAINER_MOUNTS=${PAUSE_CONTAINER_MOUNTS:-$PAUSE_HOME:$PAUSE_HOME}

# NCCL and CUDA: fail fast on a broken collective instead of hanging; Megatron's TP communication overlap
# needs one hardware queue. Cluster-specific NCCL settings (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) belong in
# the environment you submit from; see docs/slurm.md.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
# Slurm 22.05-23.02: srun steps do not inherit sbatch's --cpus-per-task unless told (each rank would get one CPU).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

EXIT_STOPPED=75  # pause_megatron.job.EXIT_STOPPED: saved after SIGUSR1/SIGTERM, resume by running again

# Arrays are expanded as ${a[@]+"${a[@]}"}: "${a[@]}" of an empty array fails under `set -u` on bash < 4.4.

# run_ranks MODULE [ARGS...]: one srun step, one task per rank, all nodes of the allocation.
run_ranks() {
  local container=()
  if [ -n "$PAUSE_CONTAINER_IMAGE" ]; then
    container=(--container-image="$PAUSE_CONTAINER_IMAGE" --container-mounts="$PAUSE_CONTAINER_MOUNTS"
               --container-workdir="$PAUSE_HOME")
  fi
  echo "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} ranks, $PAUSE_PYTHON -m $*"
  (cd "$PAUSE_HOME" && srun --kill-on-bad-exit=1 ${container[@]+"${container[@]}"} "$PAUSE_PYTHON" -m "$@")
}

# run_step MODULE [ARGS...]: run_ranks, and end the job script unless the step finished. A step stopped by
# the time-limit signal or a preemption (checkpoint saved) requeues the job, which resumes from that checkpoint;
# the script exits at once, so nothing after the step runs on a partial result. The stopped ranks write the
# step they saved to $PAUSE_STOP_FILE (an evaluation writes nothing: it saves nothing) and exit 75; that file,
# not srun's exit code, says the step was stopped: with several ranks, srun --kill-on-bad-exit may report 137
# for ranks it killed itself. A job stopped PAUSE_MAX_REQUEUES times in a row without a newer checkpoint (an
# evaluation: any stop) is not requeued again: it ends with exit 75.
run_step() {
  local rc=0 stop=""
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    stop=${PAUSE_STOP_DIR:-${PAUSE_OUTPUT:-$PAUSE_HOME/runs}}/.stop-$SLURM_JOB_ID
    mkdir -p "$(dirname "$stop")"
    rm -f "$stop"
  fi
  export PAUSE_STOP_FILE=$stop
  run_ranks "$@" || rc=$?
  if [ -n "$stop" ] && [ "$rc" -ne 0 ] && { [ "$rc" -eq "$EXIT_STOPPED" ] || [ -f "$stop" ]; }; then
    local saved="" count=0 last=""
    if [ -f "$stop" ]; then saved=$(cat "$stop"); fi
    if [ -f "$stop.requeues" ]; then read -r count last < "$stop.requeues" || true; fi
    if [ -z "$saved" ] || [ "$saved" = "$last" ]; then count=$((count + 1)); else count=0; fi
    if [ "$count" -gt "${PAUSE_MAX_REQUEUES:-3}" ]; then
      echo "error: stopped $count times in a row with no newer checkpoint (exit $rc); not requeued again" \
           "(PAUSE_MAX_REQUEUES=${PAUSE_MAX_REQUEUES:-3})" >&2
      exit "$EXIT_STOPPED"
    fi
    echo "$count $saved" > "$stop.requeues"
    echo "stopped before the end (exit $rc, ${saved:+checkpoint at step $saved}${saved:-nothing saved}):" \
         "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [ "$rc" -ne 0 ]; then exit "$rc"; fi
  if [ -n "$stop" ]; then rm -f "$stop" "$stop.requeues"; fi
}

# train MODULE: run a training module with the recipe and overrides (run_step: requeued if it stopped early).
train() {
  local module=$1 overrides=()
  read -r -a overrides <<< "$PAUSE_OVERRIDES"
  if [ -n "${PAUSE_DATA:-}" ]; then overrides+=("data.path=$PAUSE_DATA"); fi
  if [ -n "${PAUSE_OUTPUT:-}" ]; then overrides+=("train.output_dir=$PAUSE_OUTPUT"); fi
  run_step "$module" --config "$PAUSE_CONFIG" ${overrides[@]+"${overrides[@]}"}
}
