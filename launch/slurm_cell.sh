#!/usr/bin/env bash
# One study cell as a SLURM task: sbatch --gpus=1 launch/slurm_cell.sh CONFIG CELL_INDEX [overrides...]
#SBATCH --job-name=forgetjax-cell
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?study config}; CELL=${2:?cell index}; shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
.venv/bin/forgetjax study "$CONFIG" "$@" --executor local --cell-index "$CELL" --no-report
