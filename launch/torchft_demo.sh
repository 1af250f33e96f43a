#!/bin/bash
# The runs shown in docs/guides/torchft.md: a torchft Lighthouse and replica groups (torchrun jobs) of
# launch/torchft_example.py on this machine (CPU, gloo). Logs go to $OUT (default /tmp/torchft_demo).
#   launch/torchft_demo.sh ddp      2 replica groups, torchft's DistributedDataParallel
#   launch/torchft_demo.sh fsdp     2 replica groups x 2 ranks, fully_shard inside each group
#   launch/torchft_demo.sh rejoin   3 replica groups; group 2 crashes after step 3 and is started again
set -u
MODE=${1:-ddp}
OUT=${OUT:-/tmp/torchft_demo}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 RUST_LOG=error TORCHFT_LIGHTHOUSE=http://localhost:29510

torchft_lighthouse --min_replicas 2 --join_timeout_ms 1000 --bind "[::]:29510" > "$OUT/lighthouse.log" 2>&1 &
LIGHTHOUSE=$!
trap 'kill $LIGHTHOUSE 2>/dev/null' EXIT

group() {  # group <id> <nproc> <port> <log> <args...>: one replica group, in the background
  local id=$1 nproc=$2 port=$3 log=$4; shift 4
  REPLICA_GROUP_ID=$id timeout 300 torchrun --nproc_per_node "$nproc" --master_port "$port" \
    launch/torchft_example.py --compare "$@" > "$log" 2>&1 &
}

case $MODE in
  ddp)
    group 0 1 29600 "$OUT/group0.log"; A=$!
    group 1 1 29601 "$OUT/group1.log"; B=$!
    wait $A $B ;;
  fsdp)
    group 0 2 29600 "$OUT/group0.log" --fsdp; A=$!
    group 1 2 29601 "$OUT/group1.log" --fsdp; B=$!
    wait $A $B ;;
  rejoin)
    ARGS="--steps 20 --sleep 1.0"
    group 0 1 29600 "$OUT/group0.log" $ARGS; A=$!
    group 1 1 29601 "$OUT/group1.log" $ARGS; B=$!
    group 2 1 29602 "$OUT/group2.log" $ARGS; C=$!
    until grep -q "step=3 " "$OUT/group2.log"; do sleep 0.1; done
    TORCHRUN=$(pgrep -P $C); WORKER=$(pgrep -P "$TORCHRUN")  # timeout -> torchrun -> the replica's process
    kill -9 "$WORKER"  # group 2 dies as a crashed rank would (torchrun then exits)
    echo "killed replica group 2 after its step 3; starting it again"
    group 2 1 29603 "$OUT/group2-again.log" $ARGS; D=$!
    wait $A $B $D ;;
  *) echo "usage: $0 ddp|fsdp|rejoin" >&2; exit 2 ;;
esac
grep -h "replica_group=" "$OUT"/group*.log
