#!/usr/bin/env bash
# Launch mm_moe.train with torchrun on one node or several.
#
#   launch/torchrun.sh experiment=tiny_dense                      # one node, all local GPUs/CPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh experiment=dense_1b   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh experiment=dense_1b   # on node1
#
# Several nodes: with NODE_RANK, each node takes the rank given (torchrun's static rendezvous;
# node 0 runs at MASTER_ADDR and holds global rank 0, which writes the checkpoints); without
# it, torchrun's c10d rendezvous at MASTER_ADDR numbers the nodes in the order they join.
# Every argument is a Hydra override passed to mm_moe.train. The environment is passed through.
# Knobs: NPROC_PER_NODE (default: the GPUs, or 2 CPU processes), PYTHON_BIN, MASTER_PORT
# (default 29500), SHUTDOWN_TIMEOUT: seconds torchrun waits after SIGTERM before SIGKILL
# (default 180, torchrun's own is 30): enough for the checkpoint a preempted run writes at
# its next step boundary. DRY_RUN=1 prints the command instead of running it.
# PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True (less fragmentation: MoE
# activations change shape every step). The command runs in the caller's folder: relative
# paths in the overrides (trainer.run_dir, tokenizer.path, data urls) are the caller's.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

PYTHON_BIN=${PYTHON_BIN:-$REPO/.venv/bin/python}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-180}
for knob in NNODES MASTER_PORT SHUTDOWN_TIMEOUT ${NPROC_PER_NODE:+NPROC_PER_NODE} \
    ${NODE_RANK:+NODE_RANK}; do
  if ! [[ "${!knob}" =~ ^[0-9]+$ ]] || { [[ $knob != NODE_RANK ]] && (( ${!knob} < 1 )); }; then
    echo "[torchrun.sh] $knob=${!knob} must be a whole number (NODE_RANK >= 0, the others >= 1)" >&2
    exit 2
  fi
done
if [[ -n "${NODE_RANK:-}" ]] && (( NODE_RANK >= NNODES )); then
  echo "[torchrun.sh] NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (nodes are 0..NNODES-1)" >&2
  exit 2
fi
if (( MASTER_PORT > 65535 )); then
  echo "[torchrun.sh] MASTER_PORT=$MASTER_PORT is not a port (1-65535)" >&2
  exit 2
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if ! "$PYTHON_BIN" -c 'import torch' >/dev/null 2>&1; then
  echo "[torchrun.sh] PYTHON_BIN=$PYTHON_BIN is not a python that imports torch: set PYTHON_BIN" \
    "to the environment that has mm_moe installed (make setup-run creates .venv)" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON_BIN" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi

# Recent torchrun takes --shutdown-timeout; older ones SIGKILL 30 s after SIGTERM.
grace=()
if "$PYTHON_BIN" -m torch.distributed.run --help 2>/dev/null | grep -q -- --shutdown-timeout; then
  grace=(--shutdown-timeout="$SHUTDOWN_TIMEOUT")
else
  echo "[torchrun.sh] this torchrun has no --shutdown-timeout: workers get 30 s after SIGTERM" >&2
fi

if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  cmd=("$PYTHON_BIN" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE")
elif [[ -n "${NODE_RANK:-}" ]]; then
  cmd=("$PYTHON_BIN" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
       --nproc_per_node="$NPROC_PER_NODE" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
       --master_port="$MASTER_PORT")
else
  cmd=("$PYTHON_BIN" -m torch.distributed.run --nnodes="$NNODES"
       --nproc_per_node="$NPROC_PER_NODE" --rdzv-backend=c10d
       --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:$MASTER_PORT")
  # The rendezvous connects to whatever listens there and, if that is not a rendezvous, waits
  # without a word for up to torchrun's join timeout (10 minutes): a taken port is said now.
  if "$PYTHON_BIN" -c '
import socket, sys
with socket.socket() as s:
    s.settimeout(2)
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
' "$MASTER_ADDR" "$MASTER_PORT" 2>/dev/null; then
    echo "[torchrun.sh] something already listens at MASTER_ADDR=$MASTER_ADDR" \
      "MASTER_PORT=$MASTER_PORT: unless it is this job's rendezvous (another node of it on" \
      "that host, started first), the rendezvous waits on it without a word; pick a free" \
      "MASTER_PORT" >&2
  fi
fi
cmd+=("${grace[@]}" -m mm_moe.train "$@")
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != "0" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
