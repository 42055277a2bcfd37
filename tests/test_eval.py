"""Batched generation, ROUGE and the eval verb, through the real code: a random tiny model for padding
checks, "scripted" tiny models whose next token is fixed (to place stop tokens and run-ons exactly),
rouge-score itself as the reference, and one real training run scored by `phi2sum eval`."""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, SLICE, tiny_config_dict
from phi2sum import data as data_mod
from phi2sum import evaluate, modeling
from phi2sum.cli import app
from phi2sum.config import GenerationConfig, RunConfig

runner = CliRunner()
EOS = "<|endoftext|>"
INSTRUCTION = "Summarize the following conversation."
# Prompts of very different lengths, so batches need real left padding.
DIALOGUES = ["#Person1#: Hi.\n#Person2#: Hey.",
             "#Person1#: Where is the station?\n#Person2#: Two blocks down, next to the bank. " * 6,
             "#Person1#: Coffee?\n#Person2#: Tea, please.",
             "#Person1#: I lost my keys again, could you help me look for them?\n#Person2#: Sure. " * 3,
             "#Person1#: Done?\n#Person2#: Yes."]


def config(model_dir: Path, tmp: Path, **sections) -> RunConfig:
    return RunConfig.model_validate(tiny_config_dict(model_dir, tmp, **sections))


def scripted_lm(model_dir: Path, script: dict[str, list[str]], bias: dict[str, float] | None = None,
                new_tokens: tuple[str, ...] = (), fmt: str = "plain") -> evaluate.Loaded:
    """A real PhiForCausalLM rewired so its next token depends only on the current one.

    Attention and MLP outputs are zeroed, so the last hidden state is the normed embedding of the current
    token; the scripted tokens get orthogonal embeddings and lm_head maps each to its successor(s) with a
    logit of 30 (all else 0, plus `bias`). Two successors tie, so sampling picks either. Every prompt ends
    with the template's last token ("\\n" after `Output:`), so the script starts there."""
    from transformers import AutoTokenizer, PhiForCausalLM

    tok = modeling.fix_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    tok.add_tokens(list(new_tokens))
    model = PhiForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    used = sorted(set(script) | {y for ys in script.values() for y in ys} | set(bias or {}))
    ids = {t: tok.convert_tokens_to_ids(t) for t in used}
    assert tok.unk_token_id not in [ids[t] for t in used if t != tok.unk_token], "a scripted token is not in the vocab"
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.dense, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        a = torch.randn(model.config.hidden_size, len(used), generator=torch.Generator().manual_seed(0))
        basis, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal, zero-mean: LayerNorm keeps them orthogonal
        emb, norm, head = model.model.embed_tokens.weight, model.model.final_layernorm, model.lm_head
        for k, t in enumerate(used):
            emb[ids[t]] = 5 * basis[:, k]
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        head.weight.zero_()
        head.bias.zero_()
        for x, successors in script.items():
            h = norm(emb[ids[x]])
            for y in successors:
                head.weight[ids[y]] += 30.0 * h / h.dot(h)
        for t, b in (bias or {}).items():
            head.bias[ids[t]] = b
    model.eval()
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    return evaluate.Loaded(model, tok, fmt, data_mod.stop_ids(tok, fmt), None, hw)


def chain(*tokens: str) -> dict[str, list[str]]:
    return {a: [b] for a, b in zip(tokens, tokens[1:])}


# "Tom is late." then the stop token, as BPE tokens of the test tokenizer.
TOM_IS_LATE = ("Ċ", "T", "om", "Ġis", "Ġl", "ate", ".")


@pytest.fixture(scope="module")
def random_lm(tiny_model, tmp_path_factory) -> evaluate.Loaded:
    return evaluate.load_for_inference(config(tiny_model, tmp_path_factory.mktemp("cfg")), None)


@pytest.fixture(scope="module")
def random_chat_lm(tiny_chat_model, tmp_path_factory) -> evaluate.Loaded:
    return evaluate.load_for_inference(config(tiny_chat_model, tmp_path_factory.mktemp("cfg")), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Path:
    """One real 6-step CPU training run for the eval verb tests."""
    from phi2sum.train import train

    tmp = tmp_path_factory.mktemp("eval-run")
    train(config(tiny_model, tmp))
    return tmp / "run"


# ----------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("lm", ["random_lm", "random_chat_lm"])
def test_batched_generation_equals_one_at_a_time(lm, request):
    """Left padding and the attention mask leave each row's greedy output exactly as if it ran alone."""
    loaded = request.getfixturevalue(lm)
    batched = evaluate.generate(loaded, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=10, batch_size=4))
    alone = evaluate.generate(loaded, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=10, batch_size=1))
    assert [g.raw for g in batched] == [g.raw for g in alone]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in alone]
    for g in batched:
        assert "Instruct:" not in g.raw and "#Person1#: " not in g.raw and "<|im_start|>" not in g.raw


def test_batches_group_prompts_of_similar_length(random_lm):
    widths = []

    class Recorder:  # the real model, with the padded batch widths noted on the way
        def generate(self, input_ids, **kwargs):
            widths.append(input_ids.shape[1])
            return random_lm.model.generate(input_ids=input_ids, **kwargs)

    loaded = evaluate.Loaded(Recorder(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None,
                             random_lm.hardware)
    short, long = DIALOGUES[0], DIALOGUES[1]
    gens = evaluate.generate(loaded, [short, long, short, long], INSTRUCTION,
                             GenerationConfig(max_new_tokens=2, batch_size=2))
    lengths = {d: len(data_mod.fit_prompt(random_lm.tokenizer, d, "plain", INSTRUCTION, 896)[0]) for d in (short, long)}
    assert widths == [lengths[long], lengths[short]]  # the long pair first, the short pair unpadded
    assert gens[0].raw == gens[2].raw and gens[1].raw == gens[3].raw  # results come back in input order


def test_output_is_the_summary_alone_and_stops_at_the_stop_token(tiny_model):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    for g in evaluate.generate(loaded, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=12, batch_size=2)):
        assert (g.text, g.raw, g.new_tokens, g.hit_max, g.run_on) == ("Tom is late.", "Tom is late.", 6, False, False)


def test_hit_max_when_no_stop_token_comes(tiny_model):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    [g] = evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION, GenerationConfig(max_new_tokens=3))
    assert (g.text, g.new_tokens, g.hit_max) == ("Tom is", 3, True)


def test_rows_that_stop_early_are_cut_at_their_stop_token(tiny_model):
    """After "Tom" the script ties between " is late." + stop and an endless " ok ok": sampled rows
    take either branch within one batch; each is cut at its own stop token or runs to max_new_tokens."""
    script = chain(*TOM_IS_LATE, EOS) | {"om": ["Ġis", "Ġo"], "Ġo": ["k"], "k": ["Ġo"]}
    loaded = scripted_lm(tiny_model, script)
    torch.manual_seed(0)
    gens = evaluate.generate(loaded, DIALOGUES[:2] * 8, INSTRUCTION,
                             GenerationConfig(max_new_tokens=10, batch_size=16, do_sample=True))
    outcomes = {(g.text, g.new_tokens, g.hit_max) for g in gens}
    assert outcomes == {("Tom is late.", 6, False), ("Tom ok ok ok ok", 10, True)}


def test_chat_model_stops_at_its_end_of_turn_token_not_eos(tiny_chat_model):
    """The chat template ends turns with <|im_end|> (not EOS); text scripted after it is never shown."""
    loaded = scripted_lm(tiny_chat_model, chain(*TOM_IS_LATE, "<|im_end|>", "Ġo", "k"), fmt="chat")
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids)[0] == "<|im_end|>"
    [g] = evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION, GenerationConfig(max_new_tokens=12))
    assert (g.text, g.raw, g.new_tokens, g.hit_max) == ("Tom is late.", "Tom is late.", 6, False)


def test_run_on_into_a_new_turn_is_cut_and_flagged(tiny_model):
    turn = "\n#Person2#:"  # one added token: the script needs a newline token other than the prompt's last
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, turn, "Ġo", "k", EOS), new_tokens=(turn,))
    [g] = evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION, GenerationConfig(max_new_tokens=20))
    assert (g.text, g.raw, g.run_on, g.hit_max) == ("Tom is late.", "Tom is late.\n#Person2#: ok", True, False)


