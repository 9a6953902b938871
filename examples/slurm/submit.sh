#!/bin/bash
# Submit the array of training tasks and the collect step that waits for all of them.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p logs
train_job=$(sbatch --parsable train_array.sbatch)
sbatch --dependency=afterok:"${train_job}" collect.sbatch
echo "submitted training array ${train_job} and its collect step"
