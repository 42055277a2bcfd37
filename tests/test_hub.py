"""push and merge through the real code: the shared tiny run, the upload sent to a local stand-in for the Hub's
HTTP API (tests/hub_server.py), the model card's metadata and ROUGE table (found where eval wrote them, or
--eval-dir), the merged model checked against base + adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import error_lines, unwrapped
from hub_server import FakeHub
from phi2sum.cli import app
from phi2sum.config import ConfigError, load_config
from phi2sum.hub import push

TOKEN = "hf_standInS3cretT0kenForTests"
METRICS = {
    "split": "test", "n_dialogues": 6, "n_pairs": 18, "protocol": "mean over all dialogue-reference pairs",
    "use_stemmer": True, "bootstrap_samples": 50, "generation": {"max_new_tokens": 12, "num_beams": 1},
    "models": {
        "fine-tuned": {"name": "run", "rouge1": {"mean": 0.41, "ci95": [0.38, 0.44]},
                       "rouge2": {"mean": 0.17, "ci95": [0.15, 0.19]}, "rougeL": {"mean": 0.33, "ci95": [0.31, 0.35]},
                       "rougeLsum": {"mean": 0.34, "ci95": [0.32, 0.36]}, "mean_words": 18.2,
                       "reference_mean_words": 19.0, "run_on_share": 0.0, "hit_max_new_tokens_share": 0.01},
        "base": {"name": "tiny", "rouge1": {"mean": 0.30, "ci95": [0.28, 0.32]},
                 "rouge2": {"mean": 0.09, "ci95": [0.08, 0.10]}, "rougeL": {"mean": 0.22, "ci95": [0.20, 0.24]},
                 "rougeLsum": {"mean": 0.23, "ci95": [0.21, 0.25]}, "mean_words": 35.0,
                 "reference_mean_words": 19.0, "run_on_share": 0.4, "hit_max_new_tokens_share": 0.5},
    },
}
runner = CliRunner()


@pytest.fixture
def run(run_copy) -> Path:
    """A private copy of the shared trained run (tests write eval results into it)."""
    return run_copy


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub, with huggingface_hub pointed at it (the endpoint is read from HF_ENDPOINT at
    import, so the constant is patched) and a made-up token in HF_TOKEN."""
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches it on for everything else
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def _card(folder: Path) -> tuple[dict, str]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_stages_exactly_the_upload(run, tmp_path):
    cfg = load_config(run / "config.yaml")
    out = tmp_path / "staged"
    result = push(run, cfg, "me/tiny-sum", private=False, revision=None, commit_message="m", dry_run_dir=out)

    names = {name for name, _ in result["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "config.yaml", "summary.json", "metrics.jsonl", "loss.png", "prepare_report.json", "README.md"} <= names
    assert not [n for n in names if n.startswith(("checkpoints", "best", ".")) or "/" in n]  # no eval yet
    assert {n: len(b) for n, b in _listing(out).items()} == dict(result["files"])
    assert (out / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
    assert "Model Card for Model ID" not in (out / "README.md").read_text()  # peft's template is replaced
    assert not list(tmp_path.glob(".staged-*"))  # no temp folder left behind

    # A second dry run may replace its own staging folder, but never a folder holding other files.
    push(run, cfg, None, private=False, revision=None, commit_message="m", dry_run_dir=out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds other files"):
        push(run, cfg, None, private=False, revision=None, commit_message="m", dry_run_dir=out)
    assert (out / "notes.txt").read_text() == "mine"


def test_model_card_metadata_results_and_usage(run, tmp_path):
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(METRICS))
    (run / "eval" / "predictions.jsonl").write_text('{"prediction": "x"}\n')
    cfg = load_config(run / "config.yaml", ["model.name=microsoft/phi-2"])  # the card only names the base
    out = tmp_path / "staged"
    result = push(run, cfg, "me/tiny-sum", private=False, revision=None, commit_message="m", dry_run_dir=out)

    names = {name for name, _ in result["files"]}
    assert "eval/metrics.json" in names and not [n for n in names if "predictions" in n]
    meta, text = _card(out)
    assert meta["base_model"] == "microsoft/phi-2"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "cc-by-nc-sa-4.0"
    assert meta["datasets"] == ["knkarthick/dialogsum"]  # the local slice stands for DialogSum
    assert {"peft", "lora", "summarization", "dialogsum", "phi2sum"} <= set(meta["tags"])
    front = (out / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["base_model"] == "microsoft/phi-2"

    base_row = next(line for line in text.splitlines() if line.startswith("| base |"))
    tuned_row = next(line for line in text.splitlines() if line.startswith("| fine-tuned |"))
    assert text.index("| base |") < text.index("| fine-tuned |")
    assert "30.00 [28.00, 32.00]" in base_row and "41.00 [38.00, 44.00]" in tuned_row
    assert "34.00 [32.00, 36.00]" in tuned_row  # ROUGE-Lsum
    assert "18 dialogue-reference pairs" in text and "mean over all dialogue-reference pairs" in text
    assert "r=8, alpha=16" in text and "q_proj" in text
    assert 'PeftModel.from_pretrained(base, "me/tiny-sum")' in text
    assert 'from_pretrained("microsoft/phi-2"' in text
    assert '"Instruct: Summarize the following conversation.\\n" + dialogue + "\\nOutput:\\n"' in text
    assert "<|endoftext|>" in text
    assert "Chen et al., 2021" in text and "https://github.com/cylnlp/dialogsum" in text


def test_card_for_a_local_base_names_no_base_model_and_no_base_row(run, tmp_path):
    metrics = json.loads(json.dumps(METRICS))
    del metrics["models"]["base"]
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    cfg = load_config(run / "config.yaml")  # model.name is the tiny model's local folder
    push(run, cfg, "me/tiny-sum", private=False, revision=None, commit_message="m", dry_run_dir=tmp_path / "s")

    meta, text = _card(tmp_path / "s")
    assert "base_model" not in meta
    assert "not a Hub id" in text
    assert "| fine-tuned |" in text and "| base |" not in text


def test_card_usage_follows_a_chat_template(run, tiny_chat_model, tmp_path):
    # The run's tokenizer swapped for the chat one: the card must show the template's prompt and its
    # end-of-turn stop token, not the plain format and EOS.
    for f in tiny_chat_model.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, run / f.name)
    report = json.loads((run / "prepare_report.json").read_text())
    (run / "prepare_report.json").write_text(json.dumps(report | {"prompt_format": "chat", "stop_token": "<|im_end|>"}))
    push(run, load_config(run / "config.yaml"), "me/chat", private=False, revision=None, commit_message="m",
         dry_run_dir=tmp_path / "s")

    _, text = _card(tmp_path / "s")
    assert 'prompt = "<|im_start|>user\\nSummarize the following conversation.\\n\\n" + dialogue' in text
    assert 'convert_tokens_to_ids("<|im_end|>")' in text and "add_special_tokens=False" in text


def test_push_finds_eval_scores_where_eval_wrote_them_or_says_it_did_not(run, tmp_path):
    """`eval --out elsewhere` leaves nothing in <run>/eval: a dry run then warns that the card has no ROUGE table,
    and with --eval-dir pointing at that folder the card has it (and the Hub's model-index its numbers)."""
    scores = tmp_path / "elsewhere"
    res = runner.invoke(app, ["eval", "--adapter", str(run), "--limit", "2", "--compare", "none", "--out", str(scores)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["push", "--adapter", str(run), "--dry-run", str(tmp_path / "bare")])
    assert res.exit_code == 0, res.output
    said = unwrapped(res.output)
    assert f"no eval scores at {run / 'eval' / 'metrics.json'}" in said and "--eval-dir" in said
    meta, text = _card(tmp_path / "bare")
    assert "Not evaluated yet" in text and "model-index" not in meta

    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum", "--dry-run",
                              str(tmp_path / "scored"), "--eval-dir", str(scores)])
    assert res.exit_code == 0, res.output
    assert "no eval scores" not in res.output
    metrics = json.loads((scores / "metrics.json").read_text())
    assert (tmp_path / "scored" / "eval" / "metrics.json").read_text() == (scores / "metrics.json").read_text()
    meta, text = _card(tmp_path / "scored")
    row = next(line for line in text.splitlines() if line.startswith("| fine-tuned |"))
    assert f"{100 * metrics['models']['fine-tuned']['rouge2']['mean']:.2f}" in row
    [entry] = meta["model-index"]
    got = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert got == {k: round(100 * metrics["models"]["fine-tuned"][k]["mean"], 2)
                   for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    assert entry["results"][0]["dataset"]["type"] == "knkarthick/dialogsum"


def test_card_for_other_data_names_it_and_cites_no_dialogsum(run, tmp_path):
    cfg = load_config(run / "config.yaml", ["data.source=someone/meeting-notes", "data.dialogue_column=transcript"])
    push(run, cfg, "me/notes", private=False, revision=None, commit_message="m", dry_run_dir=tmp_path / "s")
    meta, text = _card(tmp_path / "s")
    assert meta["datasets"] == ["someone/meeting-notes"] and "dialogsum" not in meta["tags"]
    assert "Chen et al., 2021" not in text and "check that the data's license allows it" in text
    assert "dialogue column `transcript`" in text


def test_cli_dry_run_and_errors(run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    res = runner.invoke(app, ["push", "--adapter", str(run), "--dry-run", str(tmp_path / "staged")])
    assert res.exit_code == 0, res.output
    assert "adapter_model.safetensors" in res.output and (tmp_path / "staged" / "README.md").is_file()

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"]

    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "not a repo"])
    assert res.exit_code == 2 and "user/name" in res.output

    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["push", "--adapter", str(empty), "--repo", "me/tiny-sum"])
    assert res.exit_code == 2 and "no adapter_config.json" in res.output


def test_push_uploads_the_staged_files_to_the_hub(run, tmp_path, hub):
    before = _listing(run)
    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum", "--private",
                              "--dry-run", str(tmp_path / "staged")])
    assert res.exit_code == 0, res.output
    assert not hub.requests  # a dry run never talks to the Hub

    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum", "--private",
                              "-m", "first adapter"])
    assert res.exit_code == 0, res.output
    assert f"{hub.url}/me/tiny-sum" in res.output
    repo = hub.repos["me/tiny-sum"]
    assert repo["private"] is True
    assert repo["commits"] == [{"revision": "main", "summary": "first adapter"}]
    assert repo["branches"]["main"] == _listing(tmp_path / "staged")  # byte for byte what the dry run showed
    writes = [auth for _, path, auth in hub.requests if path.startswith(("/api/repos", "/api/models"))]
    assert writes and set(writes) == {f"Bearer {TOKEN}"}
    assert not hub.unhandled, hub.unhandled
    assert TOKEN not in res.output
    assert _listing(run) == before  # the run is read, never written

    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum", "--revision", "exp"])
    assert res.exit_code == 0, res.output
    assert "/tree/exp" in res.output
    assert repo["commits"][-1]["revision"] == "exp" and "README.md" in repo["branches"]["exp"]