@pytest.mark.parametrize("raw,text,run_on", [
    ("Tom is late.", "Tom is late.", False),
    (" #Person1# tells #Person2# about it. ", "#Person1# tells #Person2# about it.", False),
    ("Tom is late.\n#Person2#: ok, see you", "Tom is late.", True),
    ("Tom is late.\n  #Person1#: hm", "Tom is late.", True),
    ("Tom is late.\nPerson2: ok", "Tom is late.", True),
    ("Tom is late.\nInstruct: Summarize", "Tom is late.", True),
    ("Tom is late.\n<|im_start|>user", "Tom is late.", True),
    ("Tom is late.\nHe left.", "Tom is late.\nHe left.", False),
    ("Tom says #Person2#: is late", "Tom says #Person2#: is late", False),  # not a new line: not a turn
])
def test_clean_summary(raw, text, run_on):
    assert evaluate.clean_summary(raw) == (text, run_on)


def test_beam_search_and_sampling_work(tiny_model, random_lm):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    for gen in (GenerationConfig(num_beams=2, max_new_tokens=12),
                GenerationConfig(num_beams=3, length_penalty=0.5, max_new_tokens=12),
                GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=12)):
        gens = evaluate.generate(loaded, DIALOGUES, INSTRUCTION, gen)
        assert {(g.text, g.hit_max) for g in gens} == {("Tom is late.", False)}, gen
    # On a random model: beams/sampling run batched, stay within max_new_tokens, and sampling is seeded.
    beams = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, GenerationConfig(num_beams=2, max_new_tokens=6))
    assert all(0 < g.new_tokens <= 6 for g in beams)
    sampled = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed + 100)  # generation.seed decides, not whatever the global RNG was
        sampled.append([g.raw for g in evaluate.generate(random_lm, DIALOGUES, INSTRUCTION,
                                                         GenerationConfig(do_sample=True, max_new_tokens=6, seed=seed))])
    assert sampled[0] == sampled[1] != sampled[2]


def test_repetition_penalty_is_applied(tiny_model):
    # " ok" repeats forever; with a penalty the repeated " o" falls below " do" (bias 5), which ends it.
    loaded = scripted_lm(tiny_model, {"Ċ": ["Ġo"], "Ġo": ["k"], "k": ["Ġo"], "Ġdo": [EOS]}, bias={"Ġdo": 5.0})
    [plain] = evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION, GenerationConfig(max_new_tokens=6))
    [penalized] = evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION,
                                    GenerationConfig(max_new_tokens=6, repetition_penalty=10.0))
    assert (plain.text, plain.hit_max) == ("ok ok ok", True)
    assert (penalized.text, penalized.hit_max) == ("ok do", False)


def test_long_dialogues_are_shortened_to_max_input_tokens(random_lm):
    gen = GenerationConfig(max_new_tokens=2, max_input_tokens=64)
    gens = evaluate.generate(random_lm, [DIALOGUES[0], DIALOGUES[1]], INSTRUCTION, gen)
    assert [g.truncated_input for g in gens] == [False, True]


# ----------------------------------------------------------------------------------------------------
# ROUGE


def split_sentences(text: str) -> str:
    # The sentence split metrics.json documents for rougeLsum ("split after . ! ?").
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def direct_rouge(predictions, references, use_stemmer=True) -> tuple[dict, dict]:
    """Mean over all dialogue-reference pairs, and against the first reference, with rouge-score itself."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=use_stemmer)
    pairs, first = {m: [] for m in evaluate.METRICS}, {m: [] for m in evaluate.METRICS}
    for pred, refs in zip(predictions, references):
        for j, ref in enumerate(refs):
            flat = scorer.score(ref, pred)
            lsum = scorer.score(split_sentences(ref), split_sentences(pred))["rougeLsum"]
            for m in evaluate.METRICS:
                f = (lsum if m == "rougeLsum" else flat[m]).fmeasure
                pairs[m].append(f)
                if j == 0:
                    first[m].append(f)
    return {m: float(np.mean(v)) for m, v in pairs.items()}, {m: float(np.mean(v)) for m, v in first.items()}


@pytest.fixture(scope="module")
def slice_refs() -> list[list[str]]:
    rows = [json.loads(line) for line in (SLICE / "test.jsonl").read_text().splitlines()]
    # Uneven reference counts, as after merging duplicate dialogues.
    return [r["summaries"][: 1 + i % 3] for i, r in enumerate(rows)]


def test_rouge_matches_rouge_score(slice_refs):
    # Predictions of mixed quality: a reference of the next dialogue, a cut-down reference, two sentences.
    preds = [slice_refs[(i + 1) % len(slice_refs)][0] if i % 3 == 0 else
             " ".join(refs[-1].split()[: 6 + i % 7]) if i % 3 == 1 else
             f"{refs[0].split('.')[0]}. They agree to meet later!"
             for i, refs in enumerate(slice_refs)]
    for stem in (True, False):
        result = evaluate.rouge(preds, slice_refs, use_stemmer=stem)
        pairs, first = direct_rouge(preds, slice_refs, use_stemmer=stem)
        assert result.pairs == pytest.approx(pairs, abs=1e-12)
        assert result.first == pytest.approx(first, abs=1e-12)
        assert result.counts.sum() == sum(len(r) for r in slice_refs)
    # Stemming is a real switch ("agrees"/"agree" match only stemmed).
    assert evaluate.rouge(["He agrees."], [["He agree."]], True).pairs["rouge1"] == 1.0
    assert evaluate.rouge(["He agrees."], [["He agree."]], False).pairs["rouge1"] == 0.5


def test_identical_predictions_score_one(slice_refs):
    refs = [[r[0]] for r in slice_refs]
    result = evaluate.rouge([r[0] for r in refs], refs)
    assert result.pairs == {m: pytest.approx(1.0) for m in evaluate.METRICS}
    assert evaluate.bootstrap_ci(result, 200) == {m: [pytest.approx(1.0), pytest.approx(1.0)] for m in evaluate.METRICS}


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_dialogues():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(40)]

    def world(n):
        refs = [[" ".join(rng.choice(vocab, 12)) for _ in range(3)] for _ in range(n)]
        preds = [" ".join(rng.choice(r[0].split() + vocab, 10)) for r in refs]
        return evaluate.rouge(preds, refs)

    small, large = world(15), world(300)
    width = {}
    for name, result in (("small", small), ("large", large)):
        ci = evaluate.bootstrap_ci(result, 500)
        for m in evaluate.METRICS:
            assert ci[m][0] <= result.pairs[m] <= ci[m][1]
        width[name] = ci["rouge1"][1] - ci["rouge1"][0]
    assert width["large"] < width["small"] / 2
    assert evaluate.bootstrap_ci(small, 0) == {m: None for m in evaluate.METRICS}


# ----------------------------------------------------------------------------------------------------
# The eval verb


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_verb_writes_table_predictions_and_metrics(trained, tmp_path):
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for word in ("rouge1", "rouge2", "rougeL", "rougeLsum", "base", "fine-tuned", "difference"):
        assert word in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_dialogues"], metrics["n_pairs"], metrics["use_stemmer"]) == (3, 9, True)
    assert metrics["generation"]["max_new_tokens"] == 12 and metrics["generation"]["num_beams"] == 1
    assert metrics["stop_tokens"] == [EOS] and metrics["prompt_format"] == "plain"
    refs = [json.loads(line)["summaries"] for line in (SLICE / "test.jsonl").read_text().splitlines()[:3]]
    for name, file in (("fine-tuned", "predictions.jsonl"), ("base", "predictions_base.jsonl")):
        rows = read_jsonl(out / file)
        assert [r["id"] for r in rows] == ["test_0", "test_1", "test_2"]
        assert [r["references"] for r in rows] == refs
        assert all(r["dialogue"].startswith("#Person1#:") and isinstance(r["prediction"], str) for r in rows)
        scores = metrics["models"][name]
        pairs, first = direct_rouge([r["prediction"] for r in rows], [r["references"] for r in rows])
        for m in evaluate.METRICS:
            assert scores[m]["mean"] == pytest.approx(pairs[m], abs=1e-12)
            lo, hi = scores[m]["ci95"]
            assert lo <= scores[m]["mean"] + 1e-12 and scores[m]["mean"] <= hi + 1e-12
        assert scores["first_reference"] == pytest.approx(first, abs=1e-12)
        assert scores["mean_words"] == pytest.approx(np.mean([len(r["prediction"].split()) for r in rows]))
        assert scores["reference_mean_words"] == pytest.approx(np.mean([len(x.split()) for r in refs for x in r]))
        assert scores["run_on_share"] == np.mean([r["run_on"] for r in rows])
        assert scores["hit_max_new_tokens_share"] == np.mean([r["hit_max_new_tokens"] for r in rows])
    # The adapter changed the model: the two prediction files differ (a 6-step run at lr 3e-3).
    assert read_jsonl(out / "predictions.jsonl") != read_jsonl(out / "predictions_base.jsonl")
    assert not any("candidates" in r for r in read_jsonl(out / "predictions.jsonl"))  # only with MBR


def test_mbr_eval_saves_candidates_that_rescoring_turns_back_into_its_predictions(trained, tmp_path):
    """With generation.mbr_candidates, predictions.jsonl keeps every candidate; bench/mbr_pool.py re-selects
    from them on the CPU, and the shipped rule over all candidates gives back eval's own predictions."""
    import subprocess
    import sys

    out = tmp_path / "scores"
    mbr = ["--set", "generation.mbr_candidates=6", "--set", "generation.do_sample=true", "--set", "generation.temperature=1.5"]
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--compare", "none", "--out", str(out), *mbr])
    assert result.exit_code == 0, result.output
    assert not any("candidates" in r for r in read_jsonl(out / "predictions.jsonl"))  # opt-in: MB per eval
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--compare", "none", "--out", str(out), *mbr,
                                 "--set", "eval.save_candidates=true"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(len(r["candidates"]) == 6 and r["prediction"] in r["candidates"] for r in rows)
    assert any(len(set(r["candidates"])) > 1 for r in rows)  # sampled: the choice is a real one
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "mbr_pool.py"), f"m={out / 'predictions.jsonl'}",
                            "--out", str(tmp_path / "rescore"), "--label", "t", "--ks", "2,6", "--workers", "1",
                            "--samples", "50"], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    res = json.loads((tmp_path / "rescore" / "mbr_pool_t.json").read_text())
    assert (res["dialogues"], res["candidates"], res["mismatches"]) == (len(rows), {"m": 6}, {"m": 0})
    shipped = next(v for v in res["variants"] if (v["k"], v["utility"]) == (6, "R1+R2+RL"))
    scored = json.loads((out / "metrics.json").read_text())["models"]["fine-tuned"]
    assert shipped["rouge1"] == pytest.approx(scored["rouge1"]["mean"], abs=1e-12)
    oracle = next(v for v in res["variants"] if v["utility"].startswith("oracle"))
    assert all(oracle["mean"] >= v["mean"] - 1e-12 for v in res["variants"])

    # With evidence: mbr_evidence samples per dialogue, saved, and the pick is mbr_pick against them.
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--compare", "none", "--out", str(out), *mbr,
                                 "--set", "eval.save_candidates=true", "--set", "generation.mbr_evidence=5",
                                 "--set", "generation.mbr_evidence_temperature=2.0"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(len(r["candidates"]) == 6 and len(r["evidence"]) == 5 for r in rows)
    assert all(r["prediction"] == r["candidates"][evaluate.mbr_pick(r["candidates"], evidence=r["evidence"])]
               for r in rows)
    assert json.loads((out / "metrics.json").read_text())["generation"]["mbr_evidence"] == 5


