"""ROUGE the standard way (rouge-score itself is the reference), bootstrap intervals, and `phi2sum eval` on the
shared tiny run: the table, predictions and metrics it writes, where it writes them, and the adapters and run
folders it refuses in one line."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import EOS, INSTRUCTION, SLICE, build_tiny_model, error_lines, read_jsonl, tiny_config_dict
from phi2sum import evaluate, runs
from phi2sum.cli import app
from phi2sum.config import RunConfig
from phi2sum.generate import Generated, generate, load_for_inference
from phi2sum.mbr import mbr_pick

runner = CliRunner()


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
    rows = read_jsonl(SLICE / "test.jsonl")
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


def test_eval_verb_writes_table_predictions_and_metrics(trained_run, tmp_path):
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(trained_run), "--limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for word in ("rouge1", "rouge2", "rougeL", "rougeLsum", "base", "fine-tuned", "difference"):
        assert word in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_dialogues"], metrics["n_pairs"], metrics["use_stemmer"]) == (3, 9, True)
    assert metrics["generation"]["max_new_tokens"] == 12 and metrics["generation"]["num_beams"] == 1
    assert metrics["stop_tokens"] == [EOS] and metrics["prompt_format"] == "plain"
    assert metrics["adapter"] == str(trained_run) and metrics["device"] == "cpu"
    refs = [r["summaries"] for r in read_jsonl(SLICE / "test.jsonl")[:3]]
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
    assert not (trained_run / "eval").exists()  # --out: nothing written into the run


def test_eval_compare_none_limit_beyond_the_split_and_the_default_folder(run_copy):
    """--compare none scores only the fine-tuned model; a --limit above the split's size means all of it.
    Without --out, results go to <run>/eval, where push looks for them."""
    result = runner.invoke(app, ["eval", "--adapter", str(run_copy), "--compare", "none", "--limit", "100"])
    assert result.exit_code == 0, result.output
    out = run_copy / "eval"
    assert out == runs.eval_dir(run_copy, RunConfig())
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["fine-tuned"]
    assert metrics["n_dialogues"] == 6  # data.max_rows.test in the tiny config
    assert len(read_jsonl(out / "predictions.jsonl")) == 6
    assert not (out / "predictions_base.jsonl").exists()
    assert "fine-tuned" in result.output and "difference" not in result.output


def test_mbr_eval_saves_candidates_that_rescoring_turns_back_into_its_predictions(trained_run, tmp_path):
    """With generation.mbr_candidates and eval.save_candidates, predictions.jsonl keeps every candidate (and
    with mbr_evidence the evidence), and mbr_pick over them gives back each prediction: a study of other
    selection rules can start from the file alone."""
    out = tmp_path / "scores"
    mbr = ["--adapter", str(trained_run), "--compare", "none", "--out", str(out),
           "--set", "generation.mbr_candidates=6", "--set", "generation.do_sample=true",
           "--set", "generation.temperature=1.5"]
    result = runner.invoke(app, ["eval", *mbr])
    assert result.exit_code == 0, result.output
    assert not any("candidates" in r for r in read_jsonl(out / "predictions.jsonl"))  # opt-in: MB per eval
    result = runner.invoke(app, ["eval", *mbr, "--set", "eval.save_candidates=true"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(len(r["candidates"]) == 6 and r["prediction"] == r["candidates"][mbr_pick(r["candidates"])]
               for r in rows)
    assert any(len(set(r["candidates"])) > 1 for r in rows)  # sampled: the choice is a real one
    assert not any("candidate_logprobs" in r for r in rows)  # transformers' generate decoded (CPU): none known

    result = runner.invoke(app, ["eval", *mbr, "--set", "eval.save_candidates=true",
                                 "--set", "generation.mbr_evidence=5", "--set", "generation.mbr_evidence_temperature=2.0"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(len(r["candidates"]) == 6 and len(r["evidence"]) == 5 for r in rows)
    assert all(r["prediction"] == r["candidates"][mbr_pick(r["candidates"], evidence=r["evidence"])] for r in rows)
    assert json.loads((out / "metrics.json").read_text())["generation"]["mbr_evidence"] == 5


def test_saved_candidates_keep_log_probabilities_only_when_every_one_has_them():
    g = Generated("b", "b", 1, False, False, False, candidates=("a", "b"), candidate_logprobs=(-1.23456, -0.5),
                  candidate_tokens=(2, 1))
    assert evaluate._saved_candidates(g) == {"candidates": ["a", "b"], "candidate_logprobs": [-1.2346, -0.5],
                                             "candidate_new_tokens": [2, 1]}
    assert evaluate._saved_candidates(replace(g, candidate_logprobs=(None, None))) == {"candidates": ["a", "b"]}


def test_eval_bare_adapter_reads_its_base_from_adapter_config(trained_run, tiny_model, tmp_path):
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained_run / name, bare / name)
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(bare), "--limit", "2", "--compare", "none",
                                 "--out", str(out), "--set", f"data.source={SLICE}", "--set", "generation.device=cpu",
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


def test_eval_refuses_a_run_whose_config_is_incomplete(run_copy, tmp_path):
    """A run's config.yaml cut short (or edited down) would be filled in with defaults that change what is scored
    (the default data source, prompt and decoding): refused, naming the missing sections."""
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({"model": saved["model"], "data": saved["data"]}))
    result = runner.invoke(app, ["eval", "--adapter", str(run_copy), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "is incomplete" in line and "lora" in line and "generation" in line and str(run_copy) in line
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    (run_copy / "config.yaml").write_text("model: [unclosed\n")
    result = runner.invoke(app, ["eval", "--adapter", str(run_copy), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot be read as YAML" in error_lines(result.output)[0]


@pytest.mark.parametrize("args,message", [(["--limit", "0"], "Invalid value for '--limit'"),
                                          (["--set", "eval.limit=0"], "--set: eval.limit: Input should be greater")])
def test_eval_limit_must_be_at_least_one(trained_run, tmp_path, args, message):
    """--limit 0 used to mean "all" by accident; now every limit is 1 or more and omitting it means all."""
    result = runner.invoke(app, ["eval", "--adapter", str(trained_run), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory) -> Path:
    """A tiny model with another hidden size: an adapter from tiny_model does not fit it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi-wide"), hidden_size=64)


