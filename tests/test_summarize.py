"""The summarize verb: people's own dialogues from files, folders, stdin and JSON lines, speaker names
mapped to DialogSum's #PersonN# and back, through a real trained run and a scripted tiny model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_config_dict
from phi2sum import evaluate
from phi2sum.cli import app
from phi2sum.config import ConfigError, RunConfig
from phi2sum.summarize import normalize, read_inputs, restore_names
from test_eval import EOS, scripted_lm

runner = CliRunner()
DIALOG = ROOT / "tests" / "data" / "dialog.txt"  # Maya and Tom plan a team dinner
DIALOGSUM_FORM = "#Person1#: Are you coming on Friday?\n#Person2#: Yes, my train gets in at eight."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Path:
    """One real 6-step CPU training run for this module."""
    from phi2sum.train import train

    tmp = tmp_path_factory.mktemp("summarize-run")
    train(RunConfig.model_validate(tiny_config_dict(tiny_model, tmp)))
    return tmp / "run"


@pytest.fixture(scope="module")
def possessive_model(tmp_path_factory, tiny_model) -> Path:
    """A base model that always answers "#Person2#'s dog." (see test_eval.scripted_lm)."""
    loaded = scripted_lm(tiny_model, {a: [b] for a, b in zip(
        ("Ċ", "#", "Person", "2", "#'", "s", "Ġdo", "g", "."), ("#", "Person", "2", "#'", "s", "Ġdo", "g", ".", EOS))})
    out = tmp_path_factory.mktemp("possessive")
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------
# Speaker names


def test_named_speakers_become_persons_and_come_back():
    text = "Tom: hi Maya\n\nMaya:   hello, Tom!\n  are you ok?\nTom : fine\nDr. Lee: next please\n"
    dialogue, names = normalize(text)
    assert dialogue == ("#Person1#: hi Maya\n#Person2#: hello, Tom! are you ok?\n#Person1#: fine\n"
                        "#Person3#: next please")
    assert names == {"#Person1#": "Tom", "#Person2#": "Maya", "#Person3#": "Dr. Lee"}
    assert restore_names("#Person2# asks #Person1#'s plans; #Person3# and #Person4# wait.", names) == \
        "Maya asks Tom's plans; Dr. Lee and #Person4# wait."


def test_dialogsum_form_passes_through():
    dialogue, names = normalize("  " + DIALOGSUM_FORM + "\n\n")
    assert (dialogue, names) == (DIALOGSUM_FORM, {})
    assert restore_names("#Person1# asks #Person2#.", names) == "#Person1# asks #Person2#."


# ----------------------------------------------------------------------------------------------------
# Reading inputs


def test_read_inputs_from_files_folders_and_jsonl(tmp_path):
    one = write(tmp_path / "one.txt", "A: hi\nB: yo")
    folder = tmp_path / "chats"
    write(folder / "b.txt", "\ufeffC: x\nD: y")  # a UTF-8 BOM is dropped
    write(folder / "a.md", "E: p\nF: q")
    write(folder / "notes", "G: r")
    write(folder / ".gitkeep", "")  # hidden files are not dialogues (an empty one would be an error)
    write(folder / ".DS_Store", b"\0\1binary")
    write(folder / "skip.json", "{}")
    lines = write(tmp_path / "d.jsonl", '{"dialogue": "H: 1"}\n\n{"dialogue": "I: 2", "id": 7}\n')
    items = read_inputs([str(one), str(folder), str(lines)])
    assert items == [(str(one), "A: hi\nB: yo"), (str(folder / "a.md"), "E: p\nF: q"),
                     (str(folder / "b.txt"), "C: x\nD: y"), (str(folder / "notes"), "G: r"),
                     (f"{lines}:1", "H: 1"), (f"{lines}:3", "I: 2")]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\t\n", "is empty"),
    ("binary.txt", b"PK\x03\x04\0\0\x14\x00", "looks binary"),
    ("latin1.txt", "Zoë: très bien".encode("latin-1"), "not UTF-8 text (byte 2)"),
    ("rows.jsonl", b'{"dialogue": "A: x"}\nnot json\n', "line 2: expected a JSON object"),
    ("rows.jsonl", b'{"dialogue": "A: x"}\n{"text": "B: y"}\n', "line 2: expected a JSON object"),
    ("rows.jsonl", b'["A: x"]\n', "line 1: expected a JSON object"),
])
def test_bad_inputs_are_config_errors(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_inputs([str(path)])


def test_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found; pass a text file"):
        read_inputs([str(tmp_path / "nope.txt")])
    write(tmp_path / "empty" / ".gitkeep", "")
    with pytest.raises(ConfigError, match="holds no .txt files"):
        read_inputs([str(tmp_path / "empty")])


# ----------------------------------------------------------------------------------------------------
# The summarize verb


def test_summarize_one_file_matches_eval_generation(trained):
    """summarize and eval share one generate(): same run, same dialogue, same summary."""
    result = runner.invoke(app, ["summarize", str(DIALOG), "--adapter", str(trained)])
    assert result.exit_code == 0, result.output
    assert str(DIALOG) in result.stderr
    cfg = RunConfig.model_validate(yaml.safe_load((trained / "config.yaml").read_text()))
    dialogue, names = normalize(DIALOG.read_text())
    [g] = evaluate.generate(evaluate.load_for_inference(cfg, str(trained)), [dialogue], cfg.data.instruction,
                            cfg.generation)
    assert result.stdout == restore_names(g.text, names) + "\n"
    assert "Instruct:" not in result.stdout and "Output:" not in result.stdout


def test_summarize_files_folder_and_stdin_to_jsonl(trained, tmp_path):
    one = write(tmp_path / "one.txt", DIALOGSUM_FORM)
    folder = tmp_path / "chats"
    write(folder / "a.txt", "Ann: lunch?\nBob: sure")
    write(folder / "b.txt", DIALOG.read_text())
    out = tmp_path / "summaries.jsonl"
    result = runner.invoke(app, ["summarize", str(one), str(folder), "-", "--adapter", str(trained),
                                 "--out", str(out)], input="Kim: ready?\nLeo: almost\n")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["source"] for r in rows] == [str(one), str(folder / "a.txt"), str(folder / "b.txt"), "stdin"]
    assert all(isinstance(r["summary"], str) and set(r) == {"source", "summary"} for r in rows)
    assert f"wrote 4 summaries to {out}" in result.output
    assert result.stdout == ""  # with --out, nothing but the note on stderr
    assert not out.with_name(out.name + ".tmp").exists()


def test_summarize_jsonl_writes_one_line_per_input(trained, tmp_path):
    dialogues = [DIALOGSUM_FORM, "Ann: lunch?\nBob: sure", DIALOG.read_text()]
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"id": i, "dialogue": d}) + "\n"
                                               for i, d in enumerate(dialogues)))
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(src), "--adapter", str(trained), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["source"] for r in read_jsonl(out)] == [f"{src}:1", f"{src}:2", f"{src}:3"]


def test_summarize_restores_speaker_names(possessive_model, make_config, tmp_path):
    """The model answers "#Person2#'s dog."; in dialog.txt Maya speaks first and Tom second."""
    config = make_config(possessive_model)
    dialogsum = write(tmp_path / "dialogsum.txt", DIALOGSUM_FORM)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(DIALOG), str(dialogsum), "--config", str(config),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["summary"] for r in read_jsonl(out)] == ["Tom's dog.", "#Person2#'s dog."]


def test_summarize_shortens_long_dialogues_with_a_warning(trained, tmp_path):
    long = write(tmp_path / "long.txt", "Ann: " + "we should really plan the trip now. " * 60 + "\nBob: ok")
    short = write(tmp_path / "short.txt", "Ann: hi\nBob: ok")
    result = runner.invoke(app, ["summarize", str(long), str(short), "--adapter", str(trained),
                                 "--set", "generation.max_input_tokens=64"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {long} is longer than generation.max_input_tokens (64); its end was cut "
                        "before summarizing"]
    assert len(result.stdout.splitlines()) == 2


def test_summarize_with_a_bare_adapter_folder(trained, tmp_path):
    """No config.yaml: the base model comes from adapter_config.json, everything else from defaults."""
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained / name, bare / name)
    result = runner.invoke(app, ["summarize", str(DIALOG), "--adapter", str(bare),
                                 "--set", "generation.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1


def test_summarize_under_several_processes_is_refused_in_one_line(tmp_path, monkeypatch):
    """Under torchrun every process would summarize and write everything: refused before any work."""
    (tmp_path / "d.txt").write_text("Tom: hi\nAnna: hello\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["summarize", str(tmp_path / "d.txt"), "--set", "model.name=/nonexistent"])
    assert result.exit_code == 2
    assert "summarize runs in one process" in result.output and "Traceback" not in result.output