def test_eval_compare_none_and_limit_beyond_the_split(trained):
    """--compare none scores only the fine-tuned model; a --limit above the split's size means all of it.
    Without --out, results go to <run>/eval."""
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--compare", "none", "--limit", "100"])
    assert result.exit_code == 0, result.output
    out = trained / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["fine-tuned"]
    assert metrics["n_dialogues"] == 6  # data.max_rows.test in the tiny config
    assert len(read_jsonl(out / "predictions.jsonl")) == 6
    assert not (out / "predictions_base.jsonl").exists()
    assert "fine-tuned" in result.output and "difference" not in result.output


def test_eval_bare_adapter_reads_its_base_from_adapter_config(trained, tiny_model, tmp_path):
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained / name, bare / name)
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(bare), "--limit", "2", "--compare", "none",
                                 "--out", str(out), "--set", f"data.source={SLICE}",
                                 "--set", "generation.max_new_tokens=4", "--set", "eval.bootstrap_samples=10"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_model"] == str(tiny_model)
    assert metrics["n_dialogues"] == 2 and metrics["generation"]["max_new_tokens"] == 4


def test_eval_on_a_folder_that_is_not_an_adapter(tmp_path):
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["eval", "--adapter", str(folder), "--limit", "1"])
    assert result.exit_code == 2
    # Said before the (default, hub) test split is loaded: the one line names the adapter problem.
    assert error_lines(result.output) == [f"error: {folder} is not an adapter or run directory (no "
                                          "adapter_config.json or config.json); pass the output_dir of `phi2sum train`"]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory) -> Path:
    """A tiny model with another hidden size: an adapter from tiny_model does not fit it."""
    from transformers import PhiConfig, PhiForCausalLM

    from conftest import _train_tokenizer

    out = tmp_path_factory.mktemp("tiny-phi-wide")
    tok = _train_tokenizer(chat=False)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.4, tie_word_embeddings=False,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    PhiForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_eval_adapter_for_another_base_is_one_clear_error(trained, tiny_model, wider_model, tmp_path):
    result = runner.invoke(app, ["eval", "--adapter", str(trained), "--limit", "1", "--out", str(tmp_path / "x"),
                                 "--set", f"model.name={wider_model}"])
    assert result.exit_code in (1, 2), result.output
    [line] = error_lines(result.output)
    assert f"cannot load the adapter from {trained}" in line
    assert f"trained on {tiny_model}, not {wider_model}" in line
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_token_budget_puts_long_prompts_in_smaller_batches(random_lm):
    """batch_tokens caps rows x (longest prompt + max_new_tokens); results do not depend on the split."""
    gen = GenerationConfig(max_new_tokens=4, batch_size=8)
    lengths = [100, 90, 40, 30, 30, 20, 10]
    order = list(range(len(lengths)))
    assert evaluate.plan_batches(lengths, order, gen) == [order]
    capped = gen.model_copy(update={"batch_tokens": 208})
    # 208 // 104 = 2 rows of the longest; then 208 // 44 = 4 rows; the last one alone
    assert evaluate.plan_batches(lengths, order, capped) == [[0, 1], [2, 3, 4, 5], [6]]
    beams = capped.model_copy(update={"num_beams": 2})  # each row keeps 2 beams' caches: half the rows
    assert evaluate.plan_batches(lengths, order, beams) == [[0], [1], [2, 3], [4, 5, 6]]
    one = gen.model_copy(update={"batch_tokens": 1})  # never less than one row
    assert evaluate.plan_batches(lengths, order, one) == [[i] for i in order]
    budget = GenerationConfig(max_new_tokens=10, batch_size=4, batch_tokens=150)
    plain = GenerationConfig(max_new_tokens=10, batch_size=4)
    a = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, budget)
    b = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, plain)
    assert [g.raw for g in a] == [g.raw for g in b]


