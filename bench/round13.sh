#!/usr/bin/env bash
# Fifth session, first SmolLM2 call (one H200, one job at a time; GGUF at /tmp/m/smollm2.gguf):
# train.compile now compiles each transformer block (one dynamic graph shared by all 30 blocks) instead of
# the whole body. Baseline and compiled runs of the same settings, 80 steps each, fresh process each.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
ONLY="${ONLY:-lora lora-compile lora-nodrop-b128 lora-nodrop-b128-compile full-b128 full-b128-compile}" \
  timeout "${LIMIT:-560}" bash bench/smollm2_speed.sh /tmp/m/smollm2.gguf .gpu/data "$out/smollm2_speed.jsonl" 2>&1 | tee "$out/log.txt" | grep -v "^\s*$" | cut -c1-300
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$out/log.txt"
