"""Where eval generation's time goes (issue 5's SmolLM2 < 10 s goal): the test prompts in one batch as
`phi2sum eval` builds them, timed as prefill alone (max_new_tokens 1) and as a whole generate, so
decode seconds per step = (whole - prefill) / (new tokens - 1); then torch.profiler over a short generate
(top ops by GPU time, GPU busy share of wall time). Nothing stops early: stop tokens are disabled so every
variant does the same number of steps.

    python3 bench/gen_profile.py --config configs/smollm2.yaml --set model.name=/tmp/m/smollm2.gguf \\
        --set data.source=.gpu/data --out $OUT/gen_profile.json [--set generation.batch_size=256 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from phi2sum import data as data_mod
from phi2sum import evaluate
from phi2sum.config import load_config

GREEDY = ["generation.num_beams=1", "generation.length_penalty=1.0"]
CUDA = torch.cuda.is_available()  # the CPU path exists for a smoke test only


def timed(fn) -> float:
    if CUDA:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--profile-tokens", type=int, default=8)
    args = ap.parse_args()

    cfg = load_config(args.config, GREEDY + args.overrides)
    rows = data_mod.load_split(cfg.data, cfg.data.test_split, merge_duplicates=True)
    loaded = evaluate.load_for_inference(cfg, None)
    loaded.stop_ids = [-1]  # same number of steps in every run
    dialogues = rows.dialogues
    gen = cfg.generation

    def run(new_tokens: int):
        return evaluate.generate(loaded, dialogues, cfg.data.instruction, gen.model_copy(update={"max_new_tokens": new_tokens}))

    run(2)  # warm-up: kernels, allocator
    prefill = timed(lambda: run(1))
    whole = timed(lambda: run(args.new_tokens))
    prompts = [data_mod.fit_prompt(loaded.tokenizer, d, loaded.fmt, cfg.data.instruction, gen.max_input_tokens)[0]
               for d in dialogues]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = evaluate.plan_batches([len(prompts[i]) for i in order], order, gen)
    padded = sum(len(b) * max(len(prompts[i]) for i in b) for b in batches)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
        wall = timed(lambda: run(args.profile_tokens))
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    print(events.table(sort_by="self_device_time_total" if CUDA else "self_cpu_time_total", row_limit=20), flush=True)
    result = {
        "card": torch.cuda.get_device_name(0) if CUDA else "cpu", "config": str(args.config), "overrides": args.overrides,
        "dialogues": len(dialogues), "batches": len(batches), "prompt_tokens": sum(map(len, prompts)),
        "padded_prompt_tokens": padded, "new_tokens": args.new_tokens,
        "prefill_seconds": prefill, "whole_seconds": whole,
        "decode_seconds_per_step": (whole - prefill) / (args.new_tokens - 1),
        "profiled_wall_seconds": wall, "profiled_gpu_busy_share": busy / wall,
        "top_gpu_ops": [{"op": e.key, "gpu_seconds": e.self_device_time_total / 1e6, "calls": e.count}
                        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "top_gpu_ops"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