def test_full_fine_tune_run_evaluates_against_its_base_and_stages_for_the_hub(tiny_model, tmp_path):
    """lora.enabled: false trains every weight; the run holds a whole model that eval, summarize and push
    load as they load an adapter, and --compare base scores the original weights."""
    from phi2sum import hub
    from phi2sum.train import train

    cfg = config(tiny_model, tmp_path, lora={"enabled": False}, train={"max_steps": 3, "learning_rate": 1e-3})
    train(cfg)
    run = tmp_path / "run"
    assert modeling.is_full_model(run) and not (run / "adapter_config.json").exists()
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(run), "--limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"fine-tuned", "base"}
    base_direct = evaluate.generate(evaluate.load_for_inference(cfg, None),
                                    [r["dialogue"] for r in read_jsonl(out / "predictions_base.jsonl")],
                                    INSTRUCTION, cfg.generation)
    assert [g.text for g in base_direct] == [r["prediction"] for r in read_jsonl(out / "predictions_base.jsonl")]
    tuned = evaluate.load_for_inference(cfg, str(run))
    assert tuned.full and not hasattr(tuned.model, "disable_adapter")
    from safetensors.torch import load_file

    saved = load_file(str(run / "model.safetensors"))  # the trained weights, not the base's, are loaded
    name = "model.layers.0.mlp.fc1.weight"
    assert torch.equal(tuned.model.state_dict()[name], saved[name])
    base = evaluate.load_for_inference(cfg, None).model.state_dict()[name]
    assert not torch.equal(base, saved[name])
    files = dict(hub.stage(run, cfg, "me/full", (tmp_path / "stage").mkdir() or tmp_path / "stage"))
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "library_name: transformers" in card and "PeftModel" not in card
    assert 'AutoModelForCausalLM.from_pretrained("me/full"' in card
    assert "--set model.name=me/full" in card and "--adapter me/full" not in card
    assert "full fine-tune of every weight" in card and "LoRA r=" not in card
    result = runner.invoke(app, ["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "full fine-tune" in result.output


def test_a_batch_that_does_not_fit_the_gpu_is_halved_and_the_eval_finishes(random_lm, capsys):
    """A card smaller than the config assumed: batches over 2 rows run out of memory. The batch is halved
    (once, with a warning), later batches keep the size that fitted, and the summaries are the same."""
    attempts = []

    class Small:  # the real model, on a card that holds 2 rows at most
        def generate(self, input_ids, **kwargs):
            attempts.append(input_ids.shape[0])
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            return random_lm.model.generate(input_ids=input_ids, **kwargs)

    loaded = evaluate.Loaded(Small(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None, random_lm.hardware)
    gen = GenerationConfig(max_new_tokens=6, batch_size=5)
    fitted = evaluate.generate(loaded, DIALOGUES, INSTRUCTION, gen)
    plain = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, gen)
    assert [g.raw for g in fitted] == [g.raw for g in plain]
    assert attempts == [5, 3, 2, 1, 2]  # 5 fails, its first 3 fail, then at most 2 per batch: 2 + 1, 2
    err = capsys.readouterr().err
    assert err.count("out of GPU memory") == 2 and "at most 2 per batch" in err


def test_one_dialogue_that_does_not_fit_is_one_clear_error(random_lm):
    class Full:
        def generate(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    loaded = evaluate.Loaded(Full(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None, random_lm.hardware)
    with pytest.raises(evaluate.Phi2sumError, match="one dialogue of .* lower generation.max_input_tokens"):
        evaluate.generate(loaded, DIALOGUES[:1], INSTRUCTION, GenerationConfig(max_new_tokens=10))


def _padded_batch(loaded: evaluate.Loaded, gen: GenerationConfig):
    prompts = [data_mod.fit_prompt(loaded.tokenizer, d, loaded.fmt, INSTRUCTION, gen.max_input_tokens)[0]
               for d in DIALOGUES]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@pytest.fixture(scope="module")
def gqa_lm(tiny_model, tmp_path_factory) -> evaluate.Loaded:
    """A tiny Llama with grouped-query attention (SmolLM2's architecture), random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = modeling.fix_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                         max_position_embeddings=2048, tie_word_embeddings=True,
                                         initializer_range=0.3)).eval()
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    return evaluate.Loaded(model, tok, "plain", data_mod.stop_ids(tok, "plain"), None, hw)


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_cache_greedy_loop_gives_generates_tokens(lm, request):
    """The GPU's graph-replayed greedy loop, run eagerly on CPU, produces transformers' greedy tokens for a
    left-padded batch (Phi, and Llama with grouped-query attention), including rows that stop early."""


    loaded = request.getfixturevalue(lm)
    gen = GenerationConfig(max_new_tokens=12)
    ids, mask = _padded_batch(loaded, gen)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    endless = replace(loaded, stop_ids=[-1])
    reference = [c[0][0] for c in evaluate._generate_padded(endless, prompts, gen)]
    assert [t for t, _ in evaluate.decode_static(endless, ids, mask, gen, graph=False)] == reference
    assert len({tuple(r) for r in reference}) > 1  # the rows really differ
    # A token some rows produce mid-way becomes the stop token: those rows end there, the others go on.
    stop = reference[0][4]
    stopping = replace(loaded, stop_ids=[stop])
    reference = [c[0][0] for c in evaluate._generate_padded(stopping, prompts, gen)]
    ours = [t for t, _ in evaluate.decode_static(stopping, ids, mask, gen, graph=False)]
    cuts = [next((k for k, t in enumerate(r) if t == stop), None) for r in reference]
    assert cuts[0] == 4 and None in cuts
    for want, got, cut in zip(reference, ours, cuts):
        assert got[: None if cut is None else cut + 1] == want[: None if cut is None else cut + 1]


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=0.5, top_k=5),
                                      dict(temperature=1.3, top_k=0, top_p=0.8), dict(temperature=0.5, top_p=0.6),
                                      dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_k=5, top_p=0.5)])
def test_sampling_scores_are_transformers_warpers(settings):
    """The loop samples from the distribution transformers' temperature, top-k and top-p warpers leave."""
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    gen = GenerationConfig(do_sample=True, **settings)
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    logits[0, :10] = 5.0  # ties at the top
    warpers = LogitsProcessorList([TemperatureLogitsWarper(gen.temperature)])
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1:
        warpers.append(TopPLogitsWarper(gen.top_p))
    want = warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone()).softmax(-1)
    values, ids = evaluate.sampling_scores(logits, gen)
    got = torch.zeros_like(logits).scatter_(-1, ids, values.softmax(-1))
    assert torch.allclose(got[1:], want[1:], atol=1e-6)
    # Row 0's ten tied best tokens: which of equal tokens a cut keeps is the sort's choice, the mass is not.
    assert torch.allclose(got[0].sort().values, want[0].sort().values, atol=1e-6)
    assert (want > 0).sum(-1).min() < 300 or not (gen.top_k or gen.top_p < 1)  # the filters did cut something


def test_sample_token_draws_each_token_at_its_probability():
    gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=3)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.2, 0.9]]).repeat(200_000, 1)
    torch.manual_seed(0)
    drawn = evaluate.sample_token(logits, gen)
    share = torch.bincount(drawn, minlength=5).double() / len(drawn)
    want = torch.zeros(5, dtype=torch.double)
    want[[0, 4, 1]] = torch.tensor([1.0, 0.9, 0.5], dtype=torch.double).div(0.5).softmax(0)
    assert torch.allclose(share, want, atol=0.005), (share, want)  # standard error ~0.001
    assert share[2] == 0 and share[3] == 0  # outside the top 3


def _tokens(groups):
    return [[tokens for tokens, _ in group] for group in groups]


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_samples_candidates_per_prompt(lm, request):
    """MBR's sampling through the loop: each prompt gets its own candidates (at a temperature near 0 they are
    the greedy tokens of that prompt), at temperature 1 they differ, and the same seed draws the same."""
    loaded = request.getfixturevalue(lm)
    endless = replace(loaded, stop_ids=[-1])
    greedy = GenerationConfig(max_new_tokens=10)
    ids, mask = _padded_batch(loaded, greedy)
    reference = [c[0][0] for c in evaluate._generate_padded(endless, [r[m.bool()].tolist() for r, m in zip(ids, mask)],
                                                         greedy)]
    cold = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1e-6, mbr_candidates=3)
    grouped = _tokens(evaluate.decode_candidates(endless, ids, mask, cold, graph=False))
    assert grouped == [[want] * 3 for want in reference]
    warm = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, mbr_candidates=4)
    torch.manual_seed(3)
    first = _tokens(evaluate.decode_candidates(endless, ids, mask, warm, graph=False))
    torch.manual_seed(3)
    assert _tokens(evaluate.decode_candidates(endless, ids, mask, warm, graph=False)) == first
    assert all(len(c) == 4 and len({tuple(s) for s in c}) > 1 for c in first)
    # Both the prefill's token and the replayed steps' tokens are drawn, not argmax'd.
    # (top_k 3 so that candidates share first tokens: then only later draws can tell them apart)
    many = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=3, mbr_candidates=32)
    drawn = _tokens(evaluate.decode_candidates(endless, ids, mask, many, graph=False))
    assert any(len({s[0] for s in c}) > 1 for c in drawn)
    assert any(len({tuple(s[1:]) for s in c if s[0] == t}) > 1 for c in drawn for t in {s[0] for s in c})


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_log_probabilities_are_the_models(lm, request):
    """Each row's log-probability is the sum of log-softmax(logits) of its tokens in a plain forward pass over
    prompt + tokens (temperature 1, whatever the sampling temperature), up to and including its stop token."""
    loaded = request.getfixturevalue(lm)
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=0)
    ids, mask = _padded_batch(loaded, gen)
    torch.manual_seed(0)
    free = evaluate.decode_static(replace(loaded, stop_ids=[-1]), ids, mask, gen, graph=False)
    stop = free[0][0][3]  # a token row 0 draws mid-way: as the stop token, rows end at different places
    stopping = replace(loaded, stop_ids=[stop])
    torch.manual_seed(0)
    rows = evaluate.decode_static(stopping, ids, mask, gen, graph=False)
    assert [t for t, _ in rows] == [t for t, _ in free]  # the same draws; only where the sums end differs
    torch.manual_seed(0)  # without log-probabilities (greedy evals): the same tokens, None for the sums
    assert evaluate.decode_static(stopping, ids, mask, gen, graph=False, logprobs=False) == [(t, None) for t, _ in rows]
    ended = 0
    for prompt, m, (tokens, logprob) in zip(ids, mask, rows):
        kept = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
        ended += len(kept) < len(tokens)
        seq = torch.tensor([prompt[m.bool()].tolist() + kept])
        with torch.no_grad():
            logp = loaded.model(seq).logits[0, :-1].float().log_softmax(-1)
        n = len(kept)
        want = logp[-n:].gather(-1, seq[0, -n:, None]).sum().item()
        assert logprob == pytest.approx(want, abs=1e-3)
    assert ended >= 1


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_prefills_each_prompt_once_for_its_copies(lm, request):
    """MBR's candidates prefill each prompt once and copy its cache: the same tokens and log-probabilities as
    prefilling every copy of the prompt as a row of its own (same seed)."""
    loaded = replace(request.getfixturevalue(lm), stop_ids=[-1])
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0)
    ids, mask = _padded_batch(loaded, gen)
    torch.manual_seed(5)
    shared = evaluate.decode_static(loaded, ids, mask, gen, graph=False, copies=3)
    torch.manual_seed(5)
    repeated = evaluate.decode_static(loaded, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), gen,
                                      graph=False)
    assert [t for t, _ in shared] == [t for t, _ in repeated]
    assert [lp for _, lp in shared] == pytest.approx([lp for _, lp in repeated], abs=1e-4)
    assert len({tuple(t) for t, _ in shared[:3]}) > 1  # the copies are separate draws


