#!/usr/bin/env bash
# One eval per model of round31.sh, all four at once (one per GPU): SPLIT, 64 MBR candidates saved, sampled
# through phi2sum's CUDA-graph loop (batches of up to 700,000 cached tokens; 1,500,000 as first run ran out of memory).  Usage: round31_eval.sh OUT SPLIT [LIMIT_S]
set -uo pipefail
o=$1 split=$2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gpu=0
for name in s42 s1 s2 full; do
  CUDA_VISIBLE_DEVICES=$gpu timeout "${3:-240}" python3 -m phi2sum eval --adapter /tmp/r31/$name --compare none \
    --set data.test_split=$split --set generation.mbr_candidates=64 --set eval.save_candidates=true \
    --set generation.batch_tokens=700000 --out "$o/$split-$name" > "$o/eval-$split-$name.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for name in s42 s1 s2 full; do
  echo "== $split $name"; grep -vE "^\s*$|Loading weights" "$o/eval-$split-$name.log" | tail -n 12 | cut -c1-160
done
