#!/usr/bin/env bash
# Which training setting of a recipe scores best on validation? Each setting is the recipe ($CONFIG, default
# configs/gemma3-270m.yaml) with some keys changed, trained with `phi2sum train` and scored with `phi2sum eval` on the
# validation split only, greedy (the fast decoding; decodings are compared separately, on the chosen training).
# The test split is never scored here: pick on validation, then score the pick once with bench/quality.sh.
#
#   bash bench/sweep.sh MODEL DATA NAME=KEY=VALUE[,KEY=VALUE...] ...
#   e.g. CONFIG=configs/gemma3-270m.yaml bash bench/sweep.sh GEMMA_GGUF DIALOGSUM shipped= \
#          lr2e-4=train.learning_rate=2e-4 r128=lora.r=128,lora.alpha=256 3ep=train.epochs=3
#
# MODEL is model.name, DATA a DialogSum folder. Run folders go to $RUNS/sweep-NAME (default runs/); a setting whose
# validation metrics exist is not run again, so a sweep cut short (a GPU call's time limit) continues where it
# stopped (a training from its last checkpoint). PARALLEL=2 trains two settings at once on one GPU (a small model
# leaves most of an H200 idle; the memory check counts the other jobs' memory, and expandable segments keep each
# job's reserved memory close to what it uses; Gemma 3 270M at batch 32 fits two, not three). Writes
# bench/results/sweep/<card>-<date>[-$TAG].json and .md; a later sweep with the same TAG adds its settings to them.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,14p' "$0"; exit 2; }
model=$1 data=$2; shift 2
runs=${RUNS:-runs}
config=${CONFIG:-configs/gemma3-270m.yaml}
parallel=${PARALLEL:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
greedy=(--set generation.do_sample=false --set generation.mbr_candidates=0 --set generation.mbr_evidence=0
        --set generation.num_beams=1 --set generation.batch_size=128 --set generation.batch_tokens=200000)

one() {  # NAME KEY=VALUE,...
  local name=$1 sets=() run=$runs/sweep-$1
  [ -f "$run/eval-validation/metrics.json" ] && return 0
  IFS=, read -ra kv <<< "$2"
  for x in "${kv[@]}"; do [ -z "$x" ] || sets+=(--set "$x"); done
  # --resume: a training cut short continues from its last checkpoint; a finished one is not trained again.
  [ -f "$run/summary.json" ] ||
    phi2sum train --config "$config" --set "model.name=$model" --set "data.source=$data" ${sets[@]+"${sets[@]}"} \
      --set "train.output_dir=$run" --resume >> "$run.train.log" 2>&1
  phi2sum eval --adapter "$run" --compare none --set data.test_split=validation "${greedy[@]}" \
    --out "$run/eval-validation" > "$run.eval.log" 2>&1
}

mkdir -p "$runs"
names=() specs=()
for spec in "$@"; do
  names+=("${spec%%=*}") specs+=("${spec#*=}")
done
pids=() running=()
reap() {  # wait for the oldest setting still running
  wait "${pids[0]}" || echo "setting ${running[0]} failed: see $runs/sweep-${running[0]}.train.log / .eval.log"
  pids=("${pids[@]:1}") running=("${running[@]:1}")
}
for i in "${!names[@]}"; do
  one "${names[$i]}" "${specs[$i]}" & pids+=($!) running+=("${names[$i]}")
  [ ${#pids[@]} -lt "$parallel" ] || reap
done
while [ ${#pids[@]} -gt 0 ]; do reap; done

CONFIG=$config RUNS=$runs PARALLEL=$parallel python3 - "$model" "$data" "$@" <<'PY'
import json, os, sys
from pathlib import Path

sys.path.insert(0, "bench")
from common import environment, result_path, write_result

model, data, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
keys = ("rouge1", "rouge2", "rougeL")
result = {**environment(), "question": "sweep", "config": os.environ["CONFIG"],
          "command": f"CONFIG={os.environ['CONFIG']} bash bench/sweep.sh {model} {data} " + " ".join(specs),
          "path": "phi2sum train, then phi2sum eval on the validation split, greedy (the CLI)",
          "protocol": "validation ROUGE F1 (rouge-score, stemmed), 95% bootstrap intervals over dialogues; test not scored",
          "parallel": int(os.environ["PARALLEL"]), "runs": []}
for spec in specs:
    name, _, sets = spec.partition("=")
    run = Path(os.environ["RUNS"]) / f"sweep-{name}"
    row = {"name": name, "overrides": [x for x in sets.split(",") if x], "run": str(run)}
    try:
        summary = json.loads((run / "summary.json").read_text())
        ft = json.loads((run / "eval-validation" / "metrics.json").read_text())["models"]["fine-tuned"]
    except (OSError, ValueError, KeyError) as e:
        said = [line for log in (f"{run}.train.log", f"{run}.eval.log") if os.path.exists(log)
                for line in open(log, errors="replace") if line.startswith("error:")]
        row["error"] = said[-1].strip() if said else f"no result ({type(e).__name__}); see {run}.train.log and {run}.eval.log"
    else:
        row.update({"train_seconds": summary["seconds"], "best_eval_loss": summary["best_eval_loss"],
                    "steps": summary["steps"], "skipped_steps": summary.get("skipped_steps", 0),
                    "validation": {**{k: ft[k]["mean"] for k in keys}, **{f"ci95_{k}": ft[k]["ci95"] for k in keys},
                                   "mean_words": ft["mean_words"], "run_on_share": ft["run_on_share"],
                                   "hit_max_new_tokens_share": ft["hit_max_new_tokens_share"]}})
        row["validation"]["mean_r1_r2_rl"] = sum(ft[k]["mean"] for k in keys) / 3
    result["runs"].append(row)
# Settings scored by an earlier sweep into the same file (same card, date and TAG) stay in it.
path = result_path("sweep", result["card"], result["date"], ".json", os.environ.get("TAG") or None)
if path.exists():
    earlier = json.loads(path.read_text())
    names = {r["name"] for r in result["runs"]}
    result["runs"] = [r for r in earlier["runs"] if r["name"] not in names] + result["runs"]
    result["earlier_commands"] = [c for c in earlier.get("earlier_commands", []) + [earlier["command"]]
                                  if c != result["command"]]
done = sorted((r for r in result["runs"] if "error" not in r), key=lambda r: -r["validation"]["mean_r1_r2_rl"])
table = [f"Settings of {os.environ['CONFIG']}, each trained once and scored greedy on validation, best first. "
         f"train s is wall time, {result['parallel']} setting(s) sharing the card.", "",
         "| setting | overrides | validation R1 / R2 / RL | mean | run-on | best val. loss | train s |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
for r in done:
    v = r["validation"]
    table.append(f"| {r['name']} | {', '.join(r['overrides']) or '(as shipped)'} | "
                 + " / ".join(f"{v[k]:.4f}" for k in keys)
                 + f" | {v['mean_r1_r2_rl']:.4f} | {v['run_on_share']:.1%} | {r['best_eval_loss']:.4f} | {r['train_seconds']:.0f} |")
table += [f"| {r['name']} | failed: {r['error']} | | | | | |" for r in result["runs"] if "error" in r]
table += ["", "Earlier commands whose settings are in this table:", ""] + [f"    {c}" for c in result.get("earlier_commands", [])] \
    if result.get("earlier_commands") else []
print(write_result("sweep", result, table, os.environ.get("TAG") or None))
PY
