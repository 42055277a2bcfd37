"""Shared by the bench scripts: the Phi-2-shaped model, the result file layout, DialogSum rows.

Phi-2's weights cannot be fetched offline, so the speed benchmarks use PhiForCausalLM built from Phi-2's
published config with random weights; speed and memory do not depend on the weights' values. Its tokenizer is
a byte-level BPE (GPT-2 style, like Phi-2's) trained on DialogSum's train split, so sequence lengths are
DialogSum's. Results go to bench/results/<question>/<card>-<date>.json with a markdown table beside it.
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Phi-2's published config (microsoft/phi-2 config.json); resid_pdrop is Phi-2's 0.1, which costs a dropout
# mask per block in training, as with the real model.
PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, partial_rotary_factor=0.4, layer_norm_eps=1e-5, hidden_act="gelu_new",
            tie_word_embeddings=False, max_position_embeddings=2048, resid_pdrop=0.1)


def rows(data: Path, split: str) -> list[dict]:
    """One split of a DialogSum folder (split.jsonl.gz or split.jsonl)."""
    path = data / f"{split}.jsonl.gz"
    opener = gzip.open if path.exists() else open
    path = path if path.exists() else data / f"{split}.jsonl"
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def build_phi2_shape(data: Path, out: Path) -> Path:
    """A Phi-2-shaped checkpoint with random weights and a DialogSum-trained BPE tokenizer, saved to `out`
    (reused when it exists)."""
    import torch
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = PhiForCausalLM(PhiConfig(**PHI2, bos_token_id=0, eos_token_id=0)).to(torch.bfloat16)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def require_cuda(script: str) -> None:
    """Stop with one line where there is no CUDA GPU; otherwise make this checkout's phi2sum the one imported."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    sys.path.insert(0, str(ROOT))


def environment() -> dict:
    """Card, date and package versions for a result file."""
    import peft
    import torch
    import transformers

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    from importlib import metadata

    # 4-bit speed is bitsandbytes' kernels: which matmul it picks per card and batch shape changes between releases.
    try:
        bnb = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        bnb = None
    return {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb}


def result_path(question: str, card: str, date: str, suffix: str, tag: str | None = None) -> Path:
    """bench/results/<question>/<card-slug>-<date>[-<tag>]<suffix>, e.g. train_speed/nvidia-h200-2026-11-27.json."""
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    return RESULTS / question / f"{slug}-{date}{'-' + tag if tag else ''}{suffix}"


def raw_dir(question: str, card: str, date: str) -> Path:
    """bench/results/<question>/raw/<card-slug>-<date>/: per-step logs and predictions, ignored by git."""
    path = result_path(question, card, date, "")
    return path.parent / "raw" / path.name


def write_result(question: str, result: dict, table: list[str], tag: str | None = None) -> Path:
    """Write the JSON and a markdown page (title, command, versions, then `table`) beside it."""
    path = result_path(question, result["card"], result["date"], ".json", tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    head = [f"# {question}: {result['card']}, {result['date']}", "",
            f"`{result['command']}`", "",
            f"torch {result.get('torch')}, transformers {result.get('transformers')}, peft {result.get('peft')}, "
            f"bitsandbytes {result.get('bitsandbytes')}.", ""]
    path.with_suffix(".md").write_text("\n".join(head + table) + "\n")
    return path


def free_memory() -> None:
    """Drop what the last case left on the card and restart the peak counters, so each row's peak is its own."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def decoding(g) -> str:
    """A generation config's decoding in words, for a result row."""
    if g.mbr_candidates and g.do_sample:
        rule = f"MBR over {g.mbr_candidates} samples at T {g.temperature}"
        return rule + (f" vs {g.mbr_evidence} evidence samples at T {g.mbr_evidence_temperature}" if g.mbr_evidence else "")
    if g.num_beams > 1:
        return f"beam {g.num_beams}, length penalty {g.length_penalty}"
    return f"{'sampling' if g.do_sample else 'greedy'}, up to {g.max_new_tokens} new tokens"


def table(header: list[str], align: str, runs: list[dict], cells) -> list[str]:
    """A markdown table of result rows: `align` has one letter per column (l or r), cells(row) gives the cells after
    the row's name; a failed row shows its error instead."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    for r in runs:
        rest = [f"failed: {r['error'][:120]}", *[""] * (len(header) - 2)] if "error" in r else cells(r)
        lines.append("| " + " | ".join([r["name"], *rest]) + " |")
    return lines


def run_case(result: dict, name: str, measure, on_error=None) -> dict:
    """One row of `result["runs"]`: measure()'s row, or the error that stopped it, so that one failing case does not
    lose the others on a metered GPU. Printed as a JSON line as soon as it is known."""
    try:
        row = measure()
    except Exception as e:
        row = {"name": name, "error": f"{type(e).__name__}: {e}"[:400]}
        if on_error:
            on_error()
    result["runs"].append(row)
    print(json.dumps(row), flush=True)
    return row


def command_line() -> str:
    import shlex

    return shlex.join(["python3", *sys.argv])  # quoted, so a --variant with spaces can be pasted back
