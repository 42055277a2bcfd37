"""How fast does `phi2sum eval` generate: dialogues per second for Phi-2's shape (LoRA adapter, greedy, 64 new
tokens; bf16, and 4-bit both dequantized with the adapter folded and kept 4-bit with the adapter beside it) and for
SmolLM2 with the shipped decoding (configs/smollm2.yaml)?

    python3 bench/generate_speed.py --data /path/to/dialogsum [--phi2-run RUN] [--smollm2-run RUN] [--limit 500]

One CUDA card, one process, through the function `phi2sum eval` calls (phi2sum.evaluate.run_eval) on the test
split. Phi-2's shape has random weights (bench/common.py), so it never stops early: every dialogue gets
generation.max_new_tokens=64 tokens. Without --phi2-run, a run folder is made by a few steps of
configs/a100.yaml. The SmolLM2 row needs a run folder trained with configs/smollm2.yaml (bench/quality.sh makes
them) and is skipped without one. `seconds` is eval's own generation time (model loading excluded); an untimed
16-dialogue eval of the same case comes before each, so first-use costs (kernel loading, autotuning) stay out of
every row, not only the first. Writes bench/results/generate_speed/<card>-<date>.json and .md; each eval's
metrics and predictions go to bench/results/generate_speed/raw/ (not in git).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, build_phi2_shape, command_line, decoding, environment, free_memory, raw_dir,  # noqa: E402
                    require_cuda, run_case, table, write_result)


def timed_eval(name: str, cfg, adapter: Path, out: Path) -> dict:
    import torch

    from phi2sum.evaluate import run_eval

    free_memory()
    metrics = run_eval(cfg, str(adapter), compare_base=False, out_dir=out / name.replace(" ", "-"))
    m = metrics["models"]["fine-tuned"]
    return {"name": name, "model": cfg.model.name, "adapter": True, "quantization": cfg.model.quantization,
            "dequantize": cfg.generation.dequantize,
            "decoding": decoding(cfg.generation), "batch_tokens": cfg.generation.batch_tokens,
            "dialogues": metrics["n_dialogues"], "dialogues_per_s": m["dialogues_per_second"], "seconds": m["seconds"],
            "hit_max_new_tokens_share": m["hit_max_new_tokens_share"], "run_on_share": m.get("run_on_share"),
            # Quality beside speed: a faster decoding must score the same (random-weight rows score about 0).
            "rouge": {k: {"mean": m[k]["mean"], "ci95": m[k]["ci95"]} for k in ("rouge1", "rouge2", "rougeL") if k in m},
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def phi2_run(data: Path, work: Path, steps: int) -> Path:
    """A LoRA run folder on the Phi-2 shape: a few steps of configs/a100.yaml, as `phi2sum train` runs them."""
    from phi2sum.config import load_config
    from phi2sum.train import train

    out = work / "phi2-a100"
    if (out / "adapter_config.json").exists():
        return out
    model = build_phi2_shape(data, work / "phi2-shape")
    train(load_config(ROOT / "configs/a100.yaml", [f"model.name={model}", f"data.source={data}", f"train.max_steps={steps}",
                                                   f"train.output_dir={out}", "train.eval_every=0",
                                                   "train.early_stopping_patience=0", f"train.save_every={steps}"]),
          overwrite=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="DialogSum folder: train/validation/test.jsonl(.gz)")
    ap.add_argument("--phi2-run", type=Path, default=None, help="run folder trained on the Phi-2 shape (default: make one)")
    ap.add_argument("--smollm2-run", type=Path, default=None, help="run folder trained with configs/smollm2.yaml")
    ap.add_argument("--limit", type=int, default=500, help="test dialogues per case (DialogSum's test split has 500)")
    ap.add_argument("--train-steps", type=int, default=4, help="steps of configs/a100.yaml for the Phi-2 run folder")
    ap.add_argument("--smollm2-batch-tokens", default="", metavar="N[,N]",
                    help="also the SmolLM2 eval at these generation.batch_tokens (the value configs/smollm2.yaml ships is a row anyway)")
    ap.add_argument("--skip-phi2", action="store_true", help="only the SmolLM2 row (needs --smollm2-run)")
    ap.add_argument("--tag", default=None, help="suffix of the result file name, for a second call on one card and day")
    ap.add_argument("--work", type=Path, default=Path("/tmp/phi2sum-bench/generate_speed"), help="model and run folders")
    args = ap.parse_args()
    require_cuda("generate_speed.py")
    from phi2sum.config import load_config

    common = [f"data.source={args.data}", f"eval.limit={args.limit}"]
    cases = []
    if not args.skip_phi2:
        phi2 = args.phi2_run or phi2_run(args.data, args.work, args.train_steps)
        phi2_base = [*common, "generation.max_new_tokens=64"]
        four_bit = [*phi2_base, "model.quantization=4bit"]
        kept = [*four_bit, "generation.dequantize=false"]
        cases += [("phi2-shape bf16", load_config(phi2 / "config.yaml", phi2_base), phi2),
                  ("phi2-shape 4-bit dequantized", load_config(phi2 / "config.yaml", four_bit), phi2),
                  ("phi2-shape 4-bit kept 4-bit", load_config(phi2 / "config.yaml", kept), phi2)]
    if args.smollm2_run:
        base = load_config(args.smollm2_run / "config.yaml").model.name  # the base the adapter was trained on
        shipped = [*common, f"model.name={base}"]
        cases.append(("smollm2 shipped eval", load_config(ROOT / "configs/smollm2.yaml", shipped), args.smollm2_run))
        for n in filter(None, args.smollm2_batch_tokens.split(",")):
            cases.append((f"smollm2 shipped eval, batch_tokens {int(n):,}",
                          load_config(ROOT / "configs/smollm2.yaml", [*shipped, f"generation.batch_tokens={n}"]),
                          args.smollm2_run))
    result = {**environment(), "question": "generate_speed", "command": command_line(),
              "path": "phi2sum.evaluate.run_eval, as `phi2sum eval --adapter RUN --compare none`", "split": "test",
              "runs": []}
    raw = raw_dir("generate_speed", result["card"], result["date"])
    for name, cfg, run in cases:

        def measure(name=name, cfg=cfg, run=run):
            warm = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 16})})
            timed_eval("warm-up", warm, run, args.work / "eval")
            return timed_eval(name, cfg, run, raw)

        run_case(result, name, measure)
    lines = table(["case", "quantization", "decoding", "dialogues", "dialogues/s", "seconds", "peak reserved GiB",
                   "test R1 / R2 / RL"], "lllrrrrl", result["runs"], lambda r: [
        r["quantization"], r["decoding"], str(r["dialogues"]), f"{r['dialogues_per_s']:.1f}", f"{r['seconds']:.1f}",
        f"{r['peak_reserved_gib']:.1f}", " / ".join(f"{r['rouge'][k]['mean']:.4f}" for k in ("rouge1", "rouge2", "rougeL"))])
    print(write_result("generate_speed", result, lines, args.tag))


if __name__ == "__main__":
    main()
