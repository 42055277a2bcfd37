#!/usr/bin/env bash
# Tenth session (issue 10), a 2-GPU machine: the shipped recipe end to end, as a user runs it.
#   round40.sh train OUT       two trainings at once with configs/smollm2.yaml: s42 (train.seed=42, the config's
#                              seed then, GPU 0) and s1 (train.seed=1, GPU 1), into /tmp/r40/NAME
#   round40.sh eval OUT NAME   that adapter's `phi2sum eval --compare none` with the shipped generation settings
#                              (64 candidates at T 0.5 + 64 evidence samples at T 1.0 in one call): test on GPU 0,
#                              validation on GPU 1, at once. eval.save_candidates only adds the samples to the
#                              predictions file (read by the CPU analysis); it changes no draw. Like a user's
#                              `phi2sum eval --adapter runs/...`, the run's saved config.yaml is the base.
# GGUF at /tmp/m/smollm2.gguf, DialogSum (.gpu/data) copied to /tmp/data (../shared/gpu/README.md stages both; the
# GGUF went over in three parts, the tracked tree being 25 MB now); run after the install line.
set -uo pipefail
what=${1:-} o=${2:-}
[ -n "$o" ] || { echo "usage: round40.sh train OUT | eval OUT NAME" >&2; exit 2; }
rc=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$o" /tmp/r40
c=(--set model.name=/tmp/m/smollm2.gguf --set data.source=/tmp/data)
if [ "$what" = train ]; then
  for r in "s42:0:--set train.seed=42" "s1:1:--set train.seed=1"; do
    IFS=: read -r name gpu extra <<< "$r"
    # shellcheck disable=SC2086  # $extra is a list of --set options
    ( CUDA_VISIBLE_DEVICES=$gpu timeout "${TRAIN_LIMIT:-400}" python3 -m phi2sum train --config configs/smollm2.yaml \
        "${c[@]}" --set data.cache_dir=/tmp/r40/cache-$name --set train.output_dir=/tmp/r40/$name $extra --overwrite \
        > "$o/train-$name.log" 2>&1
      r=$?; echo "== train $name rc=$r"; [ $r -eq 0 ] || exit $r
      cp /tmp/r40/$name/summary.json "$o/summary-$name.json"; cp /tmp/r40/$name/metrics.jsonl "$o/metrics-$name.jsonl"
      cp /tmp/r40/$name/config.yaml "$o/config-$name.yaml" 2>/dev/null
      grep -vE "^\s*$|Loading weights" "$o/train-$name.log" | tail -n 4 | cut -c1-200 ) &
  done
  for job in $(jobs -p); do wait "$job" || rc=1; done
elif [ "$what" = eval ]; then
  name=${3:?usage: round40.sh eval OUT NAME}
  for r in "test:0" "validation:1"; do
    IFS=: read -r split gpu <<< "$r"
    out="$o/$split-$name"
    ( CUDA_VISIBLE_DEVICES=$gpu timeout "${EVAL_LIMIT:-560}" python3 -m phi2sum eval --adapter /tmp/r40/$name \
        --compare none --set data.test_split=$split \
        --set eval.save_candidates=true --out "$out" > "$out.log" 2>&1
      r=$?; echo "== eval $split $name rc=$r"
      grep -vE "^\s*$|Loading weights" "$out.log" | tail -n 14 | cut -c1-160
      [ $r -eq 0 ] || exit $r
      gzip -f "$out/predictions.jsonl" ) &
  done
  for job in $(jobs -p); do wait "$job" || rc=1; done
else
  echo "usage: round40.sh train OUT | eval OUT NAME" >&2; exit 2
fi
exit $rc