def test_eval_adapter_for_another_base_is_one_clear_error(trained_run, tiny_model, wider_model, tmp_path):
    result = runner.invoke(app, ["eval", "--adapter", str(trained_run), "--limit", "1", "--out", str(tmp_path / "x"),
                                 "--set", f"model.name={wider_model}"])
    assert result.exit_code in (1, 2), result.output
    [line] = error_lines(result.output)
    assert f"cannot load the adapter from {trained_run}" in line
    assert f"trained on {tiny_model}, not {wider_model}" in line
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_full_fine_tune_run_evaluates_against_its_base_and_stages_for_the_hub(tiny_model, tmp_path):
    """lora.enabled: false trains every weight; the run holds a whole model that eval, summarize and push
    load as they load an adapter, and --compare base scores the original weights."""
    from safetensors.torch import load_file

    from phi2sum import hub
    from phi2sum.train import train

    cfg = RunConfig.model_validate(tiny_config_dict(tiny_model, tmp_path, lora={"enabled": False},
                                                    train={"max_steps": 3, "learning_rate": 1e-3}))
    train(cfg)
    run = tmp_path / "run"
    assert runs.is_full_model(run) and not (run / "adapter_config.json").exists()
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", "--adapter", str(run), "--limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"fine-tuned", "base"}
    base_rows = read_jsonl(out / "predictions_base.jsonl")
    base_direct = generate(load_for_inference(cfg, None), [r["dialogue"] for r in base_rows], INSTRUCTION,
                           cfg.generation)
    assert [g.text for g in base_direct] == [r["prediction"] for r in base_rows]
    tuned = load_for_inference(cfg, str(run))
    assert tuned.full and not hasattr(tuned.model, "disable_adapter")
    saved = load_file(str(run / "model.safetensors"))  # the trained weights, not the base's, are loaded
    name = "model.layers.0.mlp.fc1.weight"
    assert torch.equal(tuned.model.state_dict()[name], saved[name])
    assert not torch.equal(load_for_inference(cfg, None).model.state_dict()[name], saved[name])
    (tmp_path / "stage").mkdir()
    files = dict(hub.stage(run, cfg, "me/full", tmp_path / "stage", eval_dir=out))
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
    assert "eval/metrics.json" in files
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "library_name: transformers" in card and "PeftModel" not in card
    assert 'AutoModelForCausalLM.from_pretrained("me/full"' in card
    assert "--set model.name=me/full" in card and "--adapter me/full" not in card
    assert "full fine-tune of every weight" in card and "LoRA r=" not in card
    result = runner.invoke(app, ["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "full fine-tune" in result.output


def test_results_table_has_a_difference_column_only_for_two_models():
    def scores(x):
        return {m: {"mean": x, "ci95": [x - 0.01, x + 0.01]} for m in evaluate.METRICS} | {
            "mean_words": 20.0, "reference_mean_words": 19.0, "run_on_share": 0.0, "hit_max_new_tokens_share": 0.5,
            "dialogues_per_second": 3.0}

    metrics = {"split": "test", "n_dialogues": 6, "n_pairs": 18, "use_stemmer": True,
               "models": {"fine-tuned": scores(0.4), "base": scores(0.3)}}
    table = evaluate.results_table(metrics)
    assert [c.header for c in table.columns] == ["metric", "base", "fine-tuned", "difference"]
    assert table.columns[3]._cells[0] == "+0.1000" and table.columns[2]._cells[0] == "0.4000 [0.390, 0.410]"
    del metrics["models"]["base"]
    assert [c.header for c in evaluate.results_table(metrics).columns] == ["metric", "fine-tuned"]
