"""How fast does each shipped GPU config train Phi-2's shape, and how much memory does it take, next to the
seed recipe (HF Trainer, 4-bit NF4, fp16, paged 8-bit AdamW, batch 4, LoRA r=32 on q,k,v,dense)?

    python3 bench/train_speed.py --data /path/to/dialogsum [--steps 24] [--longest]

One CUDA card, one process. After an untimed 3-step warm-up (a process's first training runs slow): the seed
recipe, then each config through the function `phi2sum train` calls (load_config + train), overriding only the
model (a Phi-2-shaped checkpoint with random weights, see bench/common.py), the data, the step count, the run
folder, per-step logging, and evaluation/saving pushed past the last step. real_tokens_per_s is the median of
the per-step windows after the first --warmup-windows (compilation, allocator growth); x_seed compares with the
seed row of the same call; real_tokens_per_step says how much data a step took (with train.packing, batch_size
counts packed rows of data.max_length tokens, not dialogues). --variant measures a setting beside the shipped
files, e.g. packing at about the shipped dialogues per step:
--variant "a100 packed 8x1=configs/a100.yaml:train.packing=true,train.batch_size=8,train.grad_accum=1".
--longest adds a row per 16 GB config on rows that all reach data.max_length: the memory bound a P100/T4 must hold. Writes bench/results/train_speed/<card>-<date>.json and .md; run folders go
to --work, their logs to bench/results/train_speed/raw/ (not in git).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, build_phi2_shape, command_line, environment, free_memory, raw_dir, require_cuda, rows,  # noqa: E402
                    run_case, table, write_result)

FAR = 10**6  # evaluation and checkpoints only after the last timed step


def default_configs() -> list[str]:
    """Every configs/*.yaml that trains on a GPU, except smollm2.yaml (a quality recipe, not Phi-2)."""
    from phi2sum.config import load_config

    return [f"configs/{p.name}" for p in sorted((ROOT / "configs").glob("*.yaml"))
            if p.name != "smollm2.yaml" and load_config(p).train.device != "cpu"]


def steady(per_step: list[float], warmup: int) -> tuple[float, int]:
    used = per_step[warmup:] or per_step[-1:]
    return statistics.median(used), len(used)


def seed_recipe(model_dir: Path, data: Path, steps: int, warmup: int, work: Path) -> dict:
    """The seed notebook's recipe: HF Trainer, 4-bit NF4 (double quant), fp16, paged AdamW 8-bit, batch 4,
    LoRA r=32 alpha 32 on q,k,v,dense, gradient checkpointing, loss on the whole sequence, plain prompt."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments)

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "dense"]))
    texts = [f"Instruct: Summarize the following conversation.\n{r['dialogue']}\nOutput:\n{r['summary']}<|endoftext|>"
             for r in rows(data, "train")[: steps * 4 + 64]]
    enc = [tok(t, truncation=True, max_length=1024) for t in texts]
    per_step, clock = [], {"tokens": 0, "t": None}

    class Counting(Trainer):  # counts the real tokens of the batch each step actually trains on
        def training_step(self, model, inputs, *args, **kwargs):
            clock["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if clock["t"] is None:
                torch.cuda.synchronize()
                clock["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            now = time.perf_counter()
            per_step.append(clock["tokens"] / (now - clock["t"]))
            clock["tokens"], clock["t"] = 0, now

    args = TrainingArguments(output_dir=str(work / "seed"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             max_steps=steps, learning_rate=2e-4, fp16=True, optim="paged_adamw_8bit",
                             gradient_checkpointing=True, logging_steps=FAR, save_strategy="no", report_to=[],
                             seed=42, dataloader_drop_last=True, disable_tqdm=True)
    free_memory()
    trainer = Counting(model=model, args=args, train_dataset=[{"input_ids": e["input_ids"]} for e in enc],
                       data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Clock()])
    trainer.train()
    tps, used = steady(per_step, warmup)
    row = {"name": "seed recipe", "config": None, "real_tokens_per_s": tps,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "steps": steps, "windows_used": used,
           "windows_dropped": len(per_step) - used, "rows_per_step": 4}
    del trainer, model
    free_memory()
    return row


def phi2sum_run(name: str, config: str, model_dir: Path, data: Path, steps: int, warmup: int, work: Path,
                raw: Path | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One shipped config through exactly what `phi2sum train` runs; its metrics.jsonl and summary.json are
    copied to `raw`."""
    import shutil

    from phi2sum.config import load_config
    from phi2sum.train import train

    out = work / "".join(c if c.isalnum() else "-" for c in name)
    cfg = load_config(ROOT / config, [f"model.name={model_dir}", f"data.source={data}", f"train.max_steps={steps}",
                                      f"train.output_dir={out}", f"train.eval_every={FAR}", f"train.save_every={FAR}",
                                      "train.log_every=1", *extra])
    free_memory()
    train(cfg, overwrite=True)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens_per_second"] for r in log if r["kind"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    if raw:
        (raw / out.name).mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "summary.json", "config.yaml"):
            shutil.copy(out / f, raw / out.name / f)
    tps, used = steady(per_step, warmup)
    row = {"name": name, "config": config, "real_tokens_per_s": tps, "peak_allocated_gib": summary["peak_memory_gib"],
           "peak_reserved_gib": summary["peak_reserved_gib"], "expected_peak_gib": summary.get("expected_peak_gib"),
           "steps": summary["steps"], "windows_used": used,
           "windows_dropped": len(per_step) - used, "rows_per_step": cfg.train.batch_size * cfg.train.grad_accum,
           "packing": cfg.train.packing, "real_tokens_per_step": summary["real_tokens"] / max(1, summary["steps"]),
           "max_length": cfg.data.max_length, **({"overrides": list(extra)} if extra else {})}
    free_memory()
    return row


def longest_rows(data: Path, model_dir: Path, config: str, steps: int, work: Path) -> tuple[Path, dict]:
    """A DialogSum folder whose every row reaches data.max_length (the longest dialogues, repeated), so every
    micro-batch is as wide as the config allows."""
    import gzip

    from transformers import AutoTokenizer

    from phi2sum.config import load_config

    cfg = load_config(ROOT / config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = rows(data, "train")
    length = {i: len(tok(r["dialogue"] + "\n" + r["summary"]).input_ids) for i, r in enumerate(train)}
    ranked = sorted(length, key=length.get, reverse=True)
    pool = [i for i in ranked if length[i] >= cfg.data.max_length] or []
    pool = pool if len(pool) >= cfg.train.batch_size else ranked[: cfg.train.batch_size]
    need = (steps + 1) * cfg.train.batch_size * cfg.train.grad_accum
    out = work / "longest-data"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", need), ("validation", len(pool)), ("test", len(pool))):
        picked = [dict(train[pool[k % len(pool)]], id=f"longest_{k}") for k in range(n)]
        for r in picked:
            r.setdefault("summaries", [r["summary"]])
        with gzip.open(out / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in picked)
    return out, {"distinct_rows": len(pool), "min_tokens": min(length[i] for i in pool), "max_length": cfg.data.max_length}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="DialogSum folder: train/validation/test.jsonl(.gz)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated config files (default: every configs/*.yaml that trains on a GPU, "
                         "except smollm2.yaml)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per config")
    ap.add_argument("--seed-steps", type=int, default=40, help="steps of the seed recipe (4 rows each)")
    ap.add_argument("--warmup-windows", type=int, default=4, help="first per-step windows left out of the median")
    ap.add_argument("--longest", nargs="*", default=None, metavar="CONFIG",
                    help="also run these configs (default with no value: p100.yaml and t4.yaml) on rows that all "
                         "reach data.max_length, for the peak memory")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG:KEY=VALUE[,KEY=VALUE]",
                    help="also run a config with --set overrides (a candidate setting, measured beside the shipped "
                         "file in the same call), e.g. 'a100 32x1=configs/a100.yaml:train.batch_size=32,train.grad_accum=1'")
    ap.add_argument("--longest-steps", type=int, default=4, help="steps of each --longest run (its peak memory "
                    "is reached at the first step; every row is data.max_length long)")
    ap.add_argument("--tag", default=None, help="suffix of the result file name, for a second call on one card and day")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed recipe (no x_seed then)")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="skip the untimed 3-step run of the first config (the first training of a process is slow)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/phi2sum-bench/train_speed"), help="model and run folders")
    args = ap.parse_args()
    require_cuda("train_speed.py")
    configs = args.configs.split(",") if args.configs else default_configs()
    longest = None if args.longest is None else (args.longest or
                                                 [c for c in ("configs/p100.yaml", "configs/t4.yaml") if (ROOT / c).exists()])
    model_dir = build_phi2_shape(args.data, args.work / "phi2-shape")
    result = {**environment(), "question": "train_speed", "command": command_line(),
              "model": "Phi-2 shape (PhiForCausalLM, Phi-2's config, random weights)", "path":
              "seed: transformers Trainer as in the seed notebook; configs: phi2sum.train.train, as `phi2sum train`",
              "metric": f"real (non-pad) tokens/s, median of per-step windows after the first {args.warmup_windows}",
              "runs": [], **({"tag": args.tag} if args.tag else {})}

    def record(fn, *a):
        run_case(result, a[0] if isinstance(a[0], str) else fn.__name__, lambda: fn(*a), free_memory)

    if not args.no_warm_up and configs:
        try:
            phi2sum_run("warm-up", configs[0], model_dir, args.data, 3, 0, args.work)
        except Exception as e:
            print(f"warm-up run failed ({type(e).__name__}: {e}); timing without it", flush=True)
            free_memory()
    if not args.no_seed:
        record(seed_recipe, model_dir, args.data, args.seed_steps, args.warmup_windows, args.work)
    raw = raw_dir("train_speed", result["card"], result["date"])
    for config in configs:
        record(phi2sum_run, Path(config).stem, config, model_dir, args.data, args.steps, args.warmup_windows, args.work, raw)
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        config, _, sets = rest.partition(":")
        record(phi2sum_run, name, config, model_dir, args.data, args.steps, args.warmup_windows, args.work, raw,
               tuple(x for x in sets.split(",") if x))
    for config in longest or []:
        folder, info = longest_rows(args.data, model_dir, config, args.longest_steps, args.work)
        record(phi2sum_run, f"{Path(config).stem}, longest rows", config, model_dir, folder, args.longest_steps,
               0, args.work, raw)
        result["runs"][-1]["longest_rows"] = info

    report(result)


def report(result: dict) -> None:
    """x_seed for every row, then the JSON and its markdown table."""
    seed = next((r for r in result["runs"] if r["name"] == "seed recipe" and "error" not in r), None)
    for r in result["runs"]:
        if seed and "real_tokens_per_s" in r:
            r["x_seed"] = r["real_tokens_per_s"] / seed["real_tokens_per_s"]
    lines = table(["run", "config", "real tokens/s", "x seed", "real tokens/step", "peak allocated GiB",
                   "peak reserved GiB", "expected peak GiB (memory check)", "steps", "windows used"], "llrrrrrrrr",
                  result["runs"], lambda r: [
        r["config"] or "-", f"{r['real_tokens_per_s']:,.0f}", f"{r['x_seed']:.2f}" if "x_seed" in r else "-",
        f"{r['real_tokens_per_step']:,.0f}" if "real_tokens_per_step" in r else "-",
        f"{r['peak_allocated_gib']:.1f}", f"{r['peak_reserved_gib']:.1f}",
        f"{r['expected_peak_gib']:.1f}" if r.get("expected_peak_gib") is not None else "-",
        str(r["steps"]), str(r["windows_used"])])
    print(write_result("train_speed", result, [result["metric"] + "; x seed: against the seed row of this call.", "",
                                               *lines], result.get("tag")))


if __name__ == "__main__":
    main()
