"""A user's own data through every verb. tests/data/custom holds 24 made-up chats twice: SAMSum-style CSV files
(`id`, `dialogue`, `summary`; speakers by name) in a folder given as data.source, and `text`/`target` JSON lines
given split by split with data.files and the column settings. prepare, train, eval, summarize and push read the
named columns; with no references column each row's summary is its only reference; summarize hands named speakers
to a model trained on named speakers as they are; the model card calls the data the uploader's own, not DialogSum.
Also the card of a DialogSum run after `phi2sum eval`: its dataset, license, citation and model-index."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, SLICE, read_jsonl, tiny_config_dict, unwrapped
from phi2sum.cli import app
from phi2sum.config import DataConfig, load_config
from phi2sum.generate import fold_adapter, generate, load_for_inference
from phi2sum.hub import CITATION, DIALOGSUM, is_dialogsum
from phi2sum.summarize import normalize

runner = CliRunner()
CUSTOM = ROOT / "tests" / "data" / "custom"
PAIRS = {split: CUSTOM / "pairs" / f"{split}.jsonl" for split in ("train", "validation", "test")}
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LOCAL_PATHS = "are local to the machine that trained: "


def _invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def _custom_run(tmp: Path, tiny_model: Path, data: dict, how: list[str]) -> Path:
    """prepare, train and eval through the CLI on the tiny model: 4 steps, every test dialogue scored."""
    raw = tiny_config_dict(tiny_model, tmp, data={"max_rows": {}} | data,
                           train={"max_steps": 4, "grad_accum": 1, "eval_every": 2, "save_every": 2})
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    _invoke("prepare", "--config", config, *how)
    _invoke("train", "--config", config, *how)
    _invoke("eval", "--adapter", tmp / "run", "--compare", "none")
    return tmp / "run"


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, tiny_model, one_thread) -> Path:
    """The SAMSum-style CSV folder as data.source: DialogSum's column names, but not DialogSum."""
    return _custom_run(tmp_path_factory.mktemp("csv"), tiny_model, {"source": str(CUSTOM / "samsum")}, [])


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, tiny_model, one_thread) -> Path:
    """The text/target JSON lines, named on the command line as README's "Your own data" shows."""
    how = [a for split, path in PAIRS.items() for a in ("--set", f"data.files.{split}={path}")]
    how += ["--set", "data.dialogue_column=text", "--set", "data.summary_column=target"]
    return _custom_run(tmp_path_factory.mktemp("jsonl"), tiny_model, {}, how)


