#!/usr/bin/env bash
# Launch mm_moe.train with torchrun on one node or several.
#
#   launch/torchrun.sh experiment=tiny_dense                      # one node, all local GPUs/CPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh experiment=dense_1b   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh experiment=dense_1b   # on node1
#
# Every argument is a Hydra override passed to mm_moe.train. The environment is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON_BIN" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi

if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  exec "$PYTHON_BIN" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
    -m mm_moe.train "$@"
fi
exec "$PYTHON_BIN" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC_PER_NODE" --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  -m mm_moe.train "$@"
