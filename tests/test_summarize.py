"""The summarize verb: people's own dialogues from files, folders, stdin and JSON lines (UTF-8, or UTF-16/32 with a
byte-order mark), speaker names mapped to DialogSum's #PersonN# and back, summaries streamed to --out batch by
batch so a rerun skips what is done, and an unreadable input named while the others are summarized. Through the
shared trained run and scripted tiny models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EOS, ROOT, TOM_IS_LATE, chain, error_lines, read_jsonl, scripted_lm
from phi2sum.cli import app
from phi2sum.config import ConfigError, load_config
from phi2sum.generate import fold_adapter, generate, load_for_inference
from phi2sum.summarize import Item, decode_text, normalize, read_inputs, restore_names

runner = CliRunner()
DIALOG = ROOT / "tests" / "data" / "dialog.txt"  # Maya and Tom plan a team dinner
DIALOGSUM_FORM = "#Person1#: Are you coming on Friday?\n#Person2#: Yes, my train gets in at eight."


def saved_lm(loaded, folder: Path) -> Path:
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def possessive_model(tmp_path_factory, tiny_model) -> Path:
    """A base model that always answers "#Person2#'s dog." (see conftest.scripted_lm)."""
    return saved_lm(scripted_lm(tiny_model, chain("Ċ", "#", "Person", "2", "#'", "s", "Ġdo", "g", ".", EOS)),
                    tmp_path_factory.mktemp("possessive"))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


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
    one = write(tmp_path / "one.txt", "A: hi\r\nB: yo")  # Windows line ends become \n
    folder = tmp_path / "chats"
    write(folder / "b.txt", "\ufeffC: x\nD: y")  # a UTF-8 BOM is dropped
    write(folder / "a.md", "E: p\nF: q")
    write(folder / "notes", "G: r")
    write(folder / ".gitkeep", "")  # hidden files are not dialogues (an empty one would be a problem)
    write(folder / ".DS_Store", b"\0\1binary")
    write(folder / "skip.json", "{}")
    lines = write(tmp_path / "d.jsonl", '{"dialogue": "H: 1"}\n\n{"dialogue": "I: 2", "id": 7}\n')
    items, problems = read_inputs([str(one), str(folder), str(lines)])
    assert problems == []
    assert items == [Item(str(one), str(one), "A: hi\nB: yo"),
                     Item(str(folder / "a.md"), str(folder / "a.md"), "E: p\nF: q"),
                     Item(str(folder / "b.txt"), str(folder / "b.txt"), "C: x\nD: y"),
                     Item(str(folder / "notes"), str(folder / "notes"), "G: r"),
                     Item(f"{lines}:1", f"{lines}:1", "H: 1"), Item("7", f"{lines}:3", "I: 2")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_read_in_its_encoding(encoding):
    """What Windows Notepad and many exporters write."""
    text = "Zoë: très bien\r\nTom: 好\r\n"
    blob = text.encode(encoding)
    if encoding == "utf-16-be":
        blob = b"\xfe\xff" + blob
    assert decode_text(blob, "x") == ("Zoë: très bien\nTom: 好\n", encoding.removesuffix("-be").removesuffix("-sig"))


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\t\n", "is empty"),
    ("binary.txt", b"PK\x03\x04\0\0\x14\x00", "looks binary"),
    ("latin1.txt", "Zoë: très bien".encode("latin-1"), "not UTF-8 text (byte 2)"),
    ("torn-utf16.txt", b"\xff\xfeT\x00o", "not UTF-16 text"),
])
def test_an_unreadable_file_is_a_problem_named_while_the_others_are_read(tmp_path, name, content, message):
    bad = write(tmp_path / name, content)
    good = write(tmp_path / "good.txt", "A: hi")
    items, problems = read_inputs([str(bad), str(good)])
    assert [it.source for it in items] == [str(good)]
    assert len(problems) == 1 and str(bad) in problems[0] and message in problems[0]


@pytest.mark.parametrize("content,message", [
    (b'{"dialogue": "A: x"}\nnot json\n', "line 2: expected a JSON object"),
    (b'{"dialogue": "A: x"}\n{"text": "B: y"}\n', "line 2: expected a JSON object"),
    (b'["A: x"]\n', "line 1: expected a JSON object"),
    (b'{"dialogue": "A: x", "id": 1}\n{"dialogue": "B: y", "id": 1}\n', "id '1' appears twice"),
])
def test_a_bad_jsonl_file_is_a_config_error(tmp_path, content, message):
    path = write(tmp_path / "rows.jsonl", content)
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


def test_summarize_one_file_matches_eval_generation(trained_run):
    """summarize and eval share one generate(): same run, same dialogue, same summary."""
    result = runner.invoke(app, ["summarize", str(DIALOG), "--adapter", str(trained_run)])
    assert result.exit_code == 0, result.output
    assert str(DIALOG) in result.stderr
    cfg = load_config(trained_run / "config.yaml")
    dialogue, names = normalize(DIALOG.read_text())
    loaded = load_for_inference(cfg, str(trained_run))
    fold_adapter(loaded)
    [g] = generate(loaded, [dialogue], cfg.data.instruction, cfg.generation)
    assert result.stdout == restore_names(g.text, names) + "\n"
    assert "Instruct:" not in result.stdout and "Output:" not in result.stdout


def test_summarize_files_folder_and_stdin_to_jsonl_and_a_rerun_skips_what_is_done(trained_run, tmp_path):
    one = write(tmp_path / "one.txt", DIALOGSUM_FORM)
    folder = tmp_path / "chats"
    write(folder / "a.txt", "Ann: lunch?\nBob: sure")
    write(folder / "b.txt", DIALOG.read_text())
    out = tmp_path / "summaries.jsonl"
    args = ["summarize", str(one), str(folder), "--adapter", str(trained_run), "--out", str(out)]
    result = runner.invoke(app, [*args, "-"], input="Kim: ready?\nLeo: almost\n")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)  # in the order batches finished (longest dialogues first), each with its id
    assert sorted(r["source"] for r in rows) == sorted([str(one), str(folder / "a.txt"), str(folder / "b.txt"),
                                                        "stdin"])
    assert all(set(r) == {"id", "source", "summary", "run_on"} and isinstance(r["summary"], str) for r in rows)
    assert f"wrote 4 summaries to {out}" in result.output
    assert result.stdout == ""  # with --out, nothing but the notes on stderr
    assert not list(tmp_path.glob(".*.tmp"))

    # The same command again (after a crash, say) summarizes only what the file lacks: here a new input.
    with open(out, "ab") as fh:
        fh.write(b'{"id": "torn')  # a line cut short by a kill is dropped, not kept
    extra = write(tmp_path / "extra.txt", "Cy: bye\nDi: see you")
    result = runner.invoke(app, [*args, str(extra)])
    assert result.exit_code == 0, result.output
    assert "already holds 3 of these summaries; summarizing the other 1" in " ".join(result.output.split())
    after = read_jsonl(out)
    assert after[:4] == rows and [r["source"] for r in after[4:]] == [str(extra)]


def test_summarize_jsonl_writes_one_line_per_input_under_its_id(trained_run, tmp_path):
    dialogues = [DIALOGSUM_FORM, "Ann: lunch?\nBob: sure", DIALOG.read_text()]
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"id": f"d{i}", "dialogue": d}) + "\n"
                                               for i, d in enumerate(dialogues)))
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(src), "--adapter", str(trained_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted((r["id"], r["source"]) for r in read_jsonl(out)) == [("d0", f"{src}:1"), ("d1", f"{src}:2"),
                                                                       ("d2", f"{src}:3")]


def test_summarize_restores_speaker_names(possessive_model, make_config, tmp_path):
    """The model answers "#Person2#'s dog."; in dialog.txt Maya speaks first and Tom second."""
    config = make_config(possessive_model)
    dialogsum = write(tmp_path / "dialogsum.txt", DIALOGSUM_FORM)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(DIALOG), str(dialogsum), "--config", str(config),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {r["source"]: r["summary"] for r in read_jsonl(out)} == {str(DIALOG): "Tom's dog.",
                                                                    str(dialogsum): "#Person2#'s dog."}
    assert "no --adapter: the base model summarizes as it is" in " ".join(result.output.split())


def test_a_summary_that_runs_on_into_a_new_turn_is_cut_and_marked(tiny_model, make_config, tmp_path):
    turn = "\n#Person2#:"
    model = saved_lm(scripted_lm(tiny_model, chain(*TOM_IS_LATE, turn, "Ġo", "k", EOS), new_tokens=(turn,)),
                     tmp_path / "runs-on")
    result = runner.invoke(app, ["summarize", str(DIALOG), "--config", str(make_config(model))])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Tom is late.\n"
    said = " ".join(result.stderr.split())
    assert "(ran on past its summary)" in said and "1 output(s) ran on past the summary" in said


def test_one_unreadable_input_is_named_and_the_others_are_summarized(trained_run, tmp_path):
    empty = write(tmp_path / "empty.txt", b"")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(DIALOG), str(empty), "--adapter", str(trained_run),
                                 "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert [r["source"] for r in read_jsonl(out)] == [str(DIALOG)]
    assert error_lines(result.output) == [
        f"error: {empty} is empty; give it a dialogue, one `Speaker: text` line per turn",
        "error: 1 input(s) could not be summarized (named above); the others were"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("where", ["an input", "a folder"])
def test_out_must_be_a_new_file_not_an_input_or_a_folder(tmp_path, where):
    src = write(tmp_path / "in.txt", "A: hi\nB: yo")
    out = src if where == "an input" else tmp_path
    result = runner.invoke(app, ["summarize", str(src), "--out", str(out), "--set", "model.name=/nonexistent"])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert ("is one of the inputs" if where == "an input" else "is a folder; name a file") in line
    assert src.read_text() == "A: hi\nB: yo"


def test_summarize_shortens_long_dialogues_with_a_warning(trained_run, tmp_path):
    long = write(tmp_path / "long.txt", "Ann: " + "we should really plan the trip now. " * 60 + "\nBob: ok")
    short = write(tmp_path / "short.txt", "Ann: hi\nBob: ok")
    result = runner.invoke(app, ["summarize", str(long), str(short), "--adapter", str(trained_run),
                                 "--set", "generation.max_input_tokens=64"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {long} is longer than generation.max_input_tokens (64); its end was cut "
                        "before summarizing"]
    assert len(result.stdout.splitlines()) == 2


def test_summarize_with_a_bare_adapter_folder(trained_run, tmp_path):
    """No config.yaml: the base model comes from adapter_config.json, everything else from defaults."""
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained_run / name, bare / name)
    result = runner.invoke(app, ["summarize", str(DIALOG), "--adapter", str(bare), "--set", "generation.device=cpu",
                                 "--set", "generation.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1


def test_stdin_under_several_processes_is_refused_in_one_line(monkeypatch):
    """Under torchrun every process reads the inputs, and standard input cannot be split between them: refused
    before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["summarize", "-", "--set", "model.name=/nonexistent"], input="Tom: hi\n")
    assert result.exit_code == 2
    assert error_lines(result.output) == ["error: standard input (-) cannot be split over several processes; save "
                                          "it to a file and pass that, or run one process"]
    assert "Traceback" not in result.output