def test_saved_candidates_keep_log_probabilities_only_when_every_one_has_them():
    g = evaluate.Generated("b", "b", 1, False, False, False, candidates=("a", "b"), candidate_logprobs=(-1.23456, -0.5),
                           candidate_tokens=(2, 1))
    assert evaluate._saved_candidates(g) == {"candidates": ["a", "b"], "candidate_logprobs": [-1.2346, -0.5],
                                             "candidate_new_tokens": [2, 1]}
    assert evaluate._saved_candidates(replace(g, candidate_logprobs=(None, None))) == {"candidates": ["a", "b"]}


def test_graph_decoding_applies_only_to_plain_greedy_and_sampling(random_lm):
    from transformers import StaticCache

    if not hasattr(StaticCache(config=random_lm.model.config, max_cache_len=8).layers[0], "cumulative_length"):
        pytest.skip("this transformers' static cache has no GPU-side length counter: generate serves everything")
    for settings in ({}, {"do_sample": True}, {"do_sample": True, "mbr_candidates": 8}):
        assert evaluate.graph_decoding_applies(random_lm, GenerationConfig(**settings))
    for change in ({"num_beams": 2}, {"do_sample": True, "num_beams": 2}, {"repetition_penalty": 1.2},
                   {"no_repeat_ngram_size": 3}, {"cuda_graph": False}, {"cache": "static"}, {"mbr_candidates": 4},
                   {"do_sample": True, "repetition_penalty": 1.2}):
        assert not evaluate.graph_decoding_applies(random_lm, GenerationConfig(**change))
    # Sliding-window attention keeps fewer cache columns than the loop's masks: left to generate.


    from transformers import MistralConfig, MistralForCausalLM, PhiForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    assert not evaluate.graph_decoding_applies(replace(random_lm, model=sliding), GenerationConfig())
    # Flash-attention reads a 4D mask as a 2D padding mask: left to generate.
    flash = PhiForCausalLM(copy.deepcopy(random_lm.model.config))  # the fixture's own config stays as it is
    flash.config._attn_implementation = "flash_attention_2"
    assert not evaluate.graph_decoding_applies(replace(random_lm, model=flash), GenerationConfig())


def test_lcs_length_matches_rouge_scores_table():
    from rouge_score import rouge_scorer

    rng = np.random.default_rng(1)
    for _ in range(500):  # few distinct tokens: many repeats and many equal-length alternatives
        a, b = (tuple(rng.choice(list("abcde"), size=rng.integers(0, 20))) for _ in range(2))
        want = rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0
        assert evaluate._lcs_length(a, b) == want == evaluate._lcs_length(b, a)


def test_lcs_lengths_of_every_pair_match_rouge_scores_table():
    """mbr_pick's LCS matrix: one uint64 lane per pair, around 64 tokens the lane's edge (a carry past bit 63),
    and pairs of two longer texts through _lcs_length."""
    from rouge_score import rouge_scorer

    rng = np.random.default_rng(2)
    for _ in range(20):  # few distinct tokens, so long texts share long subsequences
        seqs = [list(rng.integers(0, 5, size=n)) for n in rng.choice([0, 1, 7, 30, 63, 64, 65, 90, 130], size=6)]
        got = evaluate.lcs_lengths(seqs, 5)
        for i, a in enumerate(seqs):
            for j, b in enumerate(seqs):
                assert got[i, j] == (rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0), (len(a), len(b))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (0.0, 1.0, 2.0)])
def test_mbr_pick_weighs_the_three_rouges_as_asked(weights):
    """bench/mbr_pool.py's other utilities: the weighted mean against rouge-score's scorer over every pair."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rng = np.random.default_rng(1)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()
    for _ in range(40):
        texts = [" ".join(rng.choice(vocab, size=rng.integers(1, 10))) for _ in range(rng.integers(3, 7))]

        def utility(o, t):
            sc = scorer.score(o, t)
            return sum(w * sc[m].fmeasure for w, m in zip(weights, ("rouge1", "rouge2", "rougeL"))) / sum(weights)

        support = [np.mean([utility(o, t) for j, o in enumerate(texts) if j != i]) for i, t in enumerate(texts)]
        pick = evaluate.mbr_pick(texts, weights)
        assert pick == [i for i, x in enumerate(support) if x >= max(support) - 1e-9][0]
    for bad in ((0.0, 0.0, 0.0), (1.0, 1.0, -3.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="weights"):
            evaluate.mbr_pick(["a b", "a c"], bad)


def test_mbr_pick_is_the_candidate_with_the_highest_mean_rouge_against_the_others():
    """mbr_pick's shortcuts (distinct texts once, weighted by copies; symmetric pairs) against rouge-score's
    public scorer over every pair."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rng = np.random.default_rng(0)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()
    for trial in range(60):
        # Lengths from 0 (and punctuation only) up: an empty or one-word text scores itself below 1.
        texts = [" ".join(rng.choice(vocab, size=rng.integers(0, 12))) or rng.choice(["", "..."])
                 for _ in range(rng.integers(2, 7))]
        if trial % 2:  # samples repeat: draw the candidates from a few texts, copies included
            texts = list(rng.choice(texts, size=rng.integers(2, 10)))
        support = [np.mean([np.mean([v.fmeasure for v in scorer.score(o, t).values()])
                            for j, o in enumerate(texts) if j != i]) for i, t in enumerate(texts)]
        pick = evaluate.mbr_pick(texts)
        best = [i for i, x in enumerate(support) if x >= max(support) - 1e-9]  # sums in another order: ulp ties
        assert pick == best[0]
    # Copies' self-scores decide these: one word scores itself 2/3 (no bigram), an empty text 0.
    assert evaluate.mbr_pick(["a", "a", "a b", "b"]) == 2
    assert evaluate.mbr_pick(["", "", "a b", "a b c"]) == 2
    # An exact tie whose two sums differ in the last bit: the earlier candidate wins.
    assert evaluate.mbr_pick(["and the early", "Tom", "for Tom will will will", "the call is", "Mary bus"]) == 0
    consensus = ["Tom is late for the meeting.", "Tom will be late for the meeting.",
                 "Mary calls Tom.", "Tom is late for the meeting again."]
    assert evaluate.mbr_pick(consensus) == 0
    assert evaluate.mbr_pick(["same words", "same words"]) == 0  # a tie keeps the better-ranked candidate


