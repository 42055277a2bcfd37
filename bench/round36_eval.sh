#!/usr/bin/env bash
# One eval of a round36.sh model on one GPU: 64 MBR candidates saved with their log-probabilities, batches of
# the config's 300,000 cached tokens. EXTRA (optional) adds --set options and names the output folder
# (e.g. "t1 --set generation.temperature=1.0").
#   Usage: round36_eval.sh OUT GPU MODEL SPLIT LIMIT_S [TAG --set ...]
set -uo pipefail
o=$1 gpu=$2 name=$3 split=$4 limit=$5
shift 5
tag=${1:-}
[ -n "$tag" ] && shift
out="$o/$split-$name${tag:+-$tag}"
CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m phi2sum eval --adapter /tmp/r36/$name --compare none \
  --set data.test_split=$split --set eval.save_candidates=true "$@" --out "$out" > "$out.log" 2>&1
echo "== $split $name $tag rc=$?"; grep -vE "^\s*$|Loading weights" "$out.log" | tail -n 12 | cut -c1-160
gzip -f "$out/predictions.jsonl" 2>/dev/null
