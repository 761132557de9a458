#!/usr/bin/env bash
# mtop-jax on GPUs: one node with all its GPUs, or several nodes (one process a node).
#
#   launch/gpu.sh [launcher flags] [--] TRAIN ARGS...
#
# One node: JAX runs one process over every visible GPU; nothing to set.
#   launch/gpu.sh --config configs/debian_packages.py --workdir workdirs/gpu
#
# Several nodes, flags (run the same line on every node, its own --process-id):
#   launch/gpu.sh --coordinator node0:12355 --num-processes 2 --process-id 0 \
#       --config configs/debian_packages.py --workdir /shared/runs/demo
#
# Several nodes under Slurm (srun, one task a node; see launch/slurm_example.sbatch):
# the coordinator is the first host of the job, the process count SLURM_NTASKS and
# the process id SLURM_PROCID.
#
# It exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# `mtop-jax train` hands to jax.distributed.initialize (mtop_jax/parallel/distributed.py).
#
# Launcher flags:
#   --coordinator HOST[:PORT]  process 0's address (PORT default --port)
#   --num-processes N          processes in all (one a node)
#   --process-id I             this process, 0..N-1
#   --port P                   coordinator port (default under Slurm: from the job id)
#   --dry-run                  print the variables and the command, run nothing
# The workdir must be one every node sees: a shared filesystem or gs://.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

coordinator=${JAX_COORDINATOR_ADDRESS:-}
num_processes=${JAX_NUM_PROCESSES:-}
process_id=${JAX_PROCESS_ID:-}
port=""
dry_run=0
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator=$2; shift 2 ;;
    --coordinator=*) coordinator=${1#*=}; shift ;;
    --num-processes) num_processes=$2; shift 2 ;;
    --num-processes=*) num_processes=${1#*=}; shift ;;
    --process-id) process_id=$2; shift 2 ;;
    --process-id=*) process_id=${1#*=}; shift ;;
    --port) port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1"); shift ;;
  esac
done

# The first host of a Slurm node list: scontrol when there is one, else the list itself
# (node01 | node01,node02 | node[01-04] | node[01,07-09],other).
first_host() {
  local list=$1 upto
  if command -v "${SCONTROL:-scontrol}" >/dev/null 2>&1; then
    "${SCONTROL:-scontrol}" show hostnames "$list" | head -n 1
    return
  fi
  upto=${list%%,*}
  if [[ $upto == *"["* ]]; then
    local prefix=${list%%\[*} inside=${list#*\[}
    echo "${prefix}${inside%%[],-]*}"
  else
    echo "$upto"
  fi
}

if [ -z "$coordinator" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}}
  coordinator=$(first_host "$nodelist")
  port=${port:-$((61440 + SLURM_JOB_ID % 4096))}  # as JAX's own Slurm detection picks it
  num_processes=${num_processes:-$SLURM_NTASKS}
  process_id=${process_id:-${SLURM_PROCID:?SLURM_PROCID is not set: run under srun}}
fi

if [ -n "$coordinator" ]; then
  if [ -z "$num_processes" ] || [ -z "$process_id" ]; then
    echo "gpu.sh: --coordinator needs --num-processes and --process-id" >&2
    exit 2
  fi
  if [ "$process_id" -lt 0 ] || [ "$process_id" -ge "$num_processes" ]; then
    echo "gpu.sh: --process-id $process_id is not in 0..$((num_processes - 1))" >&2
    exit 2
  fi
  [[ $coordinator == *:* ]] || coordinator="$coordinator:${port:-12355}"
  export JAX_COORDINATOR_ADDRESS=$coordinator
  export JAX_NUM_PROCESSES=$num_processes
  export JAX_PROCESS_ID=$process_id
fi

if [ -n "${MTOP_JAX:-}" ]; then
  mtop=$MTOP_JAX
elif [ -x "$root/.venv/bin/mtop-jax" ]; then
  mtop=$root/.venv/bin/mtop-jax
else
  mtop=mtop-jax
fi
cmd=("$mtop" train "${train_args[@]}")

if [ "$dry_run" = 1 ]; then
  for var in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do
    if [ -n "${!var:-}" ]; then
      echo "export $var=${!var}"
    fi
  done
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
cd "$root"
exec "${cmd[@]}"
