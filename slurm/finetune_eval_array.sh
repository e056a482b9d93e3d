#!/bin/bash
# Per-task pause finetuning + evaluation as a job array: one array task per (task, seed).
#   PAUSE_INIT=runs/pretrain_1b_pause/checkpoints PAUSE_OUTPUT=runs/ft_1b_pause sbatch slurm/finetune_eval_array.sh
# Array index i -> task TASKS[i / SEEDS], seed i % SEEDS: 9 tasks x 5 seeds = indices 0-44 (the paper's setup).
# PAUSE_M_FT (default 10), PAUSE_PLACEMENT (append | prepend | none | filler) and PAUSE_M_INF (default: M_FT)
# select the variant; PAUSE_TASK_DIR reads task data offline (<dir>/<task>/{train,eval}.jsonl).
#SBATCH --job-name=finetune_eval
#SBATCH --array=0-44
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

PAUSE_CONFIG=${PAUSE_CONFIG:-recipes/finetune.yaml}
read -r -a TASKS <<< "${PAUSE_TASKS:-gsm8k squad coqa commonsense_qa piqa hellaswag lambada webqs nq_open}"
SEEDS=${PAUSE_SEEDS:-5}
M_FT=${PAUSE_M_FT:-10}
M_INF=${PAUSE_M_INF:-$M_FT}
PLACEMENT=${PAUSE_PLACEMENT:-append}
INDEX=${SLURM_ARRAY_TASK_ID:-0}
# An array smaller than the sweep would cover part of it without a word: refuse, unless asked for a part
# (PAUSE_ARRAY_PART=1, e.g. --array=7,12 to redo two (task, seed) pairs).
if [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ] && [ "$SLURM_ARRAY_TASK_COUNT" -lt $((${#TASKS[@]} * SEEDS)) ] \
   && [ "${PAUSE_ARRAY_PART:-0}" != 1 ]; then
  echo "error: the array has $SLURM_ARRAY_TASK_COUNT tasks, the sweep ${#TASKS[@]} tasks x $SEEDS seeds =" \
       "$((${#TASKS[@]} * SEEDS)): submit --array=0-$((${#TASKS[@]} * SEEDS - 1)) (or set PAUSE_ARRAY_PART=1)" >&2
  exit 2
fi
if [ "$INDEX" -ge $((${#TASKS[@]} * SEEDS)) ]; then
  echo "error: array index $INDEX is past the sweep's ${#TASKS[@]} tasks x $SEEDS seeds" >&2
  exit 2
fi
TASK=${TASKS[$((INDEX / SEEDS))]}
SEED=$((INDEX % SEEDS))
OUT=${PAUSE_OUTPUT:-runs/finetune}/${TASK}/mft${M_FT}_${PLACEMENT}/seed${SEED}
TASK_DIR=${PAUSE_TASK_DIR:-}

# shellcheck source=slurm/common.sh
source "${PAUSE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
PAUSE_OVERRIDES="task=$TASK train.seed=$SEED pauses.m_ft=$M_FT pauses.placement=$PLACEMENT train.init_from=${PAUSE_INIT:?set PAUSE_INIT to a pretraining checkpoint} ${TASK_DIR:+data.task_dir=$TASK_DIR} $PAUSE_OVERRIDES"
PAUSE_OUTPUT=$OUT
train pause_megatron.finetune  # a stopped (requeued) finetune ends the script here: no partial checkpoint is evaluated
eval_args=(--checkpoint "$OUT/checkpoints" --tasks "$TASK" --output "$OUT/eval_minf${M_INF}.json")
if [ -n "$TASK_DIR" ]; then eval_args+=(--data-dir "$TASK_DIR"); fi
run_step pause_megatron.evaluate "${eval_args[@]}" "pauses.m_inf=$M_INF" "pauses.placement=$PLACEMENT"
