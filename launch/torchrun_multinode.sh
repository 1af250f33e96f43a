#!/usr/bin/env bash
# Multi-node launch with torchrun and c10d rendezvous: run this same command on every node.
#
#   # on node 0 (host node0) and on node 1, with NODE_RANK=0 and NODE_RANK=1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multinode.sh launch/train_char_lstm.py
#
# Variables:
#   NNODES           number of nodes (required; the same on every node)
#   NODE_RANK        this node's index, 0 .. NNODES-1 (required; with c10d the global ranks follow the
#                    order in which nodes join, so scripts must not assume node 0 holds rank 0)
#   MASTER_ADDR      host name or IP of the rendezvous host (usually node 0), reachable from every node (required)
#   MASTER_PORT      rendezvous port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE   processes per node (default: the number of GPUs; 2 on a machine without GPUs)
#   RDZV_ID          job id shared by the nodes of one run (default: distclip-$MASTER_PORT)
#   RDZV_TIMEOUT     seconds to wait for every node to join (default 300)
#   TORCHRUN         the torchrun command (default: torchrun)
#   DISTCLIP_CONFIG  distclip config every rank reads when the script gives none (a YAML path or inline YAML)
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the rendezvous host (node 0) reachable from every node}"
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "${NPROC_PER_NODE:-0}" -gt 0 ]] || NPROC_PER_NODE=2
fi
SCRIPT=${1:-launch/train_char_lstm.py}
shift || true

# shellcheck disable=SC2086
exec ${TORCHRUN:-torchrun} \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-distclip-$MASTER_PORT}" \
    --rdzv_conf "join_timeout=${RDZV_TIMEOUT:-300}" --max_restarts 0 \
    "$SCRIPT" "$@"
