#!/bin/bash
# Submit a merge split into N parts: a job array of N part tasks, then the final step, which
# Slurm starts only when every array task succeeded (--dependency=afterok).
#
#   examples/slurm/submit.sh N BASE ADAPTER OUT [LORA_MERGE_OPTIONS...]
#
# Give every option (--dtype, --max-shard-size...) here: the parts and the final step must run
# the same merge. Prints the two job ids. If a part fails, the final step does not start: rerun
# that part (see merge_part.sbatch), or scancel the final job and submit finish.sbatch without
# the dependency: it computes the shards that part did not write.
set -euo pipefail
if [ "$#" -lt 4 ]; then
    echo "usage: $0 N BASE ADAPTER OUT [LORA_MERGE_OPTIONS...]" >&2
    exit 2
fi
parts=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
array=$(sbatch --parsable --array="0-$((parts - 1))" --export="ALL,LORA_MERGE_PARTS=${parts}" \
    "$here/merge_part.sbatch" "$@")
array=${array%%;*}  # --parsable prints JOBID or JOBID;CLUSTER
final=$(sbatch --parsable --dependency="afterok:${array}" "$here/finish.sbatch" "$@")
echo "parts: job array ${array} (${parts} tasks); final step: job ${final%%;*}"
