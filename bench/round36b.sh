#!/usr/bin/env bash
# Ninth session, second call (after round36.sh, same warm machine): test evals of the two models, the
# control's samples at temperature 1.0 on both splits (64 each: evidence/candidates for MBR studies on the
# CPU), and eval speed of the shared prefill: 100 validation dialogues x 64 samples with the s42 adapter, the
# previous commit's package (.gpu/base, each prompt prefilled 64 times) vs this one, same GPU, one after the other.
#   Usage: round36b.sh OUT
set -uo pipefail
o=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$o"
t1=(t1 --set generation.temperature=1.0)
( bash bench/round36_eval.sh "$o" 0 s42 test 250; bash bench/round36_eval.sh "$o" 0 s42 validation 250 "${t1[@]}" ) &
(
  bash bench/round36_eval.sh "$o" 1 ls test 250
  bash bench/round36_eval.sh "$o" 1 s42 test 250 "${t1[@]}"
  # The old package reads configs without this session's fields (extra=forbid): its copy of the run drops them.
  rm -rf /tmp/r36/s42-old && cp -r /tmp/r36/s42 /tmp/r36/s42-old
  sed -i '/label_smoothing\|neftune_alpha/d' /tmp/r36/s42-old/config.yaml
  for v in old new; do
    run=/tmp/r36/s42 pkg=$PWD
    [ $v = old ] && run=/tmp/r36/s42-old pkg=$PWD/.gpu/base
    # The package first on sys.path (python -m would put the working directory's phi2sum first).
    CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -c "import sys, runpy; sys.path.insert(0, '$pkg'); import phi2sum; \
print(phi2sum.__file__, flush=True); runpy.run_module('phi2sum', run_name='__main__')" eval --adapter $run \
      --compare none --limit 100 --set data.test_split=validation --out "$o/speed-$v" > "$o/speed-$v.log" 2>&1
    echo "== speed $v rc=$?"; grep -E "phi2sum/__init__|dialogues/s" "$o/speed-$v.log" | cut -c1-160
    grep -o '"seconds": [0-9.]*' "$o/speed-$v/metrics.json"
  done
) &
wait
