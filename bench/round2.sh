#!/usr/bin/env bash
# A record of what ran: the continuous-batching parts (generation.engine continuous, gen-*-continuous stages)
# were removed after these measurements (docs/RESULTS.md); to rerun them use commit 7500770.
# Third session, call 1 of 2 on a 4-GPU machine (GGUF at /tmp/m/smollm2.gguf; no bitsandbytes in this call):
#   GPU0  generation engines: SmolLM2 zero-shot eval padded vs continuous batching (issue 5), then the
#         Phi-2 shape bf16, 64 forced tokens: batches of 256 / token budget / continuous (issue 7)
#   GPU1  decoding ablation on the shipped recipe (configs/smollm2.yaml retrained): greedy, beam 4 with
#         length penalties, scored on validation; the best and greedy then on test (issue 10)
#   GPU2  recipe + lr 6e-4      GPU3  recipe + 3 epochs   (validation greedy, test greedy)
# Usage (after the install line):  bash bench/round2.sh $OUT
set -uo pipefail
out=$1 gguf=/tmp/m/smollm2.gguf data=.gpu/data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
deadline=$(( $(date +%s) + ${LIMIT:-510} ))  # every job stops here, so the call returns its files
left() { echo $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )); }
common=(--set "model.name=$gguf" --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache)
mkdir -p "$out/phi2" "$out/decoding"
( export CUDA_VISIBLE_DEVICES=0
  ONLY="batch512 continuous" timeout "$(left)" bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_speed.jsonl"
  timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/phi2" --only gen-continuous,gen-budget,gen ) > "$out/gpu0.log" 2>&1 &
python3 -m phi2sum prepare --config configs/smollm2.yaml "${common[@]}" 2>&1 | tail -n 3

ablation() {  # NAME "VALIDATION VARIANTS" [train overrides...]: train, score on validation, then on test
  local name=$1 variants=$2; shift 2
  local run=/tmp/abl-$name dec=$out/decoding/$name vs=()
  for v in $variants; do vs+=(--variant "$v"); done
  timeout "$(left)" python3 -m phi2sum train --config configs/smollm2.yaml "${common[@]}" --set "train.output_dir=$run" "$@" \
    --overwrite 2>&1 | tail -n 4
  timeout "$(left)" python3 bench/decoding.py --adapter "$run" --split validation --out "$dec" "${common[@]}" "${vs[@]}" 2>&1 | grep -E "^validation|rror"
  timeout "$(left)" python3 bench/decoding.py --adapter "$run" --split test --out "$dec" "${common[@]}" --variant greedy: \
    --variant greedy-continuous:engine=continuous --pick-best-on "$dec/validation.jsonl" 2>&1 | grep -E "^test|rror"
  cp "$run/summary.json" "$dec/train_summary.json" 2>/dev/null
}

beams="greedy: beam4:num_beams=4,batch_size=128 beam4-lp0.6:num_beams=4,length_penalty=0.6,batch_size=128 beam4-lp1.6:num_beams=4,length_penalty=1.6,batch_size=128"
( export CUDA_VISIBLE_DEVICES=1; ablation recipe "$beams" ) > "$out/gpu1.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=2; ablation lr6e-4 greedy: --set train.learning_rate=6e-4 ) > "$out/gpu2.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=3; ablation epochs3 greedy: --set train.epochs=3 ) > "$out/gpu3.log" 2>&1 &
wait
tar czf "$out/runs.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='best' /tmp/abl-* 2>/dev/null
for f in gpu0 gpu1 gpu2 gpu3; do echo "== $f"; grep -v "^\s*$" "$out/$f.log" | tail -n 16 | cut -c1-220; done
tar czf "$out/logs.tgz" -C "$out" gpu0.log gpu1.log gpu2.log gpu3.log && rm -f "$out"/gpu?.log
cat "$out/phi2/phi2_shape.md" 2>/dev/null; cat "$out/smollm2_speed.jsonl" 2>/dev/null
