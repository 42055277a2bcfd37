#!/usr/bin/env bash
# One call on a 4-GPU machine (used 2026-11-27, second session): four independent jobs, one per GPU, so a metered call
# does four things at once. GPU0 Phi-2-shape speed probes, GPU1 SmolLM2 speed probes, GPU2/GPU3 quality
# ablations (configs/smollm2.yaml was r=32 then; round 2 ran the same ablation script with --set overrides:
# train.epochs=3 / lora.r=128 lora.alpha=256 / full fine-tune lr 5e-5 3 epochs / lr 6e-4). Usage (after the install line, GGUF at /tmp/m/smollm2.gguf):  bash bench/round1.sh $OUT
set -uo pipefail
out=$1 gguf=/tmp/m/smollm2.gguf data=.gpu/data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m phi2sum prepare --config configs/smollm2.yaml --set "model.name=$gguf" --set "data.source=$data" \
  --set data.cache_dir=/tmp/p2s-cache 2>&1 | tail -n 5
mkdir -p "$out/phi2"
limit=${LIMIT:-480}
CUDA_VISIBLE_DEVICES=0 timeout $limit python3 bench/phi2_shape.py --data $data --out "$out/phi2" --steps 12 \
  --only profile,profile-nodrop,gen,gen-budget,bf16,bf16-nodrop,bf16-32,profile-compile,bf16-compile,gen-static > "$out/gpu0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout $limit bash bench/smollm2_speed.sh $gguf $data "$out/smollm2_speed.jsonl" > "$out/gpu1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 timeout $limit bash bench/smollm2_ablation.sh lora-r32 $gguf $data --set lora.r=32 --set lora.alpha=64 > "$out/gpu2.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 timeout $limit bash bench/smollm2_ablation.sh full-lr1e-4 $gguf $data --set lora.enabled=false \
  --set train.learning_rate=1e-4 > "$out/gpu3.log" 2>&1 &
wait
tar czf "$out/ablations.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='best' /tmp/abl-* 2>/dev/null
tar czf "$out/logs.tgz" -C "$out" gpu0.log gpu1.log gpu2.log gpu3.log  # one file back instead of four
for f in gpu0 gpu1 gpu2 gpu3; do echo "== $f"; grep -v "^\s*$" "$out/$f.log" | tail -n 22 | cut -c1-200; done; rm -f "$out"/gpu?.log
cat "$out/phi2/phi2_shape.md" 2>/dev/null; cat "$out/smollm2_speed.jsonl" 2>/dev/null
