#!/usr/bin/env bash
# mpirun launch, for clusters that start jobs with MPI: every MPI rank runs the script through
# distclip's mpi4py bootstrap (python -m distclip.mpi), which sets RANK, WORLD_SIZE, LOCAL_RANK
# (from an MPI shared-memory split), LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (broadcast from
# rank 0) as torchrun would; torch then uses gloo (CPU) or NCCL (GPU). Scripts written for torchrun
# run unchanged.
#
#   NP=2 launch/mpirun.sh launch/train_char_lstm.py --config configs/demo.yaml
#   NP=16 HOSTFILE=hosts NPERNODE=8 launch/mpirun.sh train.py
#
# Variables (all optional):
#   NP            total number of ranks (default 2)
#   HOSTFILE      MPI hostfile (default: every rank on this machine)
#   NPERNODE      ranks per node (Open MPI --npernode)
#   MPIRUN        the mpirun command (default: mpirun; Open MPI syntax below)
#   MPIRUN_ARGS   extra mpirun arguments, e.g. "--allow-run-as-root" (containers) or "--oversubscribe"
#                 (more ranks than cores)
#   PYTHON        the Python on every node, with distclip and mpi4py installed (default: python3)
#   MASTER_ADDR, MASTER_PORT   rendezvous; default: rank 0's host name and a free port there
#   DISTCLIP_CONFIG            distclip config for every rank (a YAML path or inline YAML)
# PATH, PYTHONPATH and the variables above that are set are exported to every rank (-x).
set -euo pipefail

SCRIPT=${1:-launch/train_char_lstm.py}
shift || true
args=(-np "${NP:-2}" --bind-to none)
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NPERNODE:-}" ]]; then args+=(--npernode "$NPERNODE"); fi
for var in PATH PYTHONPATH DISTCLIP_CONFIG MASTER_ADDR MASTER_PORT OMP_NUM_THREADS; do
    if [[ -n "${!var:-}" ]]; then args+=(-x "$var"); fi
done

# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of arguments
exec ${MPIRUN:-mpirun} "${args[@]}" ${MPIRUN_ARGS:-} "${PYTHON:-python3}" -m distclip.mpi "$SCRIPT" "$@"