def adversarial_candidates(rng: np.random.Generator) -> list[str]:
    """Candidates that hit every special case of mbr_pick's matrices: copies, empty and punctuation-only texts,
    one word (no bigram), n-grams repeated within a text, and near-copies of texts around and past 64 tokens."""
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()

    def text(low, high):
        return " ".join(rng.choice(vocab, size=rng.integers(low, high)))

    long = text(60, 100).split()
    near = [" ".join(long[:i] + long[i + 1 :]) for i in rng.integers(0, len(long), size=2)]  # one word dropped
    pool = [text(2, 12) for _ in range(4)] + [" ".join(long), *near, "", "...", rng.choice(vocab),
                                               " ".join([text(1, 3)] * rng.integers(2, 5))]
    return list(rng.choice(pool, size=rng.integers(3, 14)))


def brute_force_pick(texts: list[str], weights, score, copies_once=False, with_self=False) -> int:
    """The definition: the highest mean weighted ROUGE against all the other candidates (score(other, text) from
    rouge-score), ties to the earliest; copies_once and with_self are the two ways to get the copies wrong."""
    def utility(other, t):
        return sum(w * s.fmeasure for w, s in zip(weights, score(other, t))) / sum(weights)

    others = [list(dict.fromkeys(o for o in texts if o != t)) if copies_once else
              [o for j, o in enumerate(texts) if j != i or with_self] for i, t in enumerate(texts)]
    support = [np.mean([utility(o, t) for o in os]) if os else 0.0 for t, os in zip(texts, others)]
    return [i for i, x in enumerate(support) if x >= max(support) - 1e-9][0]


def test_mbr_pick_matches_rouge_score_on_adversarial_candidates():
    """Every pair's ROUGE-1/2/L F1 is rouge-score's to the bit, and every utility of bench/mbr_pool.py picks
    what rouge-score over all pairs picks. The data makes copies, the self pair and long texts matter: each way
    of getting them wrong changes some picks."""
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    cache: dict = {}

    def score(target, prediction):
        if (target, prediction) not in cache:
            cache[target, prediction] = tuple(scorer.score(target, prediction).values())
        return cache[target, prediction]

    def long_pairs_unscored(target, prediction):  # what a broken fallback for two texts over 64 tokens would give
        r1, r2, rl = score(target, prediction)
        tokens = map(evaluate._rouge_tokenize, (target, prediction))
        return (r1, r2, scoring.Score(0, 0, 0)) if min(map(len, tokens)) > 64 else (r1, r2, rl)

    utilities = load_bench("mbr_pool").UTILITIES
    rng = np.random.default_rng(3)
    wrong = {"copies_once": 0, "with_self": 0, "long_pairs": 0}
    for _ in range(40):
        texts = adversarial_candidates(rng)
        distinct = list(dict.fromkeys(texts))
        tokens = [evaluate._rouge_tokenize(t) for t in distinct]
        f1 = evaluate.pair_f1(np.array([len(t) for t in tokens]), *evaluate.pair_overlaps(tokens))
        for a, target in enumerate(distinct):
            for b, prediction in enumerate(distinct):
                assert tuple(f1[:, a, b]) == tuple(s.fmeasure for s in score(target, prediction))
        for weights in utilities.values():
            want = brute_force_pick(texts, weights, score)
            assert evaluate.mbr_pick(texts, weights) == want, (texts, weights)
            wrong["copies_once"] += brute_force_pick(texts, weights, score, copies_once=True) != want
            wrong["with_self"] += brute_force_pick(texts, weights, score, with_self=True) != want
            wrong["long_pairs"] += brute_force_pick(texts, weights, long_pairs_unscored) != want
    assert all(wrong.values()), wrong


@pytest.mark.parametrize("sample", [False, True])
def test_mbr_generation_returns_the_consensus_candidate(random_lm, sample):
    """With mbr_candidates, each dialogue's summary is the candidate mbr_pick chooses among the N that
    transformers' generate returns for it (beams, or seeded samples), batched as usual."""
    n = 4
    gen = GenerationConfig(max_new_tokens=8, mbr_candidates=n, batch_size=3, do_sample=sample, temperature=1.5)
    state = torch.random.get_rng_state()
    picked = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, gen)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    torch.manual_seed(gen.seed)  # generate seeds sampling: the same batches in the same order draw the same samples
    every = [data_mod.fit_prompt(random_lm.tokenizer, d, random_lm.fmt, INSTRUCTION, gen.max_input_tokens)[0]
             for d in DIALOGUES]
    order = sorted(range(len(DIALOGUES)), key=lambda i: -len(every[i]))
    want = {}
    for idx in evaluate.plan_batches([0] * len(order), order, gen):
        prompts = [every[i] for i in idx]
        for i, prompt, candidates in zip(idx, prompts, evaluate._generate_padded(random_lm, prompts, gen)):
            assert len(candidates) == n
            assert all(logprob is None for _, logprob in candidates)  # generate decoded these
            candidates = [c for c, _ in candidates]
            texts = [evaluate._finish(random_lm, c, False).text for c in candidates]
            want[i] = texts[evaluate.mbr_pick(texts)]
            assert picked[i].candidates == tuple(texts)  # every candidate kept, in generation order
            if not sample:  # distinct beams, and each prompt's own: the same as decoding that prompt alone
                assert len(set(map(tuple, candidates))) == n
                alone = random_lm.model.generate(torch.tensor([prompt]), num_beams=n, num_return_sequences=n,
                                                 max_new_tokens=8, do_sample=False, eos_token_id=random_lm.stop_ids,
                                                 pad_token_id=random_lm.tokenizer.pad_token_id)
                assert [row[len(prompt):] for row in alone.tolist()] == candidates
    assert [g.text for g in picked] == [want[i] for i in range(len(DIALOGUES))]
    if sample:
        assert len({g.text for g in picked}) > 1


# ----------------------------------------------------------------------------------------------------
# bench/mbr_pool.py: MBR over the candidates of several models pooled


def load_bench(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its worker function must pickle for multiprocessing
    spec.loader.exec_module(module)
    return module


def pool_evals(tmp_path: Path, models=("a", "b", "c"), dialogues=4, n=6) -> list[str]:
    """Hand-made evals of the same 4 dialogues: each model's own candidates, with copies within and across models,
    an empty and a one-word text, and texts over 64 tokens; each prediction is that model's mbr_pick."""
    rng = np.random.default_rng(7)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()

    def text(low, high):
        return " ".join(rng.choice(vocab, size=rng.integers(low, high)))

    refs = [[text(4, 10) for _ in range(rng.integers(1, 4))] for _ in range(dialogues)]
    shared = [text(3, 9) for _ in range(dialogues)]  # one text every model samples
    specs = []
    for m, name in enumerate(models):
        rows = []
        for d in range(dialogues):
            cands = [text(2, 10) for _ in range(n)]
            cands[(m + d) % n] = shared[d]
            cands[n - 1 - m] = cands[(m + d) % n] if d % 2 else cands[n - 1 - m]  # a copy within the model
            if d == 1:
                cands[m % 3], cands[3] = "", "Tom"
            if d == 2:
                cands[1], cands[4] = text(66, 80), text(66, 80)
            rows.append({"id": f"d{d}", "dialogue": "...", "references": refs[d], "candidates": cands,
                         "prediction": cands[evaluate.mbr_pick(cands)]})
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "metrics.json").write_text(json.dumps({"use_stemmer": True}))
        specs.append(f"{name}={tmp_path / name / 'predictions.jsonl'}")
    return specs


