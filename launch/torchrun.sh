#!/usr/bin/env bash
# Launch launch/train.py with torchrun on one machine or on each of several machines.
#
#   one machine, every GPU:  bash launch/torchrun.sh --block bottleneck --depth 50 --data cifar10 --batch-size 1024
#   one machine, 2 CPU ranks: NPROC=2 bash launch/torchrun.sh --data digits --device cpu --max-steps 3 --batch-size 32
#   node R of 2 (run on each): NNODES=2 NODE_RANK=R MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 RDZV_ID=myjob \
#                              bash launch/torchrun.sh --block bottleneck --depth 50 --data cifar10 --batch-size 2048
#
# Every argument is forwarded to launch/train.py (python launch/train.py --help lists them);
# --batch-size is the GLOBAL batch over all NNODES x NPROC processes. docs/distributed.md has the rest.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: [ENV=...] bash launch/torchrun.sh [TRAIN.PY ARGUMENTS...]

Runs launch/train.py under torchrun; all arguments go to train.py unchanged
(see: python launch/train.py --help). --batch-size is the global batch.

Environment:
  NPROC        processes on this machine (default: the GPUs in CUDA_VISIBLE_DEVICES,
               else the GPUs nvidia-smi lists, else 1)
  NNODES       machines in the job (default 1). With NNODES=1 torchrun runs --standalone
               (a free port on localhost; MASTER_ADDR/MASTER_PORT are not used).
  NODE_RANK    this machine's rank, 0..NNODES-1 (default: $SLURM_NODEID, else 0)
  MASTER_ADDR  address of the rendezvous host, reachable from every machine (needed when NNODES > 1)
  MASTER_PORT  its port (default 29500)
  RDZV_ID      job id shared by all machines of one run (default: $SLURM_JOB_ID, else resnet_scale)
  TORCHRUN     the torchrun command (default: torchrun)

Multi-node uses c10d rendezvous:
  torchrun --nnodes NNODES --node-rank NODE_RANK --nproc-per-node NPROC \
           --rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT --rdzv-id RDZV_ID launch/train.py ...
Two "nodes" on one machine: MASTER_ADDR=127.0.0.1 and run NODE_RANK=0 and NODE_RANK=1 side by side.
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN="$ROOT/launch/train.py"
TORCHRUN="${TORCHRUN:-torchrun}"

count_gpus() {
    # CUDA_VISIBLE_DEVICES (set by SLURM and by users) wins over what the machine has.
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local IFS=','
        # shellcheck disable=SC2206
        local ids=($CUDA_VISIBLE_DEVICES)
        echo "${#ids[@]}"
        return
    fi
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$n" =~ ^[0-9]+$ ]] && (( n > 0 )); then echo "$n"; else echo 1; fi
}

NPROC="${NPROC:-$(count_gpus)}"
NNODES="${NNODES:-1}"
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun.sh: NNODES must be a positive integer, got '$NNODES'" >&2
    exit 2
fi

if (( NNODES == 1 )); then
    cmd=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$NPROC")
else
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-resnet_scale}}"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the rendezvous host, reachable from every node)" >&2
        exit 2
    fi
    if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
        echo "torchrun.sh: NODE_RANK must be 0..$((NNODES - 1)), got '$NODE_RANK'" >&2
        exit 2
    fi
    cmd=("$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC"
         --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
fi

echo "torchrun.sh: ${cmd[*]} $TRAIN $*" >&2
exec "${cmd[@]}" "$TRAIN" "$@"
