"""Bad input to eval, summarize, push and merge: each ends with one `error:` line (or click's usage
message), a non-zero exit code and no traceback, both through CliRunner and as a real `python -m phi2sum`
process (whose exit code is what a shell sees). No model is trained: every case fails before that. Also the
CLI's own surface: --version, the choices --help lists, `config show`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, error_lines
from phi2sum.cli import app

runner = CliRunner()
DIALOG = ROOT / "tests" / "data" / "dialog.txt"


@pytest.fixture
def world(tmp_path, make_config) -> dict[str, str]:
    """Paths the cases below refer to as {name}."""
    not_adapter = tmp_path / "not-an-adapter"
    not_adapter.mkdir()
    (not_adapter / "notes.txt").write_text("a folder, but no adapter_config.json")
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    files = {"empty": b"", "binary": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "latin1": "Zoë: très bien".encode("latin-1"),
             "bad_jsonl": b'{"dialogue": "A: hi"}\n{"dialog": "B: typo"}\n'}
    paths = {}
    for name, blob in files.items():
        path = tmp_path / (f"{name}.jsonl" if name == "bad_jsonl" else f"{name}.txt")
        path.write_bytes(blob)
        paths[name] = str(path)
    return paths | {"config": str(make_config()), "dialog": str(DIALOG), "not_adapter": str(not_adapter),
                    "missing": str(tmp_path / "no-such-run"), "empty_dir": str(empty_dir),
                    "missing_file": str(tmp_path / "no-such.txt"), "out": str(tmp_path / "out"),
                    "missing_config": str(tmp_path / "no-such.yaml")}


def expand(args: list[str], world: dict[str, str]) -> list[str]:
    return [a.format(**world) for a in args]


def assert_one_error_line(output: str, exit_code: int, expected_code: int, message: str) -> None:
    assert exit_code == expected_code, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert message in errors[0]


# Our own errors: (arguments, exit code, part of the one error line).
BAD_INPUT = [
    (["eval", "--adapter", "{missing}", "--config", "{config}"], 2, "no such directory, and not a hub id"),
    (["eval", "--adapter", "{not_adapter}", "--config", "{config}"], 2, "is not an adapter or run directory"),
    (["eval", "--adapter", "{not_adapter}"], 2, "is not an adapter or run directory"),  # before any data loads
    (["eval", "--config", "{missing_config}"], 2, "not found; pass an existing YAML"),
    (["eval", "--config", "{config}", "--set", "eval.limt=3"], 2, "eval.limt: unknown field"),
    (["summarize", "{dialog}", "--adapter", "{missing}", "--config", "{config}"], 2, "no such directory"),
    (["summarize", "{dialog}", "--adapter", "{not_adapter}", "--config", "{config}"], 2,
     "is not an adapter or run directory"),
    (["summarize", "{bad_jsonl}", "--config", "{config}"], 2, "line 2: expected a JSON object"),
    (["summarize", "{missing_file}", "--config", "{config}"], 2, "not found; pass a text file"),
    (["summarize", "{empty_dir}", "--config", "{config}"], 2, "holds no .txt files"),
    (["summarize", "{dialog}", "--out", "{dialog}", "--config", "{config}"], 2, "is one of the inputs"),
    # A hub adapter id offline: its base model is unknown, and that is what the line says (not a tokenizer error).
    (["summarize", "{dialog}", "--adapter", "nobody/no-such-adapter"], 2,
     "cannot read nobody/no-such-adapter's adapter_config.json from the Hub"),
    (["push", "--adapter", "{not_adapter}", "--dry-run", "{out}"], 2, "is not a run directory"),
    (["push", "--adapter", "{missing}", "--repo", "me/run"], 2, "is not a run directory"),
    (["merge", "--adapter", "{not_adapter}", "--out", "{out}"], 2, "is not a run directory"),
    (["merge", "--adapter", "{missing}", "--out", "{out}"], 2, "is not a run directory"),
]


@pytest.mark.parametrize("args,code,message", BAD_INPUT, ids=[" ".join(case[0]) for case in BAD_INPUT])
def test_bad_input_is_one_error_line(world, args, code, message):
    result = runner.invoke(app, expand(args, world))
    assert_one_error_line(result.output, result.exit_code, code, message)
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an escaped exception
    assert not Path(world["out"]).exists()


@pytest.mark.parametrize("name,message", [("empty", "is empty; give it a dialogue"),
                                          ("binary", "looks binary (NUL bytes"),
                                          ("latin1", "not UTF-8 text (byte 2); re-save it as UTF-8")])
def test_an_unreadable_file_is_named_and_the_run_fails(world, name, message):
    """Every input unreadable: each is named, nothing is loaded, exit 1 (test_summarize: with readable ones too)."""
    result = runner.invoke(app, ["summarize", world[name], "--config", world["config"]])
    assert result.exit_code == 1, result.output
    lines = error_lines(result.output)
    assert len(lines) == 2 and world[name] in lines[0] and message in lines[0], result.output
    assert "1 input(s) could not be summarized" in lines[1] and "Traceback" not in result.output


@pytest.mark.parametrize("stdin,message", [(b"", "standard input is empty"), (b"  \n", "standard input is empty"),
                                           (b"A: \0\0", "standard input looks binary"),
                                           (b"Jos\xe9: ol\xe1", "standard input: not UTF-8 text (byte 3)"),
    (b"\xff\xfeT", "standard input: not UTF-16 text")])
def test_bad_stdin(world, stdin, message):
    result = runner.invoke(app, ["summarize", "-", "--config", world["config"]], input=stdin)
    assert_one_error_line(result.output, result.exit_code, 2, message)


# Click's own usage errors. Under CliRunner (standalone mode) Typer prints them as a usage line and a box.
USAGE = [
    (["push"], "Missing option '--adapter'"),
    (["push", "--repo", "me/run"], "Missing option '--adapter'"),
    (["merge", "--adapter", "{not_adapter}"], "Missing option '--out'"),
    (["summarize"], "Missing argument"),
    (["eval", "--bogus"], "No such option: --bogus"),
    (["summarize", "{dialog}", "--temperature", "0.3"], "No such option: --temperature"),
    (["eval", "--limit", "many"], "Invalid value for '--limit'"),
    (["eval", "--limit", "0"], "Invalid value for '--limit'"),
    (["eval", "--compare", "gpt4"], "Invalid value for '--compare'"),
    (["merge", "--adapter", "{not_adapter}", "--out", "{out}", "--dtype", "fp8"], "Invalid value for '--dtype'"),
    (["train-more"], "No such command 'train-more'"),
]


@pytest.mark.parametrize("args,message", USAGE, ids=[" ".join(case[0]) for case in USAGE])
def test_usage_errors(world, args, message):
    result = runner.invoke(app, expand(args, world))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert "Usage:" in result.output and message in result.output


# ----------------------------------------------------------------------------------------------------
# The real process: phi2sum.cli.main, as the shell runs it


def phi2sum(args: list[str], cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "phi2sum", *args], cwd=cwd, input=stdin, capture_output=True,
                          env=env, timeout=120)


def test_real_process_exits_2_on_bad_input_and_on_usage_errors(world, tmp_path):
    """Both ways main() ends a bad call: our ConfigError (one line) and click's usage error (one line, not
    Typer's box), each with the exit code a shell sees."""
    proc = phi2sum(["summarize", world["bad_jsonl"], "--config", world["config"]], tmp_path)
    assert_one_error_line(proc.stderr.decode(), proc.returncode, 2, "line 2: expected a JSON object")
    assert proc.stdout == b""
    proc = phi2sum(["eval", "--bogus"], tmp_path)
    assert_one_error_line(proc.stderr.decode(), proc.returncode, 2, "No such option: --bogus")
    assert proc.stdout == b""