def pooled_picks(bench, specs: list[str], ks: list[int], cache: Path):
    names, files, stem = bench.read_models(specs)
    sizes = [len(rows[0]["candidates"]) for rows in files]
    pools = [[t for rows in files for t in rows[d]["candidates"]] for d in range(len(files[0]))]
    ids = []
    for pool in pools:
        which = {t: i for i, t in enumerate(dict.fromkeys(pool))}
        ids.append(np.array([which[t] for t in pool]))
    counts = bench.score_pairs(pools, [r["references"] for r in files[0]], stem, 1, cache, "test")
    counts["starts"] = np.cumsum([0, *counts["m"][:-1]])
    counts["tri_starts"] = np.cumsum([0, *(counts["m"][:-1] * (counts["m"][:-1] + 1) // 2)])
    return files, pools, bench.choose(counts, ids, sizes, ks)


def test_mbr_pool_picks_are_mbr_pick_over_the_pooled_first_k(tmp_path):
    """Every (set of models, k, utility) pick is evaluate.mbr_pick over the concatenated first k candidates of each
    model with those weights, and the data makes k and the weights matter."""
    bench = load_bench("mbr_pool")
    specs = pool_evals(tmp_path)
    files, pools, picks = pooled_picks(bench, specs, [2, 4, 6], tmp_path / "cache.npz")
    assert any(len(evaluate._rouge_tokenize(t)) > 64 for t in pools[2])  # the pairs past one uint64 row
    want = {}
    for models in [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
        for k in (2, 4, 6):
            for name, weights in bench.UTILITIES.items():
                want[models, k, name] = []
                for d, pool in enumerate(pools):
                    texts = [t for i in models for t in files[i][d]["candidates"][:k]]
                    want[models, k, name].append(texts[evaluate.mbr_pick(texts, weights)])
                    assert pool[picks[models, k, name][d]] == want[models, k, name][-1], (models, k, name, d)
    assert {key[:3] for key in picks} == set(want) | {(m, 6, "oracle") for m, _, _ in want}
    # Were k or the weights ignored, some of these picks would be others.
    assert any(want[m, 2, u] != want[m, 6, u] for m, _, u in want)
    assert any(want[m, k, u] != want[m, k, "R1+R2+RL"] for m, k, u in want)
    assert any(want[(0, 1, 2), 6, u] != want[(0,), 6, u] for u in bench.UTILITIES)
    assert [len(s) for s in (bench.model_sets(3), bench.model_sets(4), bench.model_sets(5))] == [7, 15, 11]
    assert bench.model_sets(5)[5:7] == [(0, 1, 2, 3, 4), (1, 2, 3, 4)]  # with 5: each alone, all, all but one


def test_mbr_pool_oracle_is_the_best_candidate_against_the_references(tmp_path):
    from rouge_score import rouge_scorer

    bench = load_bench("mbr_pool")
    files, pools, picks = pooled_picks(bench, pool_evals(tmp_path), [6], tmp_path / "cache.npz")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def mean3(text, references):
        return np.mean([np.mean([s.fmeasure for s in scorer.score(ref, text).values()]) for ref in references])

    for models in [(0,), (0, 2), (0, 1, 2)]:
        for d, pool in enumerate(pools):
            refs = files[0][d]["references"]
            best = max(mean3(t, refs) for i in models for t in files[i][d]["candidates"])
            assert mean3(pool[picks[models, 6, "oracle"][d]], refs) == pytest.approx(best, abs=1e-12)


def test_mbr_pool_reproduces_each_eval_caches_and_flags_doctored_predictions(tmp_path, capsys):
    bench = load_bench("mbr_pool")
    specs = pool_evals(tmp_path)
    out = tmp_path / "out"
    bench.main(["--out", str(out), "--label", "val", "--ks", "2,6", "--workers", "2", "--samples", "50", *specs])
    assert "scoring 4 dialogues" in capsys.readouterr().out
    res = json.loads((out / "mbr_pool_val.json").read_text())
    assert res["mismatches"] == {"a": 0, "b": 0, "c": 0} and res["baseline"] == {"models": ["a"], "k": 6,
                                                                                 "utility": "R1+R2+RL"}
    rows = read_jsonl(tmp_path / "a" / "predictions.jsonl")
    shipped = evaluate.rouge([r["prediction"] for r in rows], [r["references"] for r in rows]).pairs
    base = next(v for v in res["variants"] if v["models"] == ["a"] and v["k"] == 6 and v["utility"] == "R1+R2+RL")
    assert base["rouge2"] == pytest.approx(shipped["rouge2"], abs=1e-12) and base["vs_baseline"]["mean"] == 0
    assert len(res["variants"]) == 7 * 2 * 5 + 7  # 7 sets of models x 2 ks x 5 utilities, and 7 oracles
    assert (out / "mbr_pool_val.md").read_text().count("oracle (uses the references)") == 7
    bench.main(["--out", str(out), "--label", "val", "--ks", "4", "--workers", "1", "--samples", "50", *specs])
    assert "pair scores from" in capsys.readouterr().out  # other --ks: the cached pairs
    # Gzipped predictions (as committed) read the same.
    import gzip

    packed = tmp_path / "a" / "predictions.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "a" / "predictions.jsonl").read_bytes()))
    bench.main(["--out", str(out), "--label", "gz", "--ks", "2,6", "--workers", "1", "--samples", "50",
                f"a={packed}", *specs[1:]])
    assert json.loads((out / "mbr_pool_gz.json").read_text())["variants"] == res["variants"]
    doctored = read_jsonl(tmp_path / "b" / "predictions.jsonl")
    doctored[2]["prediction"] = next(c for c in doctored[2]["candidates"] if c != doctored[2]["prediction"])
    (tmp_path / "b" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doctored))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(out), "--label", "val", "--ks", "4", "--workers", "1", "--samples", "50", *specs])
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and "scoring 4 dialogues" in captured.out  # another file: scored again
    assert "b: 1 of 4 differ" in captured.err
    assert json.loads((out / "mbr_pool_val.json").read_text())["mismatches"] == {"a": 0, "b": 1, "c": 0}


@pytest.mark.parametrize("damage", ["ids", "order", "references", "candidates", "gzip", "utf-8"])
def test_mbr_pool_refuses_evals_of_different_dialogues_in_one_line(tmp_path, capsys, damage):
    bench = load_bench("mbr_pool")
    specs = pool_evals(tmp_path)
    rows = read_jsonl(tmp_path / "c" / "predictions.jsonl")
    if damage in ("gzip", "utf-8"):  # a cut-off download, a file in another encoding
        broken = tmp_path / "c" / ("predictions.jsonl.gz" if damage == "gzip" else "predictions.jsonl")
        broken.write_bytes(b"\x1f\x8b\x08\x00cut" if damage == "gzip" else b'{"id": "caf\xe9"}\n')
        specs = [s if not s.startswith("c=") else f"c={broken}" for s in specs]
    elif damage == "ids":
        rows[1]["id"] = "other"
    elif damage == "order":
        rows[0], rows[1] = rows[1], rows[0]
    elif damage == "references":
        rows[3]["references"] = ["another summary"]
    else:
        del rows[0]["candidates"]
    if damage not in ("gzip", "utf-8"):
        (tmp_path / "c" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(tmp_path / "out"), "--label", "val", "--workers", "1", *specs])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: c")
    assert not (tmp_path / "out").exists()


def test_popcount_without_numpy_2_counts_the_same_bits(monkeypatch):
    words = np.random.default_rng(0).integers(0, 2**63, size=(5, 7), dtype=np.uint64) | np.uint64(1 << 63)
    want = np.array([[bin(int(w)).count("1") for w in row] for row in words])
    assert (evaluate._popcount(words) == want).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert (evaluate._popcount(words) == want).all()


def test_mbr_pick_with_evidence_scores_every_candidate_against_every_evidence_text():
    """generation.mbr_evidence: each candidate's support is its weighted ROUGE F1 summed over all evidence texts
    (copies count, an identical text counts too), by rouge-score; ties to the earlier candidate."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rng = np.random.default_rng(7)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()
    differs = 0
    for _ in range(60):
        texts = [" ".join(rng.choice(vocab, size=rng.integers(1, 9))) for _ in range(rng.integers(2, 6))]
        evidence = [" ".join(rng.choice(vocab, size=rng.integers(1, 9))) for _ in range(rng.integers(1, 6))]
        evidence += list(rng.choice(texts, size=rng.integers(0, 3)))  # some evidence equals a candidate
        for weights in ((1.0, 1.0, 1.0), (0.0, 1.0, 0.0)):
            def support(t):
                return sum(sum(w * s.fmeasure for w, s in zip(weights, scorer.score(e, t).values())) for e in evidence)

            values = [support(t) for t in texts]
            want = next(i for i, v in enumerate(values) if v >= max(values) - 1e-9)
            assert evaluate.mbr_pick(texts, weights, evidence=evidence) == want
        differs += evaluate.mbr_pick(texts, evidence=evidence) != evaluate.mbr_pick(texts)
    assert differs > 5  # the evidence, not the candidates, decided
    with pytest.raises(ValueError, match="at least one text"):
        evaluate.mbr_pick(["a", "b"], evidence=[])


def test_generate_samples_evidence_at_its_own_temperature(random_lm, monkeypatch):
    """Candidates at generation.temperature, evidence (mbr_evidence samples) at mbr_evidence_temperature, same
    batches; each summary is mbr_pick's choice of its candidates against its evidence."""
    seen = []
    real = evaluate._generate_padded

    def spy(loaded, prompts, gen):
        seen.append((len(prompts), gen.temperature, gen.mbr_candidates))
        return real(loaded, prompts, gen)

    monkeypatch.setattr(evaluate, "_generate_padded", spy)
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.5, mbr_candidates=4, mbr_evidence=3,
                           mbr_evidence_temperature=1.5, batch_size=3)
    out = evaluate.generate(random_lm, DIALOGUES, INSTRUCTION, gen)
    assert seen[:2] == [(3, 0.5, 4), (3, 1.5, 3)] and len(seen) == 2 * -(-len(DIALOGUES) // 3)
    for g in out:
        assert len(g.candidates) == 4 and len(g.evidence) == 3
        assert g.text == g.candidates[evaluate.mbr_pick(list(g.candidates), evidence=g.evidence)]
    assert GenerationConfig(mbr_candidates=4, mbr_evidence=8).sequences_per_dialogue == 8  # batches fit either


def write_eval(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.json").write_text(json.dumps({"split": "test", "use_stemmer": True,
                                                   "generation": {"max_new_tokens": 96}}))
    return path / "predictions.jsonl"