def csv_rows(split: str) -> list[dict]:
    with open(CUSTOM / "samsum" / f"{split}.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def front_matter(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def local_paths_sentence(card: Path) -> str:
    return next(line for line in card.read_text(encoding="utf-8").splitlines() if LOCAL_PATHS in line)


def check_model_index(meta: dict, metrics: dict, dataset_type: str) -> None:
    """The Hub's eval results: ROUGE-1/2/L/Lsum of the scored split, metrics.json's means x 100 to 2 places."""
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert result["dataset"]["type"] == dataset_type and result["dataset"]["split"] == metrics["split"] == "test"
    got = {m["type"]: m["value"] for m in result["metrics"]}
    assert got == {k: round(100 * metrics["models"]["fine-tuned"][k]["mean"], 2) for k in ROUGE}
    assert all(metrics["protocol"] in m["config"] for m in result["metrics"])


# ----------------------------------------------------------------------------------------------------
# The columns each verb reads


def test_csv_columns_and_single_references_reach_prepare_train_and_eval(csv_run):
    report = json.loads((csv_run / "prepare_report.json").read_text())
    assert {s: r["rows_kept"] for s, r in report["splits"].items()} == {"train": 16, "validation": 4}
    assert report["splits"]["train"]["source"] == str(CUSTOM / "samsum" / "train.csv")
    assert report["person_tags"] is False  # speakers by name, not #Person1#

    metrics = json.loads((csv_run / "eval" / "metrics.json").read_text())
    assert metrics["n_dialogues"] == metrics["n_pairs"] == 4  # each row's summary is its only reference
    predictions = read_jsonl(csv_run / "eval" / "predictions.jsonl")
    test = csv_rows("test")
    assert [p["id"] for p in predictions] == [r["id"] for r in test]
    assert [p["dialogue"] for p in predictions] == [r["dialogue"] for r in test]  # multi-line cells kept whole
    assert [p["references"] for p in predictions] == [[r["summary"]] for r in test]


def test_jsonl_text_target_columns_reach_prepare_train_and_eval(jsonl_run):
    report = json.loads((jsonl_run / "prepare_report.json").read_text())
    assert {s: r["rows_kept"] for s, r in report["splits"].items()} == {"train": 16, "validation": 4}
    assert report["splits"]["validation"]["source"] == str(PAIRS["validation"])
    cfg = load_config(jsonl_run / "config.yaml")
    assert (cfg.data.dialogue_column, cfg.data.summary_column) == ("text", "target")  # the run remembers them

    predictions = read_jsonl(jsonl_run / "eval" / "predictions.jsonl")
    test = read_jsonl(PAIRS["test"])
    assert [p["id"] for p in predictions] == [f"test_{i}" for i in range(4)]  # no id column: made up
    assert [(p["dialogue"], p["references"]) for p in predictions] == [(r["text"], [r["target"]]) for r in test]


def test_summarize_reads_the_runs_dialogue_column_and_keeps_named_speakers(jsonl_run, tmp_path):
    """The test file itself goes to summarize (its `text` column), and the model sees each chat as it trained on it
    (named speakers), so summarize and eval give the same summaries."""
    out = tmp_path / "summaries.jsonl"
    _invoke("summarize", PAIRS["test"], "--adapter", jsonl_run, "--out", out)
    got = {r["id"]: r["summary"] for r in read_jsonl(out)}
    predictions = read_jsonl(jsonl_run / "eval" / "predictions.jsonl")
    assert got == {f"{PAIRS['test']}:{n}": p["prediction"] for n, p in enumerate(predictions, 1)}


def test_a_named_speaker_chat_is_summarized_as_written(csv_run, tmp_path):
    chat = csv_rows("test")[0]["dialogue"]
    path = tmp_path / "chat.txt"
    path.write_text(chat, encoding="utf-8")
    res = _invoke("summarize", path, "--adapter", csv_run)

    cfg = load_config(csv_run / "config.yaml")
    loaded = load_for_inference(cfg, str(csv_run))
    fold_adapter(loaded)
    tagged, _ = normalize(chat)  # what a DialogSum-trained model is given instead
    as_written, as_tagged = generate(loaded, [chat, tagged], cfg.data.instruction, cfg.generation)
    assert as_written.text != as_tagged.text  # else this test could not tell the two apart
    assert res.stdout == as_written.text + "\n"


# ----------------------------------------------------------------------------------------------------
# Model cards


def test_custom_data_card_is_the_users_data_not_dialogsum(csv_run, jsonl_run, tmp_path):
    for run, columns in ((csv_run, ("dialogue", "summary")), (jsonl_run, ("text", "target"))):
        staged = tmp_path / run.parent.name
        res = _invoke("push", "--adapter", run, "--repo", "me/chats", "--dry-run", staged)
        assert "push.license" in unwrapped(res.output)  # no license named: said, not guessed
        card = staged / "README.md"
        meta, text = front_matter(card), card.read_text(encoding="utf-8")
        assert "datasets" not in meta and "dialogsum" not in meta["tags"] and meta["license"] == "other"
        check_model_index(meta, json.loads((run / "eval" / "metrics.json").read_text()), "custom")
        assert DIALOGSUM not in text and "Chen et al." not in text and "bibtex" not in text
        assert "CC BY-NC-SA" not in text and "fine-tuned on custom data" in text
        assert "the uploader's own data (local files), not DialogSum" in text
        assert f"dialogue column `{columns[0]}`, summary column `{columns[1]}`" in text
        assert 'dialogue = "Anna: Are you coming tonight?\\nBen:' in text  # the usage example: named speakers

        cfg = load_config(run / "config.yaml")
        used = [cfg.model.name, cfg.train.output_dir, cfg.data.cache_dir]
        used += list(cfg.data.files.values()) or [cfg.data.source]
        sentence = local_paths_sentence(card)
        assert all(f"`{p}`" in sentence for p in used), sentence
        assert str(SLICE) not in sentence  # the jsonl run's data.source is unused: every split is a file

    res = _invoke("push", "--adapter", csv_run, "--dry-run", tmp_path / "mit", "--set", "push.license=mit")
    assert "push.license" not in unwrapped(res.output)
    assert front_matter(tmp_path / "mit" / "README.md")["license"] == "mit"


def test_only_the_data_folder_or_file_name_says_dialogsum(tmp_path):
    """A project folder named after DialogSum (a clone called phi2-dialogsum) does not make the chats in it
    DialogSum; the shipped slice, DialogSum's own files and the hub dataset are."""
    splits = ("train", "validation", "test")
    mine = tmp_path / "phi2-dialogsum" / "data" / "chats"
    assert not is_dialogsum(DataConfig(source=str(mine)))
    assert not is_dialogsum(DataConfig(files={s: str(mine / f"{s}.csv") for s in splits}))
    assert not is_dialogsum(DataConfig(files={"train": str(mine / "train.csv")}))  # DialogSum's others only
    assert not is_dialogsum(DataConfig(source=str(SLICE), dialogue_column="text"))
    assert is_dialogsum(DataConfig()) and is_dialogsum(DataConfig(source=str(SLICE)))
    assert is_dialogsum(DataConfig(files={s: str(tmp_path / "DialogSum_Data" / f"dialogsum.{s}.jsonl") for s in splits}))


def test_dialogsum_card_after_eval(run_copy, tmp_path):
    _invoke("eval", "--adapter", run_copy, "--compare", "none", "--limit", "3")
    staged = tmp_path / "staged"
    res = _invoke("push", "--adapter", run_copy, "--repo", "me/tiny-sum", "--dry-run", staged)
    assert "push.license" not in res.output
    card = staged / "README.md"
    meta, text = front_matter(card), card.read_text(encoding="utf-8")
    assert meta["datasets"] == [DIALOGSUM] and meta["license"] == "cc-by-nc-sa-4.0" and "dialogsum" in meta["tags"]
    check_model_index(meta, json.loads((run_copy / "eval" / "metrics.json").read_text()), DIALOGSUM)
    assert "released under CC BY-NC-SA 4.0" in text and f"```bibtex\n{CITATION}\n```" in text

    cfg = load_config(run_copy / "config.yaml")
    sentence = local_paths_sentence(card)
    assert all(f"`{p}`" in sentence for p in (cfg.model.name, cfg.data.source, cfg.train.output_dir,
                                               cfg.data.cache_dir)), sentence
