#!/usr/bin/env bash
# Fourth session, second GPU call (one GPU, one job at a time):
#   1. Phi-2 shape bf16 generation of 500 test dialogues, 64 forced tokens: CUDA-graph loop vs generate (issue 5/7)
#   2. SmolLM2 training throughput: full fine-tune at micro-batch 128, and torch.compile (issue 7)
#   3. SmolLM2 zero-shot eval under transformers 5.24 (what `pip install` gives users today; the image has
#      5.17): its SDPA path packs grouped-query heads for one-token decoding instead of copying K/V 3x
# Usage (GPU machine, after the install line, GGUF at /tmp/m/smollm2.gguf, 5.24 wheels in /tmp/tf524):
#   bash bench/round6.sh $OUT
set -uo pipefail
out=$1/r6 gguf=/tmp/m/smollm2.gguf data=.gpu/data
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
deadline=$(( $(date +%s) + ${LIMIT:-540} ))
left() { echo $(( deadline - $(date +%s) > 5 ? deadline - $(date +%s) : 5 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
timeout 200 python3 bench/phi2_shape.py --data $data --out "$out/phi2" --only gen-budget-generate,gen-budget \
  > "$out/phi2.log" 2>&1
cat "$out/phi2/phi2_shape.md"
ONLY="full-b128 lora-nodrop-b128-compile full-b128-compile" timeout 240 \
  bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_train.jsonl" > "$out/smollm2_train.log" 2>&1
cat "$out/smollm2_train.jsonl"
# transformers 5.24 on top of the image's packages, for the eval probes only
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site524 /tmp/tf524/*.whl
PYTHONPATH=/tmp/site524:${PYTHONPATH:-} python3 -c "import transformers; print('transformers', transformers.__version__)" | tee -a "$out/card.txt"
PYTHONPATH=/tmp/site524:${PYTHONPATH:-} ONLY="batch512 generate" timeout "$(left)" \
  bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_eval_tf524.jsonl" > "$out/smollm2_eval_tf524.log" 2>&1
cat "$out/smollm2_eval_tf524.jsonl"
tar czf /tmp/r6.tgz -C "$1" r6 && rm -rf "$out" && mv /tmp/r6.tgz "$1/"
