#!/usr/bin/env bash
# Sixth session, first SmolLM2 call (one H200; GGUF at /tmp/m/smollm2.gguf). Issue 7: where the full
# fine-tune's step time goes at micro-batch 128 (torch.profiler over the real loop), compiled and eager.
# Issue 10: retrain configs/smollm2.yaml exactly (seeded; adapters are not committed) into /tmp/final for
# the decoding ablation of round24.sh.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
common=(--set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set data.cache_dir=/tmp/p2s-cache)
full=(--set lora.enabled=false --set train.learning_rate=1e-4 --set train.batch_size=128)
timeout 200 python3 bench/profile_train.py --config configs/smollm2.yaml --out "$out/prof-full-b128-compile" "${common[@]}" \
  "${full[@]}" --set train.compile=true --skip 12 --active 5 2>&1 | grep -E "^\{|Self CUDA|rror" | cut -c1-600
timeout 100 python3 bench/profile_train.py --config configs/smollm2.yaml --out "$out/prof-full-b128-eager" "${common[@]}" \
  "${full[@]}" --set train.compile=false --skip 8 --active 5 2>&1 | grep -E "^\{|Self CUDA|rror" | cut -c1-600
rm -rf "$out"/prof-*/run
python3 -m phi2sum train --config configs/smollm2.yaml "${common[@]}" --set train.output_dir=/tmp/final --overwrite 2>&1 \
  | grep -vE "^\s*$|Loading weights" | tail -n 6 | cut -c1-200
cp /tmp/final/summary.json "$out/train_summary.json"; cp /tmp/final/metrics.jsonl "$out/train_metrics.jsonl"
