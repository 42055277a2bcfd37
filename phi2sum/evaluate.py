"""Evaluation: ROUGE the standard way over the test split, bootstrap intervals, and the base-vs-fine-tuned table.

    phi2sum eval --adapter runs/x            (whole test split, fine-tuned vs base)
    phi2sum eval --adapter runs/x --limit 50

ROUGE comes from Google's rouge-score package (what `evaluate`'s rouge wraps), F1, Porter stemming on by
default. DialogSum's test set has three references per dialogue: the headline number is the mean over
all dialogue-reference pairs (1,500 pairs for 500 dialogues); confidence intervals resample dialogues.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data as data_mod
from . import modeling, runs, trackers
from .config import RunConfig
from .console import progress, warn
from .generate import Generated, fold_adapter, generate, load_for_inference, process_state
from .mbr import rouge_tokens
from .runs import write_jsonl_atomic, write_text_atomic

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _sentences(text: str) -> str:
    # rougeLsum scores summary-level LCS over newline-separated sentences.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


@dataclass
class RougeResult:
    pairs: dict  # metric -> mean over all dialogue-reference pairs
    first: dict  # metric -> mean against the first reference only
    per_dialogue_sum: dict  # metric -> array: sum over the dialogue's pairs (for the bootstrap)
    counts: np.ndarray  # references per dialogue


class _RougeTokens:
    """rouge-score's stemmed tokens with each distinct word stemmed once (mbr.rouge_tokens): the stemmer was most
    of the scoring time."""

    def tokenize(self, text: str) -> list[str]:
        return list(rouge_tokens(text))


def rouge(predictions: list[str], references: list[list[str]], use_stemmer: bool = True) -> RougeResult:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=use_stemmer,
                                      tokenizer=_RougeTokens() if use_stemmer else None)
    sums = {m: np.zeros(len(predictions)) for m in METRICS}
    first = {m: np.zeros(len(predictions)) for m in METRICS}
    counts = np.array([len(r) for r in references], dtype=float)
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        for j, ref in enumerate(refs):
            scores = scorer.score(_sentences(ref), _sentences(pred))
            for m in METRICS:
                sums[m][i] += scores[m].fmeasure
                if j == 0:
                    first[m][i] = scores[m].fmeasure
    total = counts.sum()
    return RougeResult({m: float(sums[m].sum() / total) for m in METRICS},
                       {m: float(first[m].mean()) for m in METRICS}, sums, counts)


def bootstrap_ci(result: RougeResult, samples: int, seed: int = 0) -> dict:
    """95% percentile intervals, resampling dialogues (a dialogue's references move together)."""
    if samples == 0:
        return {m: None for m in METRICS}
    rng = np.random.default_rng(seed)
    n = len(result.counts)
    idx = rng.integers(0, n, size=(samples, n))
    counts = result.counts[idx].sum(axis=1)
    out = {}
    for m in METRICS:
        means = result.per_dialogue_sum[m][idx].sum(axis=1) / counts
        out[m] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def words(text: str) -> int:
    return len(text.split())


def score_model(name: str, gens: list[Generated], references: list[list[str]], cfg: RunConfig,
                seconds: float) -> dict:
    preds = [g.text for g in gens]
    result = rouge(preds, references, cfg.eval.use_stemmer)
    ci = bootstrap_ci(result, cfg.eval.bootstrap_samples)
    row = {"name": name}
    for m in METRICS:
        row[m] = {"mean": result.pairs[m], "ci95": ci[m]}
    row["first_reference"] = result.first
    row["mean_words"] = float(np.mean([words(p) for p in preds]))
    row["reference_mean_words"] = float(np.mean([words(r) for refs in references for r in refs]))
    row["run_on_share"] = float(np.mean([g.run_on for g in gens]))
    row["hit_max_new_tokens_share"] = float(np.mean([g.hit_max for g in gens]))
    row["truncated_inputs"] = int(sum(g.truncated_input for g in gens))
    row["seconds"] = seconds
    row["dialogues_per_second"] = len(gens) / max(seconds, 1e-9)
    return row


# ----------------------------------------------------------------------------------------------------
# The eval verb


def _shard_and_gather(state, fn, items: list) -> list:
    """Under `accelerate launch`, each process generates a contiguous slice of `items`; the slices come
    back concatenated in process order, i.e. in input order. One process: fn(items)."""
    if state.num_processes == 1:
        return fn(items)
    from accelerate.utils import gather_object

    with state.split_between_processes(items) as mine:
        out = fn(list(mine))
    return gather_object(out)


def run_eval(cfg: RunConfig, adapter: str | None, compare_base: bool, out_dir: Path) -> dict | None:
    """Score the test split; returns the metrics (None on the non-main processes of a multi-GPU run)."""
    state = process_state(cfg.generation)
    main = state.is_main_process
    runs.check_adapter(adapter)  # before the test split is read (or downloaded)
    runs.check_adapter_config(adapter)
    rows = data_mod.load_split(cfg.data, cfg.data.test_split, merge_duplicates=True)
    n = min(cfg.eval.limit or len(rows.ids), len(rows.ids))
    ids, dialogues, references = rows.ids[:n], rows.dialogues[:n], rows.references[:n]
    loaded = load_for_inference(cfg, adapter)
    # The base pass goes first, so the fine-tuned pass may fold the adapter into the weights (fold_adapter); a
    # full fine-tune's base pass loads other weights over it, so it goes last.
    passes = [("fine-tuned", True)] if adapter else []
    if compare_base or not adapter:
        passes.insert(len(passes) if loaded.full else 0, ("base", False))
    metrics = {"split": cfg.data.test_split, "source": rows.origin, "n_dialogues": n,
               "n_pairs": int(sum(len(r) for r in references)),
               "protocol": "mean over all dialogue-reference pairs; CI: bootstrap over dialogues",
               "use_stemmer": cfg.eval.use_stemmer, "rougeLsum_sentences": "split after . ! ?",
               "bootstrap_samples": cfg.eval.bootstrap_samples, "prompt_format": loaded.fmt,
               "stop_tokens": loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids),
               "generation": cfg.generation.model_dump(), "base_model": cfg.model.name, "adapter": adapter,
               "device": loaded.hardware.name, "processes": state.num_processes,
               "dequantized_4bit": loaded.dequantized, "models": {}}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # An earlier eval's scores go now: an eval stopped halfway must not leave them beside new predictions,
        # where `push` would publish them as this eval's. metrics.json is written last, when all is scored.
        (out_dir / "metrics.json").unlink(missing_ok=True)
    with progress(disable=not main) as bar:
        for name, use_adapter in passes:
            if loaded.full and not use_adapter:  # the base is another set of weights: swap it in,
                loaded.model = None  # unquantized like the fine-tune, so the two columns compare weights only
                loaded.model = modeling.load_base(cfg.model, loaded.hardware, quantize=False).eval()
            # With several processes the bar follows the main process's share (all shards are alike).
            task = bar.add_task(f"generate ({name})", total=math.ceil(n / state.num_processes), stats="")
            started = time.perf_counter()

            def advance(finished, task=task, started=started):
                k = len(finished)
                done = bar.tasks[task].completed + k
                rate = done * state.num_processes / (time.perf_counter() - started)
                bar.update(task, advance=k, stats=f"{rate:.1f} dialogues/s")

            if use_adapter:
                fold_adapter(loaded)

            def run(part, use_adapter=use_adapter):
                if use_adapter or not adapter or loaded.full:
                    return generate(loaded, part, cfg.data.instruction, cfg.generation, advance)
                with loaded.model.disable_adapter():
                    return generate(loaded, part, cfg.data.instruction, cfg.generation, advance)

            gens = _shard_and_gather(state, run, dialogues)
            seconds = time.perf_counter() - started
            if not main:
                continue
            metrics["models"][name] = score_model(adapter if use_adapter else cfg.model.name, gens, references,
                                                  cfg, seconds)
            suffix = "" if name != "base" or not adapter else "_base"
            write_jsonl_atomic(out_dir / f"predictions{suffix}.jsonl", [
                {"id": i, "dialogue": d, "references": r, "prediction": g.text, "raw_output": g.raw,
                 "new_tokens": g.new_tokens, "hit_max_new_tokens": g.hit_max, "run_on": g.run_on,
                 **(_saved_candidates(g) if cfg.eval.save_candidates and g.candidates else {})}
                for i, d, r, g in zip(ids, dialogues, references, gens)])
    if not main:
        return None
    total_truncated = sum(m["truncated_inputs"] for m in metrics["models"].values())
    if total_truncated:
        warn(f"{total_truncated} dialogues were shortened to generation.max_input_tokens "
             f"({cfg.generation.max_input_tokens})")
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    trackers.log_eval(cfg, adapter, metrics)  # the run's train.report_to, next to its training curves
    return metrics


