"""Bad input to eval, summarize, push and merge: each ends with one `error:` line (or click's usage
message), a non-zero exit code and no traceback, both through CliRunner and as a real `python -m phi2sum`
process (whose exit code is what a shell sees). No model is trained: every case fails before that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT
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
    (["eval", "--compare", "gpt4", "--config", "{config}"], 2, "--compare gpt4: use base or none"),
    (["eval", "--config", "{missing_config}"], 2, "not found; pass an existing YAML"),
    (["eval", "--config", "{config}", "--set", "eval.limt=3"], 2, "eval.limt: unknown field"),
    (["summarize", "{dialog}", "--adapter", "{missing}", "--config", "{config}"], 2, "no such directory"),
    (["summarize", "{dialog}", "--adapter", "{not_adapter}", "--config", "{config}"], 2,
     "is not an adapter or run directory"),
    (["summarize", "{empty}", "--config", "{config}"], 2, "is empty; give it a dialogue"),
    (["summarize", "{binary}", "--config", "{config}"], 2, "looks binary (NUL bytes)"),
    (["summarize", "{latin1}", "--config", "{config}"], 2, "not UTF-8 text (byte 2); re-save it as UTF-8"),
    (["summarize", "{bad_jsonl}", "--config", "{config}"], 2, "line 2: expected a JSON object"),
    (["summarize", "{missing_file}", "--config", "{config}"], 2, "not found; pass a text file"),
    (["summarize", "{empty_dir}", "--config", "{config}"], 2, "holds no .txt files"),
    (["summarize", "{dialog}", "{empty}", "--config", "{config}"], 2, "is empty"),  # one bad file of several
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


@pytest.mark.parametrize("stdin,message", [(b"", "standard input is empty"), (b"  \n", "standard input is empty"),
                                           (b"A: \0\0", "standard input looks binary"),
                                           (b"Jos\xe9: ol\xe1", "standard input: not UTF-8 text (byte 3)")])
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


def test_real_process_bad_input_exits_2(world, tmp_path):
    proc = phi2sum(["summarize", world["binary"], "--config", world["config"]], tmp_path)
    assert_one_error_line(proc.stderr.decode(), proc.returncode, 2, "looks binary")
    assert proc.stdout == b""
    proc = phi2sum(["summarize", "-", "--config", world["config"]], tmp_path, stdin=b"\xff\xfeT\0o\0m\0")
    assert_one_error_line(proc.stderr.decode(), proc.returncode, 2, "standard input")


@pytest.mark.parametrize("args,message", [(["push"], "Missing option '--adapter'"),
                                          (["eval", "--bogus"], "No such option: --bogus")])
def test_real_process_usage_error_exits_2(tmp_path, args, message):
    proc = phi2sum(args, tmp_path)
    assert_one_error_line(proc.stderr.decode(), proc.returncode, 2, message)
