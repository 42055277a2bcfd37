#!/usr/bin/env bash
# Fifth session (issues 10 and 7): the final SmolLM2 run, exactly as shipped (configs/smollm2.yaml: now with
# train.compile and MBR decoding), then its test eval with `phi2sum eval`. Run left in /tmp/final.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
common=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set data.cache_dir=/tmp/p2s-cache)
python3 -m phi2sum train --config configs/smollm2.yaml "${common[@]}" --set train.output_dir=/tmp/final --overwrite 2>&1 \
  | grep -vE "^\s*$|Loading weights" | tail -n 22 | cut -c1-200
cp /tmp/final/summary.json /tmp/final/metrics.jsonl /tmp/final/config.yaml /tmp/final/loss.png "$out/" 2>/dev/null
timeout "${LIMIT:-250}" python3 -m phi2sum eval --adapter /tmp/final --compare none --out /tmp/final/eval-test 2>&1 | grep -vE "^\s*$|Loading weights" | tail -n 14
cp -r /tmp/final/eval-test "$out/"
