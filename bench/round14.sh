#!/usr/bin/env bash
# Fifth session (issue 10): retrain configs/smollm2.yaml exactly (seeded; the adapter is not committed), then
# score minimum-Bayes-risk decoding on validation against the shipped beam 4 / length penalty 0.3.
# The run stays in /tmp/final for round15.sh (test split). GGUF at /tmp/m/smollm2.gguf.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out/decoding"
common=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set data.cache_dir=/tmp/p2s-cache)
python3 -m phi2sum train --config configs/smollm2.yaml "${common[@]}" --set train.output_dir=/tmp/final --overwrite 2>&1 \
  | grep -vE "^\s*$|Loading weights" | tail -n 25 | cut -c1-200
cp /tmp/final/summary.json "$out/train_summary.json"; cp /tmp/final/metrics.jsonl "$out/train_metrics.jsonl"
timeout "${LIMIT:-300}" python3 bench/decoding.py --adapter /tmp/final --split validation --out "$out/decoding" "${common[@]}" \
  --variant beam4-lp0.3:num_beams=4,length_penalty=0.3,batch_size=128 \
  --variant mbr8-beam-lp0.3:num_beams=8,mbr_candidates=8,length_penalty=0.3,batch_size=128 \
  --variant mbr16-sample-t0.7:num_beams=1,do_sample=true,temperature=0.7,mbr_candidates=16,batch_size=128 2>&1 \
  | grep -E "^(validation|test) |rror"
