#!/usr/bin/env bash
# Seventh session, first SmolLM2 call (issue 7). train.padding_mask: false (now the default) leaves the padding
# mask out of the training forward (right padding + causal attention: same loss), so SDPA can run its causal
# kernels instead of a masked one. Same call, 80 steps each, each its own Inductor cache: SmolLM2 full fine-tune
# micro-batch 128 compiled with the mask (as before) and without it, then without it + widths padded to 64;
# the quality recipe (LoRA r=128, micro-batch 32, compiled) with and without; then a profile of the maskless step.
# As run (bench/results/session7/README.md): the variants ran in smollm2_speed.sh's order, the masked full
# fine-tune ran out of memory at step 68, and the call's 600 s limit cut lora-compile-mask and the profile.
# STEPS, ONLY and PROFILE=no (skip the profile) let round27.sh rerun it with other variants.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$out/card.txt"
STEPS=${STEPS:-80} ONLY="${ONLY:-full-b128-compile-mask full-b128-compile full-b128-compile-pad64 lora-compile-mask lora-compile}" \
  bash bench/smollm2_speed.sh /tmp/m/smollm2.gguf .gpu/data "$out/smollm2_speed.jsonl" > "$out/log.txt" 2>&1
grep -v "^\s*$" "$out/log.txt" | cut -c1-300
[[ "${PROFILE:-yes}" == yes ]] || exit 0
common=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set data.cache_dir=/tmp/p2s-cache)
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-prof timeout "${PROFILE_LIMIT:-150}" python3 bench/profile_train.py --config configs/smollm2.yaml \
  --out "$out/prof-full-b128-compile-nomask" "${common[@]}" --set lora.enabled=false --set train.learning_rate=1e-4 \
  --set train.batch_size=128 --set train.compile=true --skip 12 --active 5 > "$out/prof.log" 2>&1
grep -E "^\{|rror" "$out/prof.log" | cut -c1-600
rm -rf "$out"/prof-*/run
