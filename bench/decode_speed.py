"""What sets the pace of phi2sum's greedy decoding loop on a big card: the transformers version, the token budget
per batch, and the SDPA backend of the one-token step?

    python3 bench/decode_speed.py --data /path/to/dialogsum [--budgets 96000,160000,300000]
        [--backends default,EFFICIENT_ATTENTION,MATH,CUDNN_ATTENTION] [--profile]

Phi-2's shape with random weights (bench/common.py), bf16, no adapter, configs/a100.yaml's generation settings with
64 new tokens (random weights never stop early, so every dialogue runs to 64), through phi2sum.generate.generate
(what eval and summarize call) on the first 500 test dialogues, one process. Each backend gets a 16-dialogue
warm-up, then one timed pass per budget. `default` is PyTorch's own pick (cuDNN's attention on an H100/H200); a
name is a torch.nn.attention.SDPBackend allowed alone for the decoding step (phi2sum.decoding.DECODE_BACKENDS).
To compare transformers versions, run it once under each. Prints one JSON object of dialogues/s per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_phi2_shape, require_cuda  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="DialogSum folder: train/validation/test.jsonl(.gz)")
    ap.add_argument("--budgets", default="96000,160000,300000", help="generation.batch_tokens values, comma-separated")
    ap.add_argument("--backends", default="default", help="decoding-step SDPA backends, comma-separated")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one batch (200 mid-length dialogues, budget 96,000) with torch.profiler")
    ap.add_argument("--work", type=Path, default=Path("/tmp/phi2sum-bench/decode_speed"), help="model folder")
    args = ap.parse_args()
    require_cuda("decode_speed.py")
    import torch
    import transformers

    from phi2sum import data, decoding, generate
    from phi2sum.config import load_config

    shape = build_phi2_shape(args.data, args.work / "phi2-shape")
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    cfg = load_config(ROOT / "configs/a100.yaml", [f"model.name={shape}", f"data.source={args.data}",
                                                   "generation.max_new_tokens=64"])
    loaded = generate.load_for_inference(cfg, None)
    dialogues = data.load_split(cfg.data, "test", merge_duplicates=True).dialogues[:500]
    result = {}
    for backend in args.backends.split(","):
        decoding.DECODE_BACKENDS = None if backend == "default" else [backend]
        generate.generate(loaded, dialogues[:16], cfg.data.instruction, cfg.generation)
        for budget in map(int, args.budgets.split(",")):
            gen = cfg.generation.model_copy(update={"batch_tokens": budget})
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate.generate(loaded, dialogues, cfg.data.instruction, gen)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            result[f"{backend} {budget}"] = round(len(dialogues) / seconds, 1)
            print(backend, budget, f"{len(dialogues) / seconds:.1f} dialogues/s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        decoding.DECODE_BACKENDS = None
        gen = cfg.generation.model_copy(update={"batch_tokens": 96000})
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate.generate(loaded, sorted(dialogues, key=len)[200:400], cfg.data.instruction, gen)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
