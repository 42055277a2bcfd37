"""Gemma 3 (the Phi-2 path on a base model: plain prompt, EOS stop, BOS-first tokenizer) on a tiny random
Gemma3ForCausalLM built offline: sliding-window layers included, with a window far shorter than the
DialogSum rows, so a padded batch has pad query positions that see no real key at all.

On CUDA, PyTorch's SDPA kernels turn such fully-masked query rows into NaN (or NaN gradients); the loss,
read only at summary positions, stays finite while every LoRA gradient is NaN (weight gradients sum over all
positions: 0 * NaN = NaN), as an HF-Trainer run of Gemma 3 270M showed on an H200. CPU SDPA returns zeros for
those rows, so the tests below reproduce the CUDA behaviour with `cuda_like_sdpa`. CPU, fp32, a few seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SLICE
from phi2sum import modeling
from phi2sum.batches import SummaryLoss, collate
from phi2sum.config import RunConfig
from phi2sum.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 16  # sliding window of the tiny model: every DialogSum row is longer


def _gemma_tokenizer():
    """A Gemma-shaped tokenizer trained on the slice: <pad>=0, <eos>=1, <bos>=2, <unk>=3 (Gemma's ids),
    BOS prepended by the tokenizer itself, pad distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in (SLICE / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["dialogue"], row["summary"]]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tok = _gemma_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True)
    Gemma3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def cuda_like_sdpa(monkeypatch):
    """SDPA with the CUDA kernels' behaviour on a query row whose boolean mask is all False: NaN out.
    Returns the list of calls that had such rows."""
    real = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        out = real(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            dead = ~attn_mask.any(-1, keepdim=True)  # (b, 1|h, q, 1)
            if dead.any():
                seen.append(int(dead.sum()))
                out = out.masked_fill(dead, float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return seen


def _config(model_dir: Path, tmp: Path, **train) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": str(model_dir), "quantization": "none"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        "data": {"source": str(SLICE), "prompt_format": "plain", "max_length": 256,
                 "max_rows": {"train": 32, "validation": 8, "test": 4}, "cache_dir": str(tmp / "cache")},
        "train": {"output_dir": str(tmp / "run"), "device": "cpu", "batch_size": 8, "grad_accum": 1,
                  "max_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0, "eval_every": 4, "save_every": 4,
                  "log_every": 1, "gradient_checkpointing": False, "eval_max_rows": 8, "group_by_length": False}
                 | train,
    })


def test_gemma_tokenizer_specials(tiny_gemma):
    """The plain path: BOS first (Gemma is trained with it), the summary ends with <eos>, pad is <pad> (not EOS)."""
    from phi2sum import data as data_mod

    tok = modeling.load_tokenizer(RunConfig.model_validate({"model": {"name": str(tiny_gemma)}}).model, str(tiny_gemma))
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert tok.pad_token_id != tok.eos_token_id
    stop = tok.convert_tokens_to_ids(data_mod.stop_token(tok, "plain"))
    ids, plen, _ = data_mod.encode_example(tok, "#Person1#: Hi.\n#Person2#: Hello.", "They greet.", "plain",
                                           "Summarize the following conversation.", stop, 128)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("padding_mask", [False, True])
def test_gemma_step_gradients_finite(tiny_gemma, tmp_path, cuda_like_sdpa, padding_mask):
    """One forward/backward of phi2sum's loss on a right-padded batch of real rows, wider than the window:
    the loss and every LoRA gradient stay finite, with or without the padding mask."""
    cfg = _config(tiny_gemma, tmp_path, padding_mask=padding_mask)
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    tok = modeling.load_tokenizer(cfg.model, str(tiny_gemma))
    model = modeling.add_lora(modeling.load_base(cfg.model, hw, str(tiny_gemma), quantize=False), cfg.lora,
                              cfg.train, False)
    from phi2sum import data as data_mod

    rows = data_mod.load_split(cfg.data, "train")
    stop = tok.convert_tokens_to_ids(data_mod.stop_token(tok, "plain"))
    enc = [data_mod.encode_example(tok, d, r[0], "plain", cfg.data.instruction, stop, 256)[:2]
           for d, r in zip(rows.dialogues[:8], rows.references[:8])]
    batch = collate(enc, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max() - lengths.min()) > WINDOW  # some pad queries are outside every real key's window
    loss = SummaryLoss(model, padding_mask=padding_mask)(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("padding_mask", [False, True])
def test_gemma_trains(tiny_gemma, tmp_path, cuda_like_sdpa, padding_mask):
    """The real loop: finite loss and gradient norm at every step, and the loss falls."""
    cfg = _config(tiny_gemma, tmp_path, padding_mask=padding_mask)
    train(cfg, overwrite=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(math.isfinite(r["eval_loss"]) for r in evals)


def test_gemma_prepare_eval_and_summarize_through_the_cli(tiny_gemma, tmp_path):
    """prepare, eval and summarize on the tiny Gemma run, through the CLI as a user runs them: the plain prompt,
    <eos> as the stop token, ROUGE over the test rows, a summary for a user's file."""
    import yaml
    from typer.testing import CliRunner

    from phi2sum.cli import app

    runner = CliRunner()
    cfg = _config(tiny_gemma, tmp_path)
    config = tmp_path / "gemma.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"generation": {"max_new_tokens": 8}}))
    result = runner.invoke(app, ["prepare", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "prompt format: plain" in result.output and "'<eos>'" in result.output
    train(cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"max_new_tokens": 8})}), overwrite=True)
    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "run"), "--compare", "none"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["prompt_format"] == "plain" and metrics["stop_tokens"][0] == "<eos>"
    assert metrics["n_dialogues"] == 4 and 0 <= metrics["models"]["fine-tuned"]["rouge1"]["mean"] <= 1
    dialog = tmp_path / "d.txt"
    dialog.write_text("Tom: Are you coming tonight?\nAnn: Yes, at eight.\n", encoding="utf-8")
    result = runner.invoke(app, ["summarize", str(dialog), "--adapter", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert str(dialog) in result.output
