"""GPU benchmark: the seed recipe vs phi2sum's recipes on a Phi-2-shaped model, in one process.

    python3 bench/phi2_shape.py --data .gpu/data --out $OUT [--steps 30]

Phi-2's weights cannot be fetched here, so the model is PhiForCausalLM built from Phi-2's published
config with random weights, saved and loaded back through the same path users take (4-bit included).
Speed and memory do not depend on the weights' values. The tokenizer is a byte-level BPE trained on
DialogSum's train split (vocab ~50k, GPT-2-style like Phi-2's), so sequence lengths match DialogSum's.
Throughput counts real (non-pad) tokens. Writes bench/results-style JSON + markdown into --out.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4, layer_norm_eps=1e-5,
            hidden_act="gelu_new", tie_word_embeddings=False, max_position_embeddings=2048,
            resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0)


def rows(data: Path, split: str) -> list[dict]:
    with gzip.open(data / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(x) for x in fh]


def build_model(data: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    texts = [t for r in rows(data, "train") for t in (r["dialogue"], r["summary"])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=50000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PhiForCausalLM(PhiConfig(**PHI2, bos_token_id=0, eos_token_id=0)).to(torch.bfloat16)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def seed_recipe(model_dir: Path, data: Path, steps: int) -> dict:
    """The seed notebook's recipe: HF Trainer, 4-bit NF4, fp16, paged_adamw_8bit, batch 4,
    LoRA r=32 on q,k,v,dense, loss on the whole sequence, plain prompt, gradient checkpointing."""
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

    class Ds(torch.utils.data.Dataset):
        def __len__(self):
            return len(enc)

        def __getitem__(self, i):
            return {"input_ids": enc[i]["input_ids"], "attention_mask": enc[i]["attention_mask"]}

    timing = {"tokens": 0, "t0": None, "steps": 0}
    real_tokens = [sum(e["attention_mask"]) for e in enc]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 5:  # warm-up steps excluded
                torch.cuda.synchronize()
                timing["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 5:
                timing["steps"] += 1

    args = TrainingArguments(output_dir="/tmp/seed-run", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             max_steps=steps, learning_rate=2e-4, fp16=True, optim="paged_adamw_8bit",
                             gradient_checkpointing=True, logging_steps=1000, save_strategy="no", report_to=[],
                             seed=42, dataloader_drop_last=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Ds(),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Clock()])
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - timing["t0"]
    # The Trainer walks a shuffled order; the mean real length per row times rows seen is exact enough
    # for the seed's figure (batches are not length-grouped there).
    rows_seen = timing["steps"] * 4
    tokens = rows_seen * (sum(real_tokens) / len(real_tokens))
    result = {"name": "seed recipe (HF Trainer, 4-bit NF4, fp16, paged AdamW 8-bit, batch 4, r=32 q,k,v,dense)",
              "tokens_per_second": tokens / seconds, "step_seconds": seconds / max(1, timing["steps"]),
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    del trainer, model
    cleanup()
    return result


LEVERS = ("fuse_gelu", "keep_lora_inputs_in_compute_dtype", "norms_in_compute_dtype", "kbit_stream_stays_bf16")


def phi2sum_recipe(name: str, config: str, model_dir: Path, data: Path, steps: int, overrides: list[str],
                   levers: bool | tuple = True) -> dict:
    """levers=False runs the same config with the fused GELU and the LoRA-input cast skip switched off (the
    session-2 comparison; the later LayerNorm lever stays on); a tuple names the modeling levers to switch
    off. Either way their gain is measured in the same call."""
    from phi2sum import modeling
    from phi2sum.config import load_config
    from phi2sum.train import train

    saved = {n: getattr(modeling, n) for n in LEVERS}
    off = LEVERS[:2] if levers is False else (levers if isinstance(levers, tuple) else ())
    for n in off:
        setattr(modeling, n, lambda model: None)

    out = Path(f"/tmp/bench-runs/{name}")
    cfg = load_config(ROOT / config, [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}",
                                      f"train.max_steps={steps}", "train.eval_every=0", f"train.save_every={steps}",
                                      "train.log_every=1", "train.eval_max_rows=16", "data.cache_dir=/tmp/bench-cache",
                                      "train.early_stopping_patience=0", *overrides])
    try:
        result = train(cfg, overwrite=True)
    finally:
        for n, fn in saved.items():
            setattr(modeling, n, fn)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["kind"] == "train" and r["step"] > 3]  # first steps: warm-up, allocator growth
    tps = sum(r["tokens_per_second"] for r in timed) / len(timed)
    row = {"name": name, "config": config, "overrides": overrides, "tokens_per_second": tps,
           "step_seconds": result.seconds / max(1, result.steps), "rows_per_step": cfg.train.batch_size * cfg.train.grad_accum,
           "peak_allocated_gib": result.peak_memory_gib, "peak_reserved_gib": result.peak_reserved_gib,
           "final_train_loss": result.train_loss}
    cleanup()
    return row


def generation(model_dir: Path, data: Path, quant: str, batch: int, budget: int = 0, cache: str = "dynamic",
               graph: bool = True, n: int = 500, new_tokens: int = 64) -> dict:
    from phi2sum import evaluate
    from phi2sum.config import load_config

    cfg = load_config(None, [f"model.name={model_dir}", f"model.quantization={quant}", "data.prompt_format=plain",
                             f"generation.batch_size={batch}", f"generation.max_new_tokens={new_tokens}",
                             f"generation.batch_tokens={budget}", f"generation.cache={cache}",
                             f"generation.cuda_graph={str(graph).lower()}"])
    loaded = evaluate.load_for_inference(cfg, None)
    loaded.stop_ids = [-1]  # random weights: force exactly new_tokens per dialogue, as the goal specifies
    dialogues = [r["dialogue"] for r in rows(data, "test")[:n]]
    evaluate.generate(loaded, dialogues[:batch], cfg.data.instruction, cfg.generation)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gens = evaluate.generate(loaded, dialogues, cfg.data.instruction, cfg.generation)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    graphed = evaluate.graph_decoding_applies(loaded, cfg.generation)
    result = {"name": f"generate {n} test dialogues, {quant}, batch {batch}"
                      + (f" / {budget:,} cache tokens" if budget else "") + f", {cache} cache, {new_tokens} new tokens"
                      + (", CUDA graph loop" if graphed else ", transformers generate"),
              "seconds": seconds, "dialogues_per_second": n / seconds,
              "mean_new_tokens": sum(g.new_tokens for g in gens) / len(gens),
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    del loaded
    cleanup()
    return result


def generation_pair(model_dir: Path, data: Path, quant: str, batch: int, budget: int = 0, n: int = 500,
                    new_tokens: int = 64) -> dict:
    """transformers' generate vs phi2sum's CUDA-graph greedy loop on one loaded model, each after its own
    warm-up: dialogues/s and the share of dialogues whose tokens are identical. The loop is forced on even
    where phi2sum would not pick it (4-bit), to measure whether it should."""
    from phi2sum import evaluate
    from phi2sum.config import load_config

    cfg = load_config(None, [f"model.name={model_dir}", f"model.quantization={quant}", "data.prompt_format=plain",
                             f"generation.batch_size={batch}", f"generation.max_new_tokens={new_tokens}",
                             f"generation.batch_tokens={budget}"])
    loaded = evaluate.load_for_inference(cfg, None)
    loaded.stop_ids = [-1]
    dialogues = [r["dialogue"] for r in rows(data, "test")[:n]]
    applies = evaluate.graph_decoding_applies
    result = {"name": f"generate vs graph loop, {n} test dialogues, {quant}, batch {batch}"
                      + (f" / {budget:,} cache tokens" if budget else "") + f", {new_tokens} new tokens",
              "graph_loop_chosen_by_phi2sum": applies(loaded, cfg.generation)}
    outputs = {}
    try:
        for name, use in (("generate", False), ("graph", True)):
            evaluate.graph_decoding_applies = lambda loaded, gen, use=use: use
            evaluate.generate(loaded, dialogues[:batch], cfg.data.instruction, cfg.generation)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            outputs[name] = evaluate.generate(loaded, dialogues, cfg.data.instruction, cfg.generation)
            torch.cuda.synchronize()
            result[f"{name}_dialogues_per_second"] = n / (time.perf_counter() - t)
    finally:
        evaluate.graph_decoding_applies = applies
    result["identical_share"] = sum(a.raw == b.raw for a, b in zip(outputs["generate"], outputs["graph"])) / n
    result["dialogues_per_second"] = result["graph_dialogues_per_second"]
    result["seconds"] = n / result["graph_dialogues_per_second"]
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del loaded
    cleanup()
    return result


def profile_step(model_dir: Path, data: Path, rows_per_batch: int = 16, overrides: tuple = (),
                 config: str = "configs/a100.yaml") -> dict:
    """Where one bf16 LoRA micro-batch's time goes: torch.profiler over 3 forward+backward passes of
    phi2sum's own loss on real DialogSum rows (after 3 warm-up passes). Prints the top CUDA ops.
    `config` + `model_dir` pick the model (a100.yaml: the Phi-2 shape; smollm2.yaml + the GGUF)."""
    from torch.profiler import ProfilerActivity, profile

    from phi2sum import data as data_mod, modeling
    from phi2sum.config import load_config
    from phi2sum.train import SummaryLoss, collate, uses_padding_mask

    cfg = load_config(ROOT / config, [f"model.name={model_dir}", f"data.source={data}",
                                      "data.cache_dir=/tmp/bench-cache", *overrides])
    hw = modeling.pick_hardware(cfg.train)
    model_dir = modeling.base_path(cfg.model)  # a GGUF becomes a plain checkpoint, as in train
    tok = modeling.load_tokenizer(cfg.model, str(model_dir))
    prepared = data_mod.prepare(cfg.data, tok)
    ds = prepared.splits["train"]
    batch = collate([(ds[i]["input_ids"], ds[i]["prompt_length"]) for i in range(rows_per_batch)], tok.pad_token_id)
    batch = {k: v.cuda() for k, v in batch.items()}
    model = modeling.add_lora(modeling.load_base(cfg.model, hw, str(model_dir), quantize=False), cfg.lora, cfg.train, False)
    if cfg.train.compile:
        modeling.compile_body(model)
    loss_model = SummaryLoss(model, uses_padding_mask(cfg)).train()

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_model(**batch)
        loss.backward()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            once()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 3 / 1e6
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 3
    print(events.table(sort_by="self_device_time_total", row_limit=18), flush=True)
    tokens = int(batch["attention_mask"].sum())
    row = {"name": f"profile {config}: one micro-batch fwd+bwd, {rows_per_batch} rows, {tokens} real tokens, "
                   f"{list(overrides)}",
           "wall_seconds": wall, "gpu_busy_seconds": cuda_total, "gpu_busy_share": cuda_total / wall,
           "kernel_launches": kernels, "micro_batch_tokens_per_second": tokens / wall}
    del model, loss_model
    cleanup()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per phi2sum run (32 rows each)")
    ap.add_argument("--seed-steps", type=int, default=30, help="steps of the seed recipe (4 rows each)")
    ap.add_argument("--only", default="seed,p100,qlora-bf16,bf16,gen,gen-4bit",
                    help="comma-separated stages, run in this order (see `stages` in main)")
    ap.add_argument("--smollm2", default="/tmp/m/smollm2.gguf", help="the SmolLM2 GGUF, for profile-smollm2")
    args = ap.parse_args()
    import transformers, peft

    args.out.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    # The SmolLM2 profiles need no Phi-2-shaped checkpoint (building one takes a minute and 5 GB).
    phi2 = any(not n.startswith("profile-smollm2") for n in only)
    model_dir = build_model(args.data, Path("/tmp/phi2-shape")) if phi2 else None
    results = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "transformers": transformers.__version__, "peft": peft.__version__, "runs": []}

    def record(fn, *a):
        # One failing stage must not lose the others' numbers on a metered GPU.
        try:
            row = fn(*a)
        except Exception as e:
            import traceback

            traceback.print_exc()
            row = {"name": f"{fn.__name__}{a[:1]}", "error": f"{type(e).__name__}: {e}"[:500]}
            cleanup()
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "phi2_shape.json").write_text(json.dumps(results, indent=2))

    a100 = "configs/a100.yaml"
    qlora = ["train.precision=bf16", "train.optimizer=adamw", "train.batch_size=16", "train.grad_accum=2",
             "train.gradient_checkpointing=false"]
    stages = {
        "p100": (phi2sum_recipe, "phi2sum p100.yaml (4-bit NF4, fp16, paged AdamW 8-bit, r=32 x6 targets)",
                 "configs/p100.yaml", model_dir, args.data, args.steps, []),
        "profile": (profile_step, model_dir, args.data, 16),
        "profile-nodrop": (profile_step, model_dir, args.data, 16, ("lora.dropout=0",)),
        "profile-compile": (profile_step, model_dir, args.data, 16, ("lora.dropout=0", "train.compile=true")),
        "gen": (generation, model_dir, args.data, "none", 256),
        "gen-128": (generation, model_dir, args.data, "none", 128),
        "gen-budget": (generation, model_dir, args.data, "none", 500, 160_000),
        "gen-budget-generate": (generation, model_dir, args.data, "none", 500, 160_000, "dynamic", False),
        "gen-static": (generation, model_dir, args.data, "none", 128, 0, "static"),
        "profile-smollm2": (profile_step, args.smollm2, args.data, 32, (), "configs/smollm2.yaml"),
        "profile-smollm2-128": (profile_step, args.smollm2, args.data, 128, ("lora.dropout=0",), "configs/smollm2.yaml"),
        "gen-4bit": (generation, model_dir, args.data, "4bit", 64),
        "pair-4bit-budget": (generation_pair, model_dir, args.data, "4bit", 500, 24_000),
        "pair-bf16-budget": (generation_pair, model_dir, args.data, "none", 500, 160_000),
        "bf16": (phi2sum_recipe, "phi2sum a100.yaml (bf16 LoRA, batch 16 x 2, no quantization)", a100,
                 model_dir, args.data, args.steps, []),
        "bf16-nodrop": (phi2sum_recipe, "a100.yaml, LoRA dropout 0", a100, model_dir, args.data, args.steps,
                        ["lora.dropout=0"]),
        "bf16-nodrop-before": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, without fused GELU / cast skip", a100,
                               model_dir, args.data, args.steps, ["lora.dropout=0"], False),
        "bf16-nodrop-fp32-norms": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, LayerNorm left to autocast (fp32)", a100,
                                   model_dir, args.data, args.steps, ["lora.dropout=0"], ("norms_in_compute_dtype",)),
        "qlora-bf16-nodrop-fp32-stream": (phi2sum_recipe, "QLoRA bf16, LoRA dropout 0, PEFT k-bit preparation (fp32 stream)",
                                          "configs/p100.yaml", model_dir, args.data, args.steps, qlora + ["lora.dropout=0"],
                                          ("kbit_stream_stays_bf16",)),
        "qlora-bf16-nodrop-32": (phi2sum_recipe, "QLoRA bf16, LoRA dropout 0, batch 32 x 1", "configs/p100.yaml", model_dir,
                                 args.data, args.steps, qlora + ["lora.dropout=0", "train.batch_size=32", "train.grad_accum=1"]),
        "qlora-bf16-nodrop-fp32-norms": (phi2sum_recipe, "QLoRA bf16, LoRA dropout 0, LayerNorm left to autocast (fp32)",
                                         "configs/p100.yaml", model_dir, args.data, args.steps, qlora + ["lora.dropout=0"],
                                         ("norms_in_compute_dtype",)),
        "p100-fp32-norms": (phi2sum_recipe, "p100.yaml, LayerNorm left to autocast (fp32)", "configs/p100.yaml", model_dir,
                            args.data, args.steps, [], ("norms_in_compute_dtype",)),
        "bf16-compile": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, torch.compile (16 x 2)", a100, model_dir, args.data,
                         args.steps, ["lora.dropout=0", "train.compile=true"]),
        "bf16-32": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, batch 32 x 1", a100, model_dir, args.data,
                    args.steps, ["lora.dropout=0", "train.batch_size=32", "train.grad_accum=1"]),
        "bf16-32-compile": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, batch 32 x 1, torch.compile", a100, model_dir,
                            args.data, args.steps, ["lora.dropout=0", "train.batch_size=32", "train.grad_accum=1",
                                                    "train.compile=true"]),
        "bf16-mask": (phi2sum_recipe, "a100.yaml with the padding mask, widths not padded (as before the seventh session)", a100, model_dir,
                      args.data, args.steps, ["train.padding_mask=true", "train.pad_to_multiple_of=1"]),
        "bf16-nopad": (phi2sum_recipe, "a100.yaml, no padding mask, widths not padded", a100, model_dir,
                       args.data, args.steps, ["train.pad_to_multiple_of=1"]),
        "bf16-pad64": (phi2sum_recipe, "a100.yaml, no padding mask, widths padded to multiples of 64", a100, model_dir,
                       args.data, args.steps, ["train.pad_to_multiple_of=64"]),
        "bf16-48": (phi2sum_recipe, "a100.yaml, LoRA dropout 0, batch 48 x 1", a100, model_dir, args.data,
                    args.steps, ["lora.dropout=0", "train.batch_size=48", "train.grad_accum=1"]),
        "seed": (seed_recipe, model_dir, args.data, args.seed_steps),
        "qlora-bf16": (phi2sum_recipe, "phi2sum QLoRA bf16 (4-bit NF4, bf16, batch 16 x 2, no checkpointing)",
                       "configs/p100.yaml", model_dir, args.data, args.steps, qlora),
        "qlora-bf16-nodrop": (phi2sum_recipe, "QLoRA bf16, LoRA dropout 0", "configs/p100.yaml", model_dir, args.data,
                              args.steps, qlora + ["lora.dropout=0"]),
    }
    for name in only:
        fn, *a = stages[name]
        record(fn, *a)
    seed = next((r for r in results["runs"] if r["name"].startswith("seed")), None)
    lines = [f"# Phi-2-shape benchmark on {results['card']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}, peft {results['peft']}; "
             f"{args.steps} optimizer steps per phi2sum run, {args.seed_steps} for the seed recipe (first steps "
             "excluded from throughput).", "",
             "| run | real tokens/s | x seed | step s | peak reserved GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | |")
        if "tokens_per_second" in r:
            ratio = f"{r['tokens_per_second'] / seed['tokens_per_second']:.1f}" if seed else "-"
            lines.append(f"| {r['name']} | {r['tokens_per_second']:,.0f} | {ratio} | {r['step_seconds']:.2f} | "
                         f"{r['peak_reserved_gib']:.1f} |")
    lines += ["", "| generation | dialogues/s | s | peak reserved GiB |", "| --- | ---: | ---: | ---: |"]
    for r in results["runs"]:
        if "dialogues_per_second" in r:
            extra = (f" (generate {r['generate_dialogues_per_second']:.1f}/s, {r['identical_share']:.0%} identical)"
                     if "identical_share" in r else "")
            lines.append(f"| {r['name']}{extra} | {r['dialogues_per_second']:.1f} | {r['seconds']:.1f} | "
                         f"{r['peak_reserved_gib']:.1f} |")
    lines += ["", "| profile | wall s | GPU busy | kernels | tokens/s (one micro-batch) |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        if "gpu_busy_share" in r:
            lines.append(f"| {r['name']} | {r['wall_seconds']:.3f} | {r['gpu_busy_share']:.0%} | {r['kernel_launches']:.0f} | "
                         f"{r['micro_batch_tokens_per_second']:,.0f} |")
    (args.out / "phi2_shape.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
