#!/bin/bash
# Pretrain the paper's 1b decoder, StdPT (no pauses): sbatch slurm/pretrain_1b_std.sh
# Sizing and options: docs/slurm.md. Override anything from the environment, e.g.
#   PAUSE_DATA=/data/c4_2048 PAUSE_OUTPUT=/ckpt/pretrain_1b_std sbatch --nodes=4 slurm/pretrain_1b_std.sh
#SBATCH --job-name=pretrain_1b_std
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

PAUSE_CONFIG=${PAUSE_CONFIG:-recipes/pretrain_1b_std.yaml}
# shellcheck source=slurm/common.sh
source "${PAUSE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
train pause_megatron.pretrain