def _saved_candidates(g: Generated) -> dict:
    """eval.save_candidates' fields: the texts, and (where phi2sum's loop decoded) each candidate's summed
    log-probability and new-token count, for re-selection studies on the CPU."""
    out = {"candidates": list(g.candidates), **({"evidence": list(g.evidence)} if g.evidence else {})}
    if g.candidate_logprobs and None not in g.candidate_logprobs:
        out.update(candidate_logprobs=[round(x, 4) for x in g.candidate_logprobs],
                   candidate_new_tokens=list(g.candidate_tokens))
    return out


def _fmt(entry: dict) -> str:
    ci = entry["ci95"]
    return f"{entry['mean']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def results_table(metrics: dict):
    from rich.table import Table

    models = metrics["models"]
    names = [n for n in ("base", "fine-tuned") if n in models]
    table = Table(title=f"ROUGE F1 on {metrics['split']}: {metrics['n_dialogues']} dialogues, {metrics['n_pairs']} "
                        f"dialogue-reference pairs, stemmed={metrics['use_stemmer']} (95% bootstrap CI)")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    if len(names) == 2:
        table.add_column("difference", justify="right")
    for m in METRICS:
        cells = [_fmt(models[n][m]) for n in names]
        if len(names) == 2:
            d = models["fine-tuned"][m]["mean"] - models["base"][m]["mean"]
            cells.append(f"{d:+.4f}")
        table.add_row(m, *cells)
    extra = [("mean words (refs {:.1f})".format(models[names[0]]["reference_mean_words"]), "mean_words", "{:.1f}"),
             ("ran past the summary", "run_on_share", "{:.1%}"),
             ("hit max_new_tokens", "hit_max_new_tokens_share", "{:.1%}"),
             ("dialogues/s", "dialogues_per_second", "{:.2f}")]
    for label, key, f in extra:
        cells = [f.format(models[n][key]) for n in names]
        if len(names) == 2:
            cells.append("")
        table.add_row(label, *cells)
    return table
