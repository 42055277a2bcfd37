#!/usr/bin/env bash
# Ninth session (issue 10), a 2-GPU machine, first call: the GPU check of sampling in the captured graph, two
# trainings at once (one per GPU), then each one's validation eval with its 64 candidates and their
# log-probabilities saved (read on the CPU by the ninth-session analysis).
#   s42: configs/smollm2.yaml as shipped (seed 42): the control
#   ls:  + train.label_smoothing=0.1 (seed 42)
# Runs in /tmp/r36; bench/round36_eval.sh is the second call.  Usage: round36.sh OUT
set -uo pipefail
o=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$o" /tmp/r36
CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/graph_check.py > "$o/graph_check.log" 2>&1
echo "graph_check rc=$?"; grep '^{' "$o/graph_check.log" | cut -c1-220
c=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data)
runs=("s42:0:" "ls:1:--set train.label_smoothing=0.1")
for r in "${runs[@]}"; do
  IFS=: read -r name gpu extra <<< "$r"
  # shellcheck disable=SC2086  # $extra is a list of --set options
  CUDA_VISIBLE_DEVICES=$gpu timeout "${TRAIN_LIMIT:-330}" python3 -m phi2sum train --config configs/smollm2.yaml "${c[@]}" \
    --set data.cache_dir=/tmp/r36/cache-$name --set train.output_dir=/tmp/r36/$name $extra --overwrite \
    > "$o/train-$name.log" 2>&1 &
done
wait
for r in "${runs[@]}"; do
  IFS=: read -r name gpu extra <<< "$r"
  cp /tmp/r36/$name/summary.json "$o/summary-$name.json" 2>/dev/null
  cp /tmp/r36/$name/metrics.jsonl "$o/metrics-$name.jsonl" 2>/dev/null
  grep -vE "^\s*$|Loading weights" "$o/train-$name.log" | tail -n 3 | cut -c1-200
done
gpu=0
for name in s42 ls; do
  bash bench/round36_eval.sh "$o" $gpu $name validation "${EVAL_LIMIT:-250}" &
  gpu=$((gpu + 1))
done
wait
