#!/usr/bin/env bash
# SmolLM2-135M speed probes (issue 7/5), each a fresh `phi2sum` process as users run it:
# zero-shot eval of the 500 test dialogues under several generation settings (generation seconds come from
# metrics.json), then STEPS (default 80) training steps of configs/smollm2.yaml under several settings (real tokens/s
# after step 20, from metrics.jsonl). Usage (GPU machine, after the install line):
#   bash bench/smollm2_speed.sh /tmp/m/smollm2.gguf .gpu/data $OUT/smollm2_speed.jsonl
set -uo pipefail
gguf=$1 data=$2 results=$3
p2s() { python3 -m phi2sum "$@"; }
common=(--set "model.name=$gguf" --set "data.source=$data" --set data.cache_dir=/tmp/p2s-cache)
# The speed probes time greedy decoding in batches of 512 (configs/smollm2.yaml ships beam search).
greedy=(--set generation.num_beams=1 --set generation.length_penalty=1.0 --set generation.batch_size=512)
nvidia-smi --query-gpu=name --format=csv,noheader
# ONLY="batch512 static" runs just those variants (evals and trains by name), in ONLY's order within each
# group (evals before trains); a name that matches nothing is skipped with a warning.
# pick NAME:ARGS... prints the chosen entries, one per line, in ONLY's order (all of them without ONLY).
pick() {
  if [[ -z "${ONLY:-}" ]]; then printf '%s\n' "$@"; return; fi
  for want in $ONLY; do for v in "$@"; do [[ "${v%%:*}" == "$want" ]] && printf '%s\n' "$v"; done; done
}
evals=("batch512:" "budget64k:--set generation.batch_tokens=64000" "budget160k:--set generation.batch_tokens=160000"
       "static:--set generation.cache=static" "generate:--set generation.cuda_graph=false")
mapfile -t chosen < <(pick "${evals[@]}")
for v in "${chosen[@]}"; do
  name=${v%%:*}; read -ra extra <<< "${v#*:}"
  s=$(date +%s.%N)
  p2s eval --config configs/smollm2.yaml "${common[@]}" "${greedy[@]}" "${extra[@]}" --out "/tmp/zs-$name" 2>&1 | grep -E "rouge1|error" 
  python3 - "$name" "/tmp/zs-$name/metrics.json" "$s" "$results" <<'PY'
import json, sys, time
name, path, start, results = sys.argv[1:]
try:
    m = json.load(open(path))["models"]["base"]
    row = {"probe": "zero-shot eval", "variant": name, "generation_seconds": m["seconds"], "process_seconds": time.time() - float(start),
           "rouge1": m["rouge1"]["mean"], "hit_max": m["hit_max_new_tokens_share"]}
except Exception as e:
    row = {"probe": "zero-shot eval", "variant": name, "error": repr(e)}
print(json.dumps(row)); open(results, "a").write(json.dumps(row) + "\n")
PY
done
# Since the seventh session train.padding_mask defaults to false: every variant without "-mask" in its name runs
# without the padding mask (earlier rounds' figures are with it).
# The full fine-tune's settings, shared by its variants (expanded into each string; `read -ra` splits it).
full="--set lora.enabled=false --set train.learning_rate=1e-4"
full128c="$full --set train.batch_size=128 --set train.compile=true"
trains=("lora:" "lora-compile:--set train.compile=true" "lora-nodrop:--set lora.dropout=0" "lora-nodrop-compile:--set lora.dropout=0 --set train.compile=true"
        "full:$full" "lora-nodrop-b64:--set lora.dropout=0 --set train.batch_size=64"
        "lora-nodrop-b128:--set lora.dropout=0 --set train.batch_size=128"
        "lora-nodrop-b128-compile:--set lora.dropout=0 --set train.batch_size=128 --set train.compile=true"
        "full-b128:$full --set train.batch_size=128"
        "full-b128-compile:$full128c"
        "full-b256-compile:$full --set train.batch_size=256 --set train.compile=true"
        "full-b128-compile-cudnn:$full128c --set model.cudnn_attention=true"
        "full-b128-compile-nocudnn:$full128c --set model.cudnn_attention=false"
        "full-b128-compile-pad64:$full128c --set train.pad_to_multiple_of=64"
        "full-b128-compile-mask:$full128c --set train.padding_mask=true"
        "full-b128-compile-mask-pad64:$full128c --set train.padding_mask=true --set train.pad_to_multiple_of=64"
        "lora-compile-mask:--set train.compile=true --set train.padding_mask=true"
        "lora-compile-pad64:--set train.compile=true --set train.pad_to_multiple_of=64"
        "lora-compile-nocudnn:--set train.compile=true --set model.cudnn_attention=false"
        "full-compile:$full --set train.compile=true")
for want in ${ONLY:-}; do
  [[ " ${evals[*]%%:*} ${trains[*]%%:*} " == *" $want "* ]] || echo "warning: ONLY names no variant '$want'" >&2
done
mapfile -t chosen < <(pick "${trains[@]}")
for v in "${chosen[@]}"; do
  name=${v%%:*}; read -ra extra <<< "${v#*:}"
  # Its own Inductor cache per variant: a variant must not reuse another's compiled graphs (they can differ in
  # ways the cache key misses, e.g. SDPA's backend), and whole-run figures then all include a cold compile.
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$name p2s train --config configs/smollm2.yaml "${common[@]}" --set "train.output_dir=/tmp/spd-$name" --set train.max_steps=${STEPS:-80} \
    --set train.eval_every=0 --set train.early_stopping_patience=0 --set train.save_every=100000 --set train.log_every=10 --set train.keep_best=false \
    "${extra[@]}" --overwrite 2>&1 | grep -E "error|tokens/s" | tail -n 2
  python3 - "$name" "/tmp/spd-$name" "$results" "${STEPS:-80}" <<'PY'
import json, sys
name, run, results, steps = sys.argv[1:]
try:
    log = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
    steady = [r["tokens_per_second"] for r in log if r["kind"] == "train" and r["step"] > 20]
    s = json.load(open(f"{run}/summary.json"))
    row = {"probe": f"train {steps} steps", "variant": name, "steady_tokens_per_second": sum(steady) / len(steady),
           "whole_run_tokens_per_second": s["tokens_per_second"], "peak_memory_gib": s["peak_memory_gib"],
           "final_loss": s["train_loss"]}
except Exception as e:
    row = {"probe": f"train {steps} steps", "variant": name, "error": repr(e)}
print(json.dumps(row)); open(results, "a").write(json.dumps(row) + "\n")
PY
done
