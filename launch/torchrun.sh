#!/usr/bin/env bash
# Single-node launch with torchrun: one process per GPU (NCCL), or NPROC_PER_NODE CPU processes (gloo).
#
#   launch/torchrun.sh [script.py [script args]]        default: launch/train_char_lstm.py (the DDP demo)
#   NPROC_PER_NODE=2 launch/torchrun.sh launch/train_char_lstm.py --config configs/demo.yaml --steps 50
#
# Variables (all optional):
#   NPROC_PER_NODE   processes to start (default: the number of GPUs; 2 on a machine without GPUs)
#   TORCHRUN         the torchrun command (default: torchrun)
#   DISTCLIP_CONFIG  distclip config every rank reads when the script gives none (a YAML path or inline YAML)
# The rendezvous is local (--standalone): torchrun picks a free port itself.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "${NPROC_PER_NODE:-0}" -gt 0 ]] || NPROC_PER_NODE=2
fi
SCRIPT=${1:-launch/train_char_lstm.py}
shift || true

# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
exec ${TORCHRUN:-torchrun} --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" "$SCRIPT" "$@"
