#!/usr/bin/env bash
# One step of the SmolLM2 quality ablation (issue 10): train configs/smollm2.yaml with the given overrides,
# then score greedy and beam-4 (+ no-repeat trigrams) decoding on validation (for choosing) and test (for
# reporting the choice). Usage (GPU machine, after the install line and a `phi2sum prepare` of the same data):
#   bash bench/smollm2_ablation.sh NAME /tmp/m/smollm2.gguf .gpu/data [--set section.field=value ...]
# Leaves /tmp/abl-NAME (run + eval-{validation,test}-{greedy,beam4}/).
set -uo pipefail
name=$1 gguf=$2 data=$3; shift 3
p2s() { python3 -m phi2sum "$@"; }
common=(--set "model.name=$gguf" --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache)
run=/tmp/abl-$name
nvidia-smi --query-gpu=name --format=csv,noheader
p2s train --config configs/smollm2.yaml "${common[@]}" --set "train.output_dir=$run" --set train.save_every=100000 \
  "$@" --overwrite 2>&1 | tail -n 6
for split in validation test; do
  p2s eval --adapter "$run" "${common[@]}" --set "data.test_split=$split" --set generation.num_beams=1 \
    --set generation.length_penalty=1.0 --set generation.batch_size=512 --compare none --out "$run/eval-$split-greedy" \
    2>&1 | grep -E "rouge|words|ran past|hit max|dialogues/s"
  p2s eval --adapter "$run" "${common[@]}" --set "data.test_split=$split" --set generation.num_beams=4 --set generation.length_penalty=1.0 \
    --set generation.no_repeat_ngram_size=3 --set generation.batch_size=128 --compare none \
    --out "$run/eval-$split-beam4" 2>&1 | grep -E "rouge|words|ran past|hit max|dialogues/s"
done
