#!/usr/bin/env bash
# Sixth session (issue 10), as run on one H100 after round23 (adapter in /tmp/final; round23's training was cut
# off by the call's time limit at step 590 and finished with `phi2sum train ... --resume`, see its README):
# four minimum-Bayes-risk settings on validation, each its own process, all four at once on the one GPU.
# Lesson: they fought for memory (generation halved its batches down to 1-4 dialogues) and only one finished
# within the 540 s limit; run such variants one after another.
set -uo pipefail
o=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$o"
c=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set data.cache_dir=/tmp/p2s-cache)
s=num_beams=1,do_sample=true,batch_size=64
for v in mbr32-t0.5:$s,temperature=0.5,mbr_candidates=32 mbr64-t0.5:$s,temperature=0.5,mbr_candidates=64 \
         mbr32-t0.4:$s,temperature=0.4,mbr_candidates=32 mbr64-t0.7:$s,temperature=0.7,mbr_candidates=64; do
  n=${v%%:*}; mkdir -p "$o/$n"
  timeout 540 python3 bench/decoding.py --adapter /tmp/final --split validation --out "$o/$n" "${c[@]}" --variant "$v" > "$o/$n/log.txt" 2>&1 &
done
wait
grep -hE "^(validation|test) |rror" "$o"/*/log.txt
