#!/usr/bin/env bash
# Sixth session, last call (issue 7): round23's profile showed cuDNN's SDPA costing ~150 ms of host time per
# step (the first cuDNN call of each step: most likely a plan built per new batch width), the GPU idle ~70% of a compiled full
# fine-tune step at micro-batch 128. Same settings with model.cudnn_attention=false (flash / memory-efficient SDPA), same call.
# Not a valid comparison as run: the second process reused the first one's compile cache (see the README).
# (As run, the baseline was named full-b128-compile: configs/smollm2.yaml did not set cudnn_attention yet.)
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
STEPS=${STEPS:-36} ONLY="${ONLY:-full-b128-compile-cudnn full-b128-compile-nocudnn}" \
  bash bench/smollm2_speed.sh /tmp/m/smollm2.gguf .gpu/data "$out/smollm2_speed.jsonl" 2>&1 | tee "$out/log.txt" | grep -v "^\s*$" | cut -c1-300
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$out/log.txt"