def test_push_refused_or_unreachable_is_one_clear_line(run, hub, monkeypatch):
    from huggingface_hub import constants

    before = _listing(run)
    hub.fail["create"] = 403
    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "someone-else/model"])
    assert res.exit_code == 1
    lines = error_lines(res.output)  # (and a warning: this run was never evaluated)
    assert len(lines) == 1 and "refused" in lines[0] and "403" in lines[0] and "someone-else/model" in lines[0]
    assert TOKEN not in res.output
    assert "someone-else/model" not in hub.repos and _listing(run) == before

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    res = runner.invoke(app, ["push", "--adapter", str(run), "--repo", "me/tiny-sum"])
    assert res.exit_code == 1
    lines = error_lines(res.output)
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0]
    assert TOKEN not in res.output


def test_merge_equals_base_plus_adapter(trained_run, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    # fp32 so the comparison below is exact to 1e-4 on any machine (auto picks bf16 on a modern GPU).
    trained = trained_run
    res = runner.invoke(app, ["merge", "--adapter", str(trained), "--out", str(out), "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert (out / "config.yaml").is_file() and not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("#Person1#: Hello, how are you?\n#Person2#: Fine.", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(trained)).eval()(ids).logits
        folded = merged(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(folded, adapted, atol=1e-4, rtol=0)

    res = runner.invoke(app, ["merge", "--adapter", str(trained), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["merge", "--adapter", str(trained), "--out", str(tmp_path / "m2"), "--dtype", "fp8"])
    assert res.exit_code == 2 and "Invalid value for '--dtype'" in res.output
