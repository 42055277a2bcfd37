"""`phi2sum summarize corpus.jsonl --out out.jsonl` at corpus scale: each batch's summaries are appended as the
batch finishes, so a process killed mid-run (SIGKILL: no chance to clean up) loses at most the batch in flight,
and running the same command again summarizes only what is missing. In the end every id is in the file exactly
once, and the file holds nothing but whole JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ONE_THREAD, ROOT, SLICE, sigkill_when
from phi2sum import summarize
from phi2sum.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # as the launched processes (ONE_THREAD): ~10x faster here
runner = CliRunner()
DIALOGUES = 60
# Small batches, short summaries: the run takes a few seconds, its first batch lands long before the last.
SETTINGS = ["--set", "generation.batch_size=2", "--set", "generation.max_new_tokens=4",
            "--set", "generation.device=cpu"]
# The checkout's phi2sum in the child processes (they run in a test folder, not here).
ENV = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                                 "PYTHONWARNINGS": "ignore"}


def write_corpus(path: Path) -> list[str]:
    """DIALOGUES rows of the DialogSum slice; every third without an id (its id is then file:line)."""
    rows = [json.loads(line) for line in (SLICE / "train.jsonl").read_text().splitlines()[:DIALOGUES]]
    lines, ids = [], []
    for n, row in enumerate(rows, 1):
        if n % 3:
            lines.append(json.dumps({"id": row["id"], "dialogue": row["dialogue"]}))
            ids.append(row["id"])
        else:
            lines.append(json.dumps({"dialogue": row["dialogue"]}))
            ids.append(f"{path.name}:{n}")
    path.write_text("\n".join(lines) + "\n")
    return ids


def written(out: Path) -> list[dict]:
    """The summaries in --out; fails on anything that is not a whole JSON line."""
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def test_a_killed_corpus_run_resumes_and_writes_every_id_exactly_once(trained_run, tmp_path, monkeypatch):
    ids = write_corpus(tmp_path / "corpus.jsonl")
    args = ["summarize", "corpus.jsonl", "--adapter", str(trained_run), "--out", "out.jsonl", *SETTINGS]
    out = tmp_path / "out.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "phi2sum", *args], cwd=tmp_path, env=ENV, stdout=log,
                                 stderr=subprocess.STDOUT)
    sigkill_when(child, lambda: out.is_file() and out.stat().st_size > 0, tmp_path / "first.log", poll=0.002)

    first = written(out)
    assert 2 <= len(first) < DIALOGUES, len(first)  # killed mid-run, after at least one whole batch
    assert {r["id"] for r in first} <= set(ids) and len({r["id"] for r in first}) == len(first)
    # A kill in the middle of a write leaves a line cut short; the rerun must drop it, not keep or duplicate it.
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"id": "' + ids[-1] + '", "source": "corpus.jsonl:60", "summ')

    monkeypatch.chdir(tmp_path)
    again = runner.invoke(app, args)  # the same command
    assert again.exit_code == 0, again.output
    output = " ".join(again.output.split())
    assert f"already holds {len(first)} of these summaries; summarizing the other {DIALOGUES - len(first)}" in output
    assert f"wrote {DIALOGUES - len(first)} summaries to out.jsonl" in output

    final = written(out)
    assert sorted(r["id"] for r in final) == sorted(ids)  # every id, exactly once
    assert final[: len(first)] == first  # what the killed run wrote is kept as it was
    assert all(set(r) == {"id", "source", "summary", "run_on"} and isinstance(r["summary"], str) for r in final)

    # Once everything is written, the same command again loads no model and changes nothing.
    monkeypatch.setattr(summarize, "load_for_inference", lambda *a: pytest.fail("loaded a model with nothing to do"))
    before = out.read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert out.read_bytes() == before
