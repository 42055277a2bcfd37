"""Decoding ablation for one trained run (issue 10): load the run's model once, score several generation
settings on a split, write one metrics row per setting. Each row is what `phi2sum eval --set
generation.X=...` would report (same generate, same scorer); loading once saves ~15 s per setting.

    python3 bench/decoding.py --adapter /tmp/abl-r128 --split validation --out DIR \\
        --set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data \\
        --variant greedy: --variant beam4:num_beams=4,batch_size=128
    # --pick-best-on DIR/validation.jsonl: also score the best validation variant (by ROUGE-1) on this split

Writes DIR/<split>.jsonl (one row per variant) and DIR/<split>-<variant>.predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from phi2sum import data as data_mod
from phi2sum import evaluate
from phi2sum.config import GenerationConfig, load_config


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    update = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        update[key] = yaml.safe_load(value)  # YAML rules, as `--set` in the CLI
    return name, update


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value (generation.*)")
    ap.add_argument("--pick-best-on", type=Path, help="validation results file: add its best variant")
    args = ap.parse_args()

    variants = [parse_variant(v) for v in args.variant]
    if args.pick_best_on:
        scored = [json.loads(x) for x in args.pick_best_on.read_text().splitlines()]
        best = max(scored, key=lambda r: r["rouge1"]["mean"])
        variants.append((best["variant"], best["settings"]))
    cfg = load_config(Path(args.adapter) / "config.yaml", args.overrides + [f"data.test_split={args.split}"])
    rows = data_mod.load_split(cfg.data, args.split, merge_duplicates=True)
    loaded = evaluate.load_for_inference(cfg, args.adapter)
    args.out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for name, update in variants:
        if name in seen:
            continue
        seen.add(name)
        gen = GenerationConfig.model_validate({**cfg.generation.model_dump(), **update})  # typos fail here
        sync()
        started = time.perf_counter()
        gens = evaluate.generate(loaded, rows.dialogues, cfg.data.instruction, gen)
        sync()
        seconds = time.perf_counter() - started
        row = evaluate.score_model(args.adapter, gens, rows.references, cfg, seconds)
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        row.update(variant=name, settings=update, split=args.split, n=len(gens), card=card)
        with (args.out / f"{args.split}.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        with (args.out / f"{args.split}-{name}.predictions.jsonl").open("w") as fh:
            for i, r, g in zip(rows.ids, rows.references, gens):
                fh.write(json.dumps({"id": i, "references": r, "prediction": g.text, "new_tokens": g.new_tokens}) + "\n")
        print(f"{args.split} {name}: R1 {row['rouge1']['mean']:.4f} R2 {row['rouge2']['mean']:.4f} "
              f"RL {row['rougeL']['mean']:.4f} words {row['mean_words']:.1f} (refs {row['reference_mean_words']:.1f}) "
              f"run-on {row['run_on_share']:.3f} hit-max {row['hit_max_new_tokens_share']:.3f} {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
