"""Every verb against inputs nobody here wrote, as one table: each row is a command, the exit code it must end
with, the first words of what it must say, and whether a model may load before it says so. A failure is one
`error:` line that names the file (and line) and the fix, never a traceback; what works says what it did.
README's "What happens when things go wrong" lists what this table holds.

Also here: a read-only train.output_dir is refused before the model loads, and a planted Hugging Face token
never reaches anything printed or written, a `--debug` traceback included."""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, SLICE, tiny_config_dict
from phi2sum import modeling
from phi2sum.cli import app

runner = CliRunner()
DIALOG = (ROOT / "tests" / "data" / "dialog.txt").read_text(encoding="utf-8")
FAST = ["--set", "generation.max_new_tokens=4"]


def read_only_folder(tmp: Path) -> str | None:
    """A folder nobody may write into: a chmod-ed one, or (as root, whom permissions do not stop) /sys."""
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return "read-only"
    (folder / "probe").unlink()
    try:
        Path("/sys/phi2sum-probe").mkdir()
    except OSError:
        return "/sys/phi2sum"
    Path("/sys/phi2sum-probe").rmdir()
    return None


def run_copy(trained: Path, dest: Path, config: str | None) -> None:
    """The shipped files of a run (no checkpoints), with config.yaml replaced by `config` (None: none)."""
    dest.mkdir()
    for f in trained.iterdir():
        if f.is_file() and f.name != "config.yaml":
            shutil.copy(f, dest / f.name)
    if config is not None:
        (dest / "config.yaml").write_text(config)


