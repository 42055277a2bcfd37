#!/usr/bin/env bash
# Several GPUs through accelerate: the Phi-2 shape (bf16 LoRA, configs/a100.yaml) trained by 1 process and
# by 2 processes (DDP via `accelerate launch`) with the same global batch (32 rows) and seed; compares real
# tokens/s and the loss curves. Usage on a 2-GPU machine, after the install line:
#   bash bench/multi_gpu.sh .gpu/data $OUT
# 4-bit per process (QLoRA, fp16): CONFIG=configs/p100.yaml MP=fp16 bash bench/multi_gpu.sh .gpu/data $OUT
set -euo pipefail
data=$1 out=$2 config=${CONFIG:-configs/a100.yaml} mp=${MP:-bf16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/cards.txt"
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); from phi2_shape import build_model; build_model(Path('$data'), Path('/tmp/phi2-shape'))"
common=(--config "$config" --set model.name=/tmp/phi2-shape --set "data.source=$data" --set train.max_steps=16
        --set train.eval_every=16 --set train.save_every=16 --set train.log_every=1 --set train.eval_max_rows=64
        --set train.early_stopping_patience=0 --set data.cache_dir=/tmp/p2s-cache --set train.batch_size=8)
CUDA_VISIBLE_DEVICES=0 python3 -m phi2sum train "${common[@]}" --set train.output_dir=/tmp/gpu1 --set train.grad_accum=4 2>&1 | tail -n 14
accelerate launch --num_processes 2 --num_machines 1 --mixed_precision "$mp" --dynamo_backend no -m phi2sum train "${common[@]}" \
  --set train.output_dir=/tmp/gpu2 --set train.grad_accum=2 2>&1 | tail -n 14
cp /tmp/gpu1/metrics.jsonl "$out/gpu1_metrics.jsonl"; cp /tmp/gpu2/metrics.jsonl "$out/gpu2_metrics.jsonl"
cp /tmp/gpu1/summary.json "$out/gpu1_summary.json"; cp /tmp/gpu2/summary.json "$out/gpu2_summary.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {n: [json.loads(x) for x in open(f"{out}/{n}_metrics.jsonl")] for n in ("gpu1", "gpu2")}
tps = {n: sum(r["tokens_per_second"] for r in v if r["kind"] == "train" and r["step"] > 3) /
          max(1, sum(1 for r in v if r["kind"] == "train" and r["step"] > 3)) for n, v in rows.items()}
loss = {n: [round(r["loss"], 4) for r in v if r["kind"] == "train"] for n, v in rows.items()}
ev = {n: [r["eval_loss"] for r in v if r["kind"] == "eval"] for n, v in rows.items()}
res = {"tokens_per_second": tps, "speedup": tps["gpu2"] / tps["gpu1"], "train_loss": loss, "eval_loss": ev}
json.dump(res, open(f"{out}/multi_gpu.json", "w"), indent=2)
print(json.dumps(res, indent=1))
PY