def test_mbr_evidence_bench_reselects_as_eval_would_and_checks_its_inputs(tmp_path, capsys):
    bench = load_bench("mbr_evidence")
    rng = np.random.default_rng(4)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()
    cands, evid = [], []
    for i in range(10):
        refs = [" ".join(rng.choice(vocab, size=rng.integers(3, 9))) for _ in range(2)]
        c = [" ".join(rng.choice(vocab, size=rng.integers(2, 9))) for _ in range(6)]
        e = [" ".join(rng.choice(vocab, size=rng.integers(2, 9))) for _ in range(5)]
        cands.append({"id": f"d{i}", "references": refs, "candidates": c, "prediction": c[evaluate.mbr_pick(c)],
                      "candidate_new_tokens": [5] * 6})
        evid.append({"id": f"d{i}", "references": refs, "candidates": e, "prediction": e[evaluate.mbr_pick(e)]})
    a, b = write_eval(tmp_path / "a", cands), write_eval(tmp_path / "b", evid)
    out = tmp_path / "out"
    bench.main([str(a), str(b), "--out", str(out), "--ks", "3,6", "--js", "2,5", "--write", "6,5", "--samples", "50"])
    res = json.loads((out / "mbr_evidence.json").read_text())
    assert res["own_predictions_given_back"] == 10
    v = {(x["k"], x["j"]): x for x in res["variants"]}
    refs = [r["references"] for r in cands]
    for k, j in ((3, 2), (6, 5)):
        picks = [r["candidates"][:k][evaluate.mbr_pick(r["candidates"][:k], evidence=e["candidates"][:j])]
                 for r, e in zip(cands, evid)]
        assert v[k, j]["rouge2"] == pytest.approx(evaluate.rouge(picks, refs).pairs["rouge2"], abs=1e-12)
    written = read_jsonl(out / "predictions.jsonl")
    assert [r["prediction"] for r in written] == picks and all(len(r["evidence"]) == 5 for r in written)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["fine-tuned"]["rougeL"]["mean"] == pytest.approx(v[6, 5]["rougeL"], abs=1e-12)
    assert metrics["generation"]["mbr_evidence"] == 5 and metrics["models"]["fine-tuned"]["hit_max_new_tokens_share"] == 0
    # A doctored prediction is caught; files of other dialogues and asking for too many are one-line errors.
    cands[2]["prediction"] = cands[2]["candidates"][evaluate.mbr_pick(cands[2]["candidates"]) - 1]
    write_eval(tmp_path / "a", cands)
    with pytest.raises(SystemExit) as e:
        bench.main([str(a), str(b), "--out", str(out)] + ["--ks", "6", "--js", "5", "--samples", "20"])
    assert e.value.code == 1 and "did not give back 1" in capsys.readouterr().err
    for argv, message in (([str(a), str(tmp_path / "none.jsonl")], "no such file"),
                          ([str(a), str(b), "--ks", "7"], "hold 6 candidates and 5 evidence"),
                          ([str(a), str(write_eval(tmp_path / "c", evid[:9]))], "not evals of the same dialogues"),
                          ([str(a), str(b), "--js", "x"], "--js: give counts")):
        with pytest.raises(SystemExit) as e:
            bench.main([*argv, "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    # One file, as a one-call eval with generation.mbr_evidence writes it: the evidence is each row's saved
    # `evidence`, and the full k x j must give back its predictions (the own rule need not).
    one = [{**r, "evidence": e["candidates"]} for r, e in zip(cands, evid)]
    for r in one:
        r["prediction"] = r["candidates"][evaluate.mbr_pick(r["candidates"], evidence=r["evidence"])]
    single = write_eval(tmp_path / "one", one)
    bench.main([str(single), "--out", str(tmp_path / "out1"), "--ks", "6", "--js", "2,5", "--samples", "20"])
    res = json.loads((tmp_path / "out1" / "mbr_evidence.json").read_text())
    assert res["own_predictions_given_back"] == 10
    full = {(x["k"], x["j"]): x for x in res["variants"]}
    assert full[6, 5]["rouge2"] == pytest.approx(v[6, 5]["rouge2"], abs=1e-12)
    two = [r["candidates"][evaluate.mbr_pick(r["candidates"], evidence=r["evidence"][:2])] for r in one]
    assert full[6, 2]["rouge2"] == pytest.approx(evaluate.rouge(two, refs).pairs["rouge2"], abs=1e-12)
    bench.main([str(single), "--out", str(tmp_path / "out1"), "--ks", "6", "--js", "2", "--write", "6,2",
                "--samples", "20"])
    assert [r["prediction"] for r in read_jsonl(tmp_path / "out1" / "predictions.jsonl")] == two
    assert "its saved evidence" in json.loads((tmp_path / "out1" / "metrics.json").read_text())["selection"]
    one[4]["prediction"] = one[4]["candidates"][evaluate.mbr_pick(one[4]["candidates"], evidence=one[4]["evidence"])
                                                - 1]
    write_eval(tmp_path / "one", one)
    with pytest.raises(SystemExit) as e:
        bench.main([str(single), "--out", str(tmp_path / "out1"), "--ks", "6", "--js", "5", "--samples", "20"])
    assert e.value.code == 1 and "against the saved evidence did not give back 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main([str(a), "--out", str(out)])
    assert e.value.code == 2 and "rows without evidence" in capsys.readouterr().err


def test_mbr_logprob_bench_weighs_the_models_probability(tmp_path, capsys):
    """w = 0 is mbr_pick (and must give back the eval's predictions); a large weight picks the most probable
    candidate (per token, or summed); an eval without log-probabilities is a one-line error."""
    bench = load_bench("mbr_logprob")
    rng = np.random.default_rng(6)
    vocab = "Tom Mary is are late early for the meeting train bus and will call again".split()
    rows = []
    for i in range(8):
        c = [" ".join(rng.choice(vocab, size=rng.integers(2, 9))) for _ in range(5)]
        rows.append({"id": f"d{i}", "references": [" ".join(rng.choice(vocab, size=6))], "candidates": c,
                     "prediction": c[evaluate.mbr_pick(c)], "candidate_logprobs": list(-rng.uniform(1, 30, size=5)),
                     "candidate_new_tokens": [int(x) for x in rng.integers(2, 20, size=5)]})
    path = write_eval(tmp_path / "val", rows)
    out = tmp_path / "out"
    bench.main([str(path), "--out", str(out), "--weights", "1000", "--sum-weights", "1000", "--samples", "20"])
    res = json.loads((out / "mbr_logprob_val.json").read_text())
    assert res["own_predictions_given_back"] == 8
    refs = [r["references"] for r in rows]
    for v in res["variants"]:
        if v["log_probability"] == "none":
            want = [r["prediction"] for r in rows]
        else:
            per_token = v["log_probability"] == "per token"
            want = [r["candidates"][int(np.argmax([lp / (n + 1) if per_token else lp for lp, n in
                                                   zip(r["candidate_logprobs"], r["candidate_new_tokens"])]))]
                    for r in rows]
        assert v["rouge1"] == pytest.approx(evaluate.rouge(want, refs).pairs["rouge1"], abs=1e-12)
    for r in rows:
        del r["candidate_logprobs"]
    write_eval(tmp_path / "val", rows)
    with pytest.raises(SystemExit) as e:
        bench.main([str(path), "--out", str(out)])
    assert e.value.code == 2 and "no candidate_logprobs" in capsys.readouterr().err