@pytest.fixture
def world(tmp_path, monkeypatch, tiny_model, trained_run) -> dict[str, str]:
    """The inputs the rows name, as paths relative to the folder the commands run in."""
    monkeypatch.chdir(tmp_path)
    big = "".join(f"Tom: line {i} of a very long chat about the move, the boxes and the van.\n"
                  f"Ann: answer {i}, and yes, the van is booked for Friday morning.\n" for i in range(1500))
    assert len(big.encode()) > 200_000
    files = {"dialog.txt": DIALOG.encode(), "empty.txt": b"", "binary.txt": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0",
             "latin1.txt": "Zoë: très bien, merci\nTom: À demain\n".encode("latin-1"),
             "utf16.txt": DIALOG.encode("utf-16"),  # with its byte-order mark, as Notepad writes it
             "utf8bom.txt": DIALOG.encode("utf-8-sig"), "crlf.txt": DIALOG.replace("\n", "\r\n").encode(),
             "big.txt": big.encode(), "mixed/good.txt": DIALOG.encode(), "mixed/empty.txt": b"",
             "mixed/bad.txt": b"\0\0\0\0", "bad.jsonl": b'{"dialogue": "A: hi"}\n{"dialog": "B: typo"}\n',
             "afile": b"not an adapter", "junk/adapter_config.json": b"{not json",
             "typo.yaml": yaml.safe_dump({"train": {"max_stepz": 3}}).encode(),
             "wrong-type.yaml": yaml.safe_dump({"train": {"max_steps": "many"}}).encode(),
             "bad-syntax.yaml": b"train:\n  max_steps: [3\n"}
    for name, blob in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "trained").symlink_to(trained_run)  # read only: eval writes to --out
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    run_copy(trained_run, tmp_path / "corrupt-config", "model: {name: [unclosed\n")
    run_copy(trained_run, tmp_path / "empty-config", "")
    run_copy(trained_run, tmp_path / "no-generation", yaml.safe_dump({k: v for k, v in saved.items()
                                                                        if k != "generation"}))
    config = tiny_config_dict(tiny_model, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = (SLICE / "train.jsonl").read_text().splitlines()[:20]
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:19] + [lines[19][: len(lines[19]) // 2]]))
    shutil.copy(SLICE / "train.jsonl", tmp_path / "train.jsonl")
    return {"run": "trained", "ro": read_only_folder(tmp_path) or ""}


S, E, P, T, PR = "summarize", "eval", "push", "train", "prepare"
RUN = ["--adapter", "{run}"]
CFG = ["--config", "config.yaml"]
# (case, verb and arguments, exit code, first words of the message, whether a model may load first).
# A message of a failing command is its first `error:` line (or click's usage message); of a command that
# works, one of its lines.
MATRIX = [
    # Dialogue files of every kind
    ("empty file", [S, "empty.txt", *RUN], 1, "empty.txt is empty; give it a dialogue", False),
    ("binary file", [S, "binary.txt", *RUN], 1, "binary.txt looks binary (NUL bytes", False),
    ("non-UTF-8 file", [S, "latin1.txt", *RUN], 1, "latin1.txt: not UTF-8 text (byte 2); re-save it as UTF-8",
     False),
    ("UTF-16 with BOM", [S, "utf16.txt", *RUN, *FAST], 0, "utf16.txt: read as utf-16", True),
    ("UTF-8 with BOM", [S, "utf8bom.txt", *RUN, *FAST], 0, "utf8bom.txt", True),
    ("CRLF line ends", [S, "crlf.txt", *RUN, *FAST], 0, "crlf.txt", True),
    ("200 KB dialogue", [S, "big.txt", *RUN, *FAST], 0,
     "warning: big.txt is longer than generation.max_input_tokens", True),
    ("folder of good and bad", [S, "mixed", *RUN, *FAST], 1, "mixed/bad.txt looks binary", True),
    (".jsonl with a bad line", [S, "bad.jsonl", *RUN], 2, "bad.jsonl line 2: expected a JSON object", False),
    ("missing input", [S, "nowhere.txt", *RUN], 2, "nowhere.txt not found; pass a text file", False),
    # --out
    ("--out in a missing folder", [S, "dialog.txt", *RUN, *FAST, "--out", "new/folder/s.jsonl"], 0,
     "wrote 1 summaries to new/folder/s.jsonl", True),
    ("--out in a read-only folder", [S, "dialog.txt", *RUN, "--out", "{ro}/s.jsonl"], 2,
     "cannot write --out {ro}/s.jsonl (", False),
    ("--out under a file", [S, "dialog.txt", *RUN, "--out", "afile/s.jsonl"], 2,
     "cannot write --out afile/s.jsonl: afile is a file, not a folder", False),
    ("--out is an input", [S, "dialog.txt", *RUN, "--out", "dialog.txt"], 2, "--out dialog.txt is one of the inputs",
     False),
    ("--out is a folder", [S, "dialog.txt", *RUN, "--out", "empty-dir"], 2, "--out empty-dir is a folder", False),
    # Adapters that are not adapters
    ("adapter: empty folder", [S, "dialog.txt", "--adapter", "empty-dir"], 2,
     "empty-dir is not an adapter or run directory", False),
    ("adapter: a file", [S, "dialog.txt", "--adapter", "afile"], 2, "afile is not an adapter or run directory", False),
    ("adapter: junk adapter_config.json", [S, "dialog.txt", "--adapter", "junk"], 2,
     "junk/adapter_config.json is not a PEFT adapter config", False),
    ("eval adapter: empty folder", [E, "--adapter", "empty-dir", *CFG], 2,
     "empty-dir is not an adapter or run directory", False),
    ("eval adapter: junk adapter_config.json", [E, "--adapter", "junk", *CFG], 2,
     "junk/adapter_config.json is not a PEFT adapter config", False),
    ("push adapter: empty folder", [P, "--adapter", "empty-dir", "--dry-run", "staged"], 2,
     "empty-dir is not a run directory", False),
    ("push adapter: junk adapter_config.json", [P, "--adapter", "junk", "--dry-run", "staged"], 2,
     "junk/adapter_config.json is not a PEFT adapter config", False),
    ("merge adapter: a file", ["merge", "--adapter", "afile", "--out", "merged"], 2, "afile is not a run directory",
     False),
    ("merge adapter: junk adapter_config.json", ["merge", "--adapter", "junk", "--out", "merged"], 2,
     "junk/adapter_config.json is not a PEFT adapter config", False),
    # A run folder whose config.yaml is not whole
    ("run config corrupt", [E, "--adapter", "corrupt-config"], 2, "corrupt-config/config.yaml cannot be read as YAML",
     False),
    ("run config empty", [S, "dialog.txt", "--adapter", "empty-config"], 2,
     "empty-config/config.yaml is incomplete (no model, lora, data, train, generation, eval, push section)", False),
    ("run config without a section", [P, "--adapter", "no-generation", "--dry-run", "staged"], 2,
     "no-generation/config.yaml is incomplete (no generation section)", False),
    # eval --limit
    ("eval --limit 0", [E, *RUN, "--limit", "0"], 2, "Invalid value for '--limit'",
     False),
    ("eval --limit -1", [E, *RUN, "--limit", "-1"], 2, "Invalid value for '--limit'",
     False),
    ("eval --limit beyond the split", [E, *RUN, "--limit", "999", "--compare", "none", "--out", "scores", *FAST], 0,
     "predictions and metrics: scores", True),
    # Data files
    ("prepare: last .jsonl line cut off", [PR, *CFG, "--set", "data.files.train=cut.jsonl"], 2,
     "cut.jsonl line 20: not valid JSON", False),
    ("prepare: ... skip_bad_lines", [PR, *CFG, "--set", "data.files.train=cut.jsonl", "--set",
                                     "data.skip_bad_lines=true"], 0,
     "warning: cut.jsonl: skipped 1 bad line(s) (data.skip_bad_lines): 20", False),
    ("prepare: data.source is a file", [PR, *CFG, "--set", "data.source=train.jsonl"], 2,
     "data.source train.jsonl is a file, but it takes a folder of split files or a hub id; name files per split "
     "instead: data.files.train: train.jsonl", False),
    # Config errors
    ("unknown field via --set", [T, *CFG, "--set", "train.max_stepz=3"], 2, "--set: train.max_stepz: unknown field",
     False),
    ("unknown field in YAML", [T, "--config", "typo.yaml"], 2, "typo.yaml: train.max_stepz: unknown field", False),
    ("wrong type via --set", [T, *CFG, "--set", "train.max_steps=many"], 2,
     "--set: train.max_steps: Input should be a valid integer", False),
    ("wrong type in YAML", [T, "--config", "wrong-type.yaml"], 2,
     "wrong-type.yaml: train.max_steps: Input should be a valid integer", False),
    ("--set without =", [T, *CFG, "--set", "train.max_steps"], 2,
     "--set 'train.max_steps': expected section.field=value", False),
    ("YAML syntax error", [T, "--config", "bad-syntax.yaml"], 2, "bad-syntax.yaml line 3: not valid YAML", False),
    ("config file missing", [T, "--config", "nope.yaml"], 2, "config file nope.yaml not found", False),
    ("fields that contradict", [T, *CFG, "--set", "train.save_every=2"], 2,
     "config.yaml: train.save_every (2) must be a multiple of train.eval_every (3)", False),
    ("--resume --overwrite", [T, *CFG, "--resume", "--overwrite"], 2,
     "--resume continues the run in train.output_dir and --overwrite deletes it; pass one", False),
    ("read-only train.output_dir", [T, *CFG, "--set", "train.output_dir={ro}/run"], 2,
     "cannot write to train.output_dir {ro}/run (", False),
]


def message(output: str) -> str | None:
    """The first `error:` line, or the message in Typer's box around a click usage error."""
    for line in output.splitlines():
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    boxed = [line.strip("│ ") for line in output.splitlines() if line.startswith("│")]
    return boxed[0] if boxed else None


@pytest.mark.parametrize("case,args,code,first_words,loads", MATRIX, ids=[row[0] for row in MATRIX])
def test_matrix(world, monkeypatch, case, args, code, first_words, loads):
    if "{ro}" in " ".join(args) and not world["ro"]:
        pytest.skip("no read-only folder on this machine")
    if not loads:
        monkeypatch.setattr(modeling, "load_base", lambda *a, **k: pytest.fail("a model loaded before the error"))
    args = [a.format(**world) for a in args]
    first_words = first_words.format(**world)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == code, output
    assert "Traceback" not in output and isinstance(result.exception, (SystemExit, type(None))), output
    if code == 0:
        assert any(line.startswith(first_words) for line in output.splitlines()), output
    else:
        assert (message(output) or "").startswith(first_words), output
    if code == 2:  # bad usage: one line, nothing else
        assert len([x for x in output.splitlines() if x.startswith("error:")]) <= 1, output
    if case in THEN:
        THEN[case](Path.cwd(), output)


def _mixed(cwd: Path, output: str) -> None:
    errors = [x for x in output.splitlines() if x.startswith("error:")]
    assert errors[1].startswith("error: mixed/empty.txt is empty") and "2 input(s) could not be summarized" in errors[2]
    assert "mixed/good.txt" in output.splitlines()  # the good one was summarized


def _all_scored(cwd: Path, output: str) -> None:
    metrics = json.loads((cwd / "scores" / "metrics.json").read_text())
    rows = yaml.safe_load((cwd / "trained" / "config.yaml").read_text())["data"]["max_rows"]["test"]
    dialogues = {json.loads(x)["dialogue"] for x in (SLICE / "test.jsonl").read_text().splitlines()[:rows]}
    assert metrics["n_dialogues"] == len(dialogues)  # every test dialogue of the run's data settings


def _created(cwd: Path, output: str) -> None:
    [row] = [json.loads(x) for x in (cwd / "new" / "folder" / "s.jsonl").read_text().splitlines()]
    assert row["id"] == "dialog.txt" and isinstance(row["summary"], str)


# What some rows also hold, beyond the first words.
THEN = {"folder of good and bad": _mixed, "eval --limit beyond the split": _all_scored,
        "--out in a missing folder": _created}


# ----------------------------------------------------------------------------------------------------
# Secrets

TOKEN = "hf_plantedIssue27SecretT0kenXq9"


def test_a_planted_hub_token_reaches_nothing_printed_or_written(world, tmp_path, monkeypatch, capfd):
    """HF_TOKEN is set for every verb; the token is in no byte printed (CliRunner's streams and the real file
    descriptors, where library loggers write), in no file under tmp_path (run, metrics, config.yaml, predictions,
    summaries, the staged card, the merged model) and in no `--debug` traceback of a refused push."""
    from huggingface_hub import constants

    from hub_server import FakeHub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    printed: list[bytes] = []

    def phi2sum(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        printed.append(result.stdout_bytes + result.stderr_bytes)
        if result.exc_info and not isinstance(result.exception, SystemExit):  # what Python prints under --debug
            printed.append("".join(traceback.format_exception(*result.exc_info)).encode())
        assert result.exit_code == code, result.output
        return result

    small = ["--set", "train.max_steps=2", "--set", "train.output_dir=secret-run"]
    phi2sum("prepare", *CFG)
    phi2sum("train", *CFG, *small, "--dry-run")
    phi2sum("train", *CFG, *small)
    phi2sum("eval", "--adapter", "secret-run", "--limit", "2", "--compare", "none", "--out", "scores", *FAST)
    phi2sum("summarize", "dialog.txt", "--adapter", "secret-run", "--out", "summaries.jsonl", *FAST)
    phi2sum("push", "--adapter", "secret-run", "--repo", "me/secret", "--eval-dir", "scores", "--dry-run", "staged")
    phi2sum("merge", "--adapter", "secret-run", "--out", "merged")
    phi2sum("config", "show", *CFG)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        phi2sum("push", "--adapter", "secret-run", "--repo", "me/secret", "--eval-dir", "scores")
        hub.fail["create"] = 403
        refused = phi2sum("push", "--adapter", "secret-run", "--repo", "someone/else", "--debug", code=1)
    assert refused.exc_info is not None and "403" in str(refused.exception)  # the traceback was checked too
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # the token was in use

    out, err = capfd.readouterr()
    printed.append(out.encode() + err.encode())
    for blob in printed:
        assert TOKEN.encode() not in blob and TOKEN[3:].encode() not in blob
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert {"secret-run/config.yaml", "secret-run/metrics.jsonl", "scores/metrics.json", "summaries.jsonl",
            "staged/README.md"} <= {p.relative_to(tmp_path).as_posix() for p in files}
    for path in files:
        assert TOKEN[3:].encode() not in path.read_bytes(), path
