#!/usr/bin/env bash
# Eighth session (issue 10), a 4-GPU machine: four trainings at once, one per GPU, then each model's validation
# eval with 64 MBR candidates saved (the candidates feed bench/mbr_pool.py on the CPU).
#   s42, s1, s2: configs/smollm2.yaml with train.seed 42 (the config's), 1, 2
#   full: the same data and schedule, every weight trained (lora.enabled=false, lr 1e-4: the second session's
#         full fine-tune ablation)
# All with train.pad_to_multiple_of=64 (issue 7's speed switch; same loss, other dropout draws). Runs in /tmp/r31.
# TRAIN_LIMIT (s) cuts a training short; `phi2sum train ... --resume` finishes it from its last checkpoint.
set -uo pipefail
o=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$o" /tmp/r31
c=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set train.pad_to_multiple_of=64)
runs=("s42:0:" "s1:1:--set train.seed=1" "s2:2:--set train.seed=2"
      "full:3:--set lora.enabled=false --set train.learning_rate=1e-4")
for r in "${runs[@]}"; do
  IFS=: read -r name gpu extra <<< "$r"
  # shellcheck disable=SC2086  # $extra is a list of --set options
  CUDA_VISIBLE_DEVICES=$gpu timeout "${TRAIN_LIMIT:-420}" python3 -m phi2sum train --config configs/smollm2.yaml "${c[@]}" \
    --set data.cache_dir=/tmp/r31/cache-$name --set train.output_dir=/tmp/r31/$name $extra --overwrite \
    > "$o/train-$name.log" 2>&1 &
done
wait
for r in "${runs[@]}"; do
  IFS=: read -r name gpu extra <<< "$r"
  cp /tmp/r31/$name/summary.json "$o/summary-$name.json" 2>/dev/null
  cp /tmp/r31/$name/metrics.jsonl "$o/metrics-$name.jsonl" 2>/dev/null
  grep -vE "^\s*$|Loading weights" "$o/train-$name.log" | tail -n 4 | cut -c1-200
done
bash bench/round31_eval.sh "$o" validation "${EVAL_LIMIT:-240}"
