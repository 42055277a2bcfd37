"""`phi2sum summarize corpus.jsonl --out out.jsonl` at corpus scale: each batch's summaries are appended as the
batch finishes, so a process killed mid-run (SIGKILL: no chance to clean up) loses at most the batch in flight,
and running the same command again summarizes only what is missing. In the end every id is in the file exactly
once, and the file holds nothing but whole JSON lines. Under torchrun the processes split the corpus, each
writing a part file that the main process appends to --out at the end (or the next run, after a kill)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ONE_THREAD, ROOT, SLICE, sigkill_when, torchrun, torchrun_worker
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


# ----------------------------------------------------------------------------------------------------
# Several processes


def lines(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_merging_part_files_keeps_every_id_once_whatever_a_kill_left(tmp_path):
    """What the main process finds after a kill: --out and the processes' part files, each maybe ending in a
    line cut short, and (killed while merging) ids already appended to --out still in a part."""
    out = tmp_path / "out.jsonl"
    row = {i: {"id": i, "source": f"c:{i}", "summary": f"s{i}", "run_on": False} for i in "abcdef"}
    out.write_text(lines(row["a"], row["b"]) + '{"id": "c", "sou')
    summarize.part_file(out, 0).write_text(lines(row["b"], row["c"], row["d"]) + '{"id": "e"')
    summarize.part_file(out, 1).write_text(lines(row["e"], row["f"]).rstrip("\n"))  # the newline never made it
    (tmp_path / "out.jsonl.part-notes").write_text(lines({"id": "x"}))  # not a part file: someone's own
    assert summarize.merge_parts(out) == set("abcdef")
    assert written(out) == [row[i] for i in "abcdef"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.part-notes"]
    assert summarize.merge_parts(out) == set("abcdef") and written(out) == [row[i] for i in "abcdef"]


@pytest.fixture(scope="module")
def corpus(trained_run, tmp_path_factory) -> tuple[Path, list[str], dict]:
    """The corpus, its ids in order, and its summaries by id from one process (the greedy reference)."""
    folder = tmp_path_factory.mktemp("corpus")
    ids = write_corpus(folder / "corpus.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # ids of rows without one are file:line, the file as given
        result = runner.invoke(app, ["summarize", "corpus.jsonl", "--adapter", str(trained_run),
                                     "--out", "one.jsonl", *SETTINGS])
    assert result.exit_code == 0, result.output
    return folder / "corpus.jsonl", ids, {r["id"]: r for r in written(folder / "one.jsonl")}


def test_two_processes_killed_midway_and_run_again_write_each_summary_once(trained_run, corpus, tmp_path):
    """torchrun, 2 processes: rank 1 is SIGKILLed once its part file holds a batch (torchrun then stops rank 0).
    The same command again appends the parts to --out, splits what is left and ends with every id once,
    each summary as one process wrote it."""
    src, _, one = corpus
    shutil.copy(src, tmp_path / "corpus.jsonl")
    args = ["summarize", "corpus.jsonl", "--adapter", str(trained_run), "--out", "out.jsonl", *SETTINGS]
    out, parts = tmp_path / "out.jsonl", [tmp_path / "out.jsonl.part-0", tmp_path / "out.jsonl.part-1"]
    with open(tmp_path / "first.log", "w") as log:
        child = subprocess.Popen(torchrun(2, *args), cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    sigkill_when(child, lambda: parts[1].is_file() and parts[1].stat().st_size > 0, tmp_path / "first.log",
                 poll=0.002, victim=lambda: torchrun_worker(child, 1))

    assert out.read_text() == ""  # the main process merges only once all are done
    first = [r for p in parts if p.is_file() for r in map(json.loads, p.read_text().splitlines())]
    assert 2 <= len(first) < DIALOGUES and len({r["id"] for r in first}) == len(first)
    with open(parts[0], "a", encoding="utf-8") as fh:  # as if rank 0 had been killed mid-write
        fh.write('{"id": "' + first[0]["id"] + '", "sou')

    again = subprocess.run(torchrun(2, *args), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stderr.split())
    assert said.count(f"already holds {len(first)} of these summaries; summarizing the other "
                      f"{DIALOGUES - len(first)}") == 1  # the main process says it, once
    assert f"wrote {DIALOGUES - len(first)} summaries to out.jsonl" in said
    final = written(out)
    assert sorted(r["id"] for r in final) == sorted(one)  # every id, exactly once
    assert final[: len(first)] == first  # the killed run's summaries come first, as they were
    assert {r["id"]: r for r in final} == one  # greedy: what one process writes
    assert sorted(p.name for p in tmp_path.glob("out.jsonl*")) == ["out.jsonl"]


def test_two_processes_without_out_print_every_summary_once_in_input_order(trained_run, corpus):
    src, ids, one = corpus
    result = subprocess.run(torchrun(2, "summarize", src.name, "--adapter", str(trained_run), *SETTINGS),
                            cwd=src.parent, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "".join(one[i]["summary"] + "\n" for i in ids)
