#!/usr/bin/env bash
# GPU run of the real small model (SmolLM2-135M-Instruct) on all of DialogSum, through the CLI users run:
# zero-shot eval on the full test set (timed), training with configs/smollm2.yaml, validation ROUGE for
# model selection, then the test table base vs fine-tuned. Usage (GPU machine, after the install line):
#   bash bench/smollm2_quality.sh /tmp/m/smollm2.gguf .gpu/data $OUT
set -euo pipefail
gguf=$1 data=$2 out=$3
p2s() { python3 -m phi2sum "$@"; }
common=(--set "model.name=$gguf" --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache)
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/card.txt"
# 1. zero-shot, all 500 test dialogues (3 references each)
p2s eval --config configs/smollm2.yaml "${common[@]}" --out /tmp/eval-zeroshot 2>&1 | tail -n 14
cp /tmp/eval-zeroshot/metrics.json "$out/zeroshot_metrics.json"
# 2. train on all of train, validation loss for keep-best / early stopping
p2s train --config configs/smollm2.yaml "${common[@]}" --set train.output_dir=/tmp/run-smollm2 --overwrite 2>&1 | tail -n 16
cp /tmp/run-smollm2/summary.json "$out/train_summary.json"; cp /tmp/run-smollm2/loss.png "$out/loss.png"
cp /tmp/run-smollm2/metrics.jsonl "$out/train_metrics.jsonl"
# 3. test table: fine-tuned vs base
p2s eval --adapter /tmp/run-smollm2 "${common[@]}" --out /tmp/eval-test 2>&1 | tail -n 14
cp /tmp/eval-test/metrics.json "$out/test_metrics.json"; cp /tmp/eval-test/predictions.jsonl "$out/test_predictions.jsonl"
