#!/usr/bin/env bash
# A record of what ran: the continuous-batching parts (generation.engine continuous, gen-*-continuous stages)
# were removed after these measurements (docs/RESULTS.md); to rerun them use commit 7500770.
# Third session, call 2 of 2 on the same 4-GPU machine (bitsandbytes carried; /tmp/phi2-shape may be left
# from call 1):
#   GPU0+1  4-bit QLoRA, one quantized copy per process: configs/p100.yaml, 1 process vs 2 (issue 8)
#   GPU2    seed recipe, p100.yaml (peak memory), QLoRA bf16 with dropout 0, 4-bit generation padded vs
#           continuous (issue 7)
#   GPU3    bf16 LoRA (a100.yaml, dropout 0) without and with train.compile (issue 7)
# Usage (after the install line with .gpu/bnb):  bash bench/round3.sh $OUT
set -uo pipefail
out=$1 data=.gpu/data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
deadline=$(( $(date +%s) + ${LIMIT:-510} ))
left() { echo $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )); }
# Build the random Phi-2 shape once before the jobs that share it.
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); from phi2_shape import build_model; build_model(Path('$data'), Path('/tmp/phi2-shape'))"
mkdir -p "$out/multi_gpu_4bit" "$out/phi2_qlora" "$out/phi2_bf16"
( export CUDA_VISIBLE_DEVICES=0,1; CONFIG=configs/p100.yaml MP=fp16 timeout "$(left)" bash bench/multi_gpu.sh $data "$out/multi_gpu_4bit" ) > "$out/gpu01.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=2; timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/phi2_qlora" \
    --only qlora-bf16-nodrop,seed,gen-4bit-continuous,gen-4bit,p100 ) > "$out/gpu2.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=3; timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/phi2_bf16" \
    --only bf16-nodrop,bf16-compile ) > "$out/gpu3.log" 2>&1 &
wait
for f in gpu01 gpu2 gpu3; do echo "== $f"; grep -v "^\s*$" "$out/$f.log" | tail -n 20 | cut -c1-220; done
cat "$out"/phi2_*/phi2_shape.md "$out/multi_gpu_4bit/multi_gpu.json" 2>/dev/null
# One archive back: the device tool returns only a few files per call.
tar czf /tmp/round3.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/round3.tgz "$out/"
