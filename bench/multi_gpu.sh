#!/usr/bin/env bash
# How does training scale from one GPU to two through `accelerate launch`, at the same global batch? Phi-2's shape
# (random weights, bench/common.py) trained by `phi2sum train` in 1 process (batch 8 x grad_accum 4) and in 2
# (`accelerate launch --num_processes 2`, batch 8 x grad_accum 2 each): 32 rows a step both ways, same seed.
# Compares real tokens/s (median of per-step windows after the first 3) and the losses; writes
# bench/results/multi_gpu/<card>-<date>.json and .md, per-step logs under bench/results/multi_gpu/raw/ (not in git).
#
#   bash bench/multi_gpu.sh DATA                                   bf16 LoRA, configs/a100.yaml
#   CONFIG=configs/p100.yaml MP=fp16 bash bench/multi_gpu.sh DATA  4-bit QLoRA, one quantized copy per process
#
# DATA is a DialogSum folder (train/validation/test.jsonl.gz). Needs 2 GPUs of one host.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,11p' "$0"; exit 2; }
data=$1 config=${CONFIG:-configs/a100.yaml} mp=${MP:-bf16} steps=${STEPS:-16} work=${WORK:-/tmp/phi2sum-bench/multi_gpu}
gpus=${GPUS:-0,1}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
mkdir -p "$work"
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); from common import build_phi2_shape; build_phi2_shape(Path('$data'), Path('$work/phi2-shape'))"
common=(--config "$config" --set "model.name=$work/phi2-shape" --set "data.source=$data" --set "train.max_steps=$steps"
        --set "train.eval_every=$steps" --set "train.save_every=$steps" --set train.log_every=1 --set train.eval_max_rows=64
        --set train.early_stopping_patience=0 --set train.batch_size=8)
one=(python3 -m phi2sum train "${common[@]}" --set "train.output_dir=$work/p1" --set train.grad_accum=4 --overwrite)
two=(accelerate launch --num_processes 2 --num_machines 1 --mixed_precision "$mp" --dynamo_backend no -m phi2sum train
     "${common[@]}" --set "train.output_dir=$work/p2" --set train.grad_accum=2 --overwrite)
CUDA_VISIBLE_DEVICES=${gpus%%,*} "${one[@]}"
CUDA_VISIBLE_DEVICES=$gpus "${two[@]}"
python3 - "$work" "$config" "$mp" "$0 $*" "${one[*]}" "${two[*]}" <<'PY'
import json, shutil, statistics, sys
from pathlib import Path

sys.path.insert(0, "bench")
from common import environment, raw_dir, result_path, write_result

work, config, mp, command, one, two = sys.argv[1:]
env = environment()
runs = []
for name, procs, accum, cmd in (("p1", 1, 4, one), ("p2", 2, 2, two)):
    log = [json.loads(x) for x in (Path(work) / name / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((Path(work) / name / "summary.json").read_text())
    windows = [r["tokens_per_second"] for r in log if r["kind"] == "train"][3:]
    runs.append({"processes": procs, "batch_size": 8, "grad_accum": accum, "rows_per_step": 8 * accum * procs,
                 "command": cmd, "real_tokens_per_s": statistics.median(windows), "windows_used": len(windows),
                 "windows_dropped": 3, "train_loss": [round(r["loss"], 4) for r in log if r["kind"] == "train"],
                 "validation_loss": [r["eval_loss"] for r in log if r["kind"] == "eval"],
                 "peak_allocated_gib": summary["peak_memory_gib"], "peak_reserved_gib": summary["peak_reserved_gib"]})
runs[1]["speedup"] = runs[1]["real_tokens_per_s"] / runs[0]["real_tokens_per_s"]
call = {"config": config, "mixed_precision": mp, "command": f"CONFIG={config} MP={mp} bash {command}", "runs": runs}
# One file per card and day; a second config the same day joins it as another call.
path = result_path("multi_gpu", env["card"], env["date"], ".json")
old = json.loads(path.read_text())["calls"] if path.exists() else []
calls = [c for c in old if c["config"] != config] + [call]
result = {**env, "question": "multi_gpu", "command": "; ".join(c["command"] for c in calls),
          "model": "Phi-2 shape (random weights)", "path": "phi2sum train (the CLI), alone and under accelerate launch",
          "metric": "real (non-pad) tokens/s over all processes, median of per-step windows after the first 3",
          "calls": calls}
raw = raw_dir("multi_gpu", env["card"], env["date"]) / Path(config).stem
for name in ("p1", "p2"):
    (raw / name).mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "summary.json"):
        shutil.copy(Path(work) / name / f, raw / name / f)
table = [result["metric"] + "; same global batch (32 rows), same seed.", "",
         "| config | precision | processes | batch x grad_accum | real tokens/s | speed-up | validation loss | peak allocated GiB |",
         "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
for c in calls:
    for r in c["runs"]:
        table.append(f"| {c['config']} | {c['mixed_precision']} | {r['processes']} | {r['batch_size']} x {r['grad_accum']} | "
                     f"{r['real_tokens_per_s']:,.0f} | {r.get('speedup', 1.0):.2f} | {r['validation_loss'][-1]:.4f} | "
                     f"{r['peak_allocated_gib']:.1f} |")
print(write_result("multi_gpu", result, table))
PY
