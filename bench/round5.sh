#!/usr/bin/env bash
# Fourth session, first GPU call (one GPU, jobs one after another so speeds are not shared):
#   1. SmolLM2 zero-shot eval generation, CUDA-graph greedy loop vs transformers' generate (issue 5):
#      bench/gen_profile.py (prefill vs per-token time, profile) and whole `phi2sum eval` processes
#   2. SmolLM2 training throughput at micro-batch 32 / 64 / 128 and a profile of one micro-batch (issue 7)
#   3. Phi-2 shape bf16: generation graph vs generate (token budget), and a profile of a bf16 LoRA micro-batch
# Usage (GPU machine, after the install line, GGUF at /tmp/m/smollm2.gguf): bash bench/round5.sh $OUT
set -uo pipefail
out=$1/r5 gguf=/tmp/m/smollm2.gguf data=.gpu/data
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
deadline=$(( $(date +%s) + ${LIMIT:-540} ))
left() { echo $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$out/card.txt"
prof() { timeout "$(left)" python3 bench/gen_profile.py --config configs/smollm2.yaml --set "model.name=$gguf" \
           --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache --set generation.batch_size=512 "$@"; }
prof --out "$out/gen_profile_graph.json" > "$out/gen_profile_graph.log" 2>&1
prof --set generation.cuda_graph=false --out "$out/gen_profile_generate.json" > "$out/gen_profile_generate.log" 2>&1
grep -h '"whole_seconds"\|decode_seconds_per_step\|prefill_seconds' "$out"/gen_profile_*.json
ONLY="batch512 generate lora lora-nodrop-b64 lora-nodrop-b128" timeout "$(left)" \
  bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_speed.jsonl" > "$out/smollm2_speed.log" 2>&1
cat "$out/smollm2_speed.jsonl"
timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/smollm2_profile" --only profile-smollm2,profile-smollm2-128 \
  > "$out/smollm2_profile.log" 2>&1
timeout "$(left)" python3 bench/phi2_shape.py --data $data --out "$out/phi2" --only gen-budget-generate,gen-budget,profile-nodrop \
  > "$out/phi2.log" 2>&1
cat "$out"/smollm2_profile/phi2_shape.md "$out"/phi2/phi2_shape.md 2>/dev/null
tar czf /tmp/r5.tgz -C "$1" r5 && rm -rf "$out" && mv /tmp/r5.tgz "$1/"