@pytest.mark.parametrize("rank,lines", [("0", 1), ("1", 0)])
def test_under_a_launch_a_config_error_is_said_by_rank_0_only(world, monkeypatch, rank, lines):
    """Every process of `accelerate launch` / torchrun reads the same config and fails alike: one line for the
    person, exit code 2 from each process."""
    monkeypatch.setenv("RANK", rank)
    result = runner.invoke(app, expand(["eval", "--config", "{config}", "--set", "eval.limt=3"], world))
    assert result.exit_code == 2 and len(error_lines(result.output)) == lines, result.output


def test_version_and_the_choices_help_lists(tmp_path):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"phi2sum {version('phi2sum')}"
    for verb, option, choices in (("eval", "--compare", ("base", "none")),
                                  ("merge", "--dtype", ("auto", "fp16", "bf16", "fp32"))):
        result = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0
        line = next(x for x in result.output.splitlines() if option in x)
        assert all(c in line for c in choices), line


def test_config_show_lists_every_field_with_its_value_and_doc(make_config):
    result = runner.invoke(app, ["config", "show", "--config", str(make_config()), "--set", "train.max_steps=7"],
                           env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, result.output
    row = next(x for x in result.output.splitlines() if "train.max_steps" in x)
    assert "7" in row and "Optimizer steps to run" in row
    from phi2sum.config import RunConfig

    fields = [f"{s}.{n}" for s, sec in RunConfig.model_fields.items() for n in sec.annotation.model_fields]
    assert all(f in result.output for f in fields)
