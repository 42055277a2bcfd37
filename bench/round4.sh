#!/usr/bin/env bash
# A record of what ran: the continuous-batching parts (generation.engine continuous, gen-*-continuous stages)
# were removed after these measurements (docs/RESULTS.md); to rerun them use commit 7500770.
# Third session, last call (same warm 4-GPU machine as round2/3; GGUF at /tmp/m/smollm2.gguf; runs of round2
# in /tmp/abl-*): what round2 lost to the inference-mode bug and the deadline.
#   GPU0  SmolLM2 zero-shot eval of 500 test dialogues: padded vs continuous (issue 5)
#   GPU1  Phi-2 shape bf16 generation, 64 forced tokens: continuous vs token budget (issue 7)
#   GPU2  shipped recipe: validation beam4 with length penalties, then test greedy / continuous / best (issue 10)
#   GPU3  recipe + 3 epochs: validation and test greedy (issue 10)
set -uo pipefail
out=$1 gguf=/tmp/m/smollm2.gguf data=.gpu/data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
deadline=$(( $(date +%s) + ${LIMIT:-360} ))
left() { echo $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )); }
common=(--set "model.name=$gguf" --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache)
ls -d /tmp/abl-* /tmp/phi2-shape 2>&1
mkdir -p "$out/phi2" "$out/decoding/recipe" "$out/decoding/epochs3"
dec() { timeout "$(left)" python3 bench/decoding.py "${common[@]}" "$@" 2>&1 | grep -E "^(validation|test) |rror"; }
( export CUDA_VISIBLE_DEVICES=0; ONLY="batch512 continuous" timeout "$(left)" bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_speed.jsonl" ) > "$out/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1; timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/phi2" --only gen-continuous,gen-budget ) > "$out/gpu1.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=2
  cp /tmp/abl-recipe/summary.json "$out/decoding/recipe/train_summary.json"
  dec --adapter /tmp/abl-recipe --split validation --out "$out/decoding/recipe" --variant greedy: --variant beam4:num_beams=4,batch_size=128 \
    --variant beam4-lp0.6:num_beams=4,length_penalty=0.6,batch_size=128 --variant beam4-lp1.6:num_beams=4,length_penalty=1.6,batch_size=128
  dec --adapter /tmp/abl-recipe --split test --out "$out/decoding/recipe" --variant greedy: --variant greedy-continuous:engine=continuous \
    --pick-best-on "$out/decoding/recipe/validation.jsonl" ) > "$out/gpu2.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=3
  dec --adapter /tmp/abl-epochs3 --split validation --out "$out/decoding/epochs3" --variant greedy:
  dec --adapter /tmp/abl-epochs3 --split test --out "$out/decoding/epochs3" --variant greedy: ) > "$out/gpu3.log" 2>&1 &
wait
for f in gpu0 gpu1 gpu2 gpu3; do echo "== $f"; grep -v "^\s*$" "$out/$f.log" | grep -v "Loading weights" | tail -n 8 | cut -c1-250; done
cat "$out/phi2/phi2_shape.md" "$out/smollm2_speed.jsonl" 2>/dev/null
tar czf /tmp/round4.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/round4.tgz "$out/"
