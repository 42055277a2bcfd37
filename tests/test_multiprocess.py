"""Several processes, through the launcher users run (torchrun; `accelerate launch` sets the same
environment), on the CPU with the gloo backend: the distributed code paths of train and eval, not only
their single-process branch. Two processes on a 2-core machine: slow-ish, so two launches, compared with
one-process runs made in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config_dict, torchrun


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(torchrun(nproc, *args), capture_output=True, text=True, env=env, timeout=300)


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("mp")
    raw = tiny_config_dict(tiny_model, tmp, train={"max_steps": 6, "save_every": 3, "eval_every": 3, "keep_best": False})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp


@pytest.fixture(scope="module")
def whole(world) -> Path:
    """The 1-process reference (in this process, one thread as the launched ones: the same float sums)."""
    from phi2sum.config import load_config
    from phi2sum.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(load_config(world / "cfg.yaml", [f"train.output_dir={world / 'whole'}"])).steps == 6
    finally:
        torch.set_num_threads(before)
    return world / "whole"


def test_two_processes_match_one_and_resume_with_one(world, whole, capsys):
    """2 processes train 6 steps (data sharded, gradients averaged, one writer) and match a 1-process run
    with the same rows per step: the loss is normalised by the global summary-token count, so the process
    count does not change the gradient. Then one process resumes the 2-process run from its step-3
    checkpoint and ends with the same adapter again."""
    from phi2sum.config import load_config
    from phi2sum.train import train

    cfg = str(world / "cfg.yaml")  # batch 4 x grad_accum 2: 8 rows per step
    # Two processes with grad_accum 1 take the same 8 rows per step (how users keep the global batch).
    two = launch(2, "train", "--config", cfg, "--set", f"train.output_dir={world / 'split'}", "--set", "train.grad_accum=1")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((world / "split" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6

    def train_log(run):
        return [r for r in map(json.loads, (world / run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    assert [r["step"] for r in train_log("split")] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicate lines
    for a, b in zip(train_log("split"), train_log("whole")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    def same_adapter(run):
        a, b = adapter(world / run / "adapter_model.safetensors"), adapter(whole / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k

    same_adapter("split")
    # Back to step 3 of the 2-process run, resumed by one process with the 2-process command's grad_accum:
    # the run's rows per step are kept (grad_accum adapted), so the end is the same adapter.
    shutil.copytree(world / "split", world / "resumed")
    shutil.rmtree(world / "resumed" / "checkpoints" / "step-00000006")
    capsys.readouterr()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(cfg, [f"train.output_dir={world / 'resumed'}", "train.grad_accum=1"]), resume=True)
    finally:
        torch.set_num_threads(before)
    said = " ".join(capsys.readouterr().err.split())
    assert "resuming from" in said and "step 3 of 6" in said and "train.grad_accum 1 -> 2" in said
    same_adapter("resumed")
    assert yaml.safe_load((world / "resumed" / "config.yaml").read_text())["train"]["grad_accum"] == 2  # as run


def test_eval_split_across_two_processes_returns_every_dialogue_in_order(world, whole):
    """Each process generates half of the test split; the main one gathers, scores and writes. Same
    predictions, same order, same scores as one process (fp32 CPU: batch composition cannot matter)."""
    from typer.testing import CliRunner

    from phi2sum.cli import app

    one = CliRunner().invoke(app, ["eval", "--adapter", str(whole), "--compare", "none", "--out", str(world / "ev1")])
    two = launch(2, "eval", "--adapter", str(whole), "--compare", "none", "--out", str(world / "ev2"))
    assert one.exit_code == 0, one.output
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("ROUGE F1 on test") == 1  # only the main process prints the table
    rows = [[json.loads(x) for x in (world / d / "predictions.jsonl").read_text().splitlines()] for d in ("ev1", "ev2")]
    assert [r["id"] for r in rows[1]] == [r["id"] for r in rows[0]] == [f"test_{i}" for i in range(6)]
    assert [r["prediction"] for r in rows[1]] == [r["prediction"] for r in rows[0]]
    m1, m2 = (json.loads((world / d / "metrics.json").read_text()) for d in ("ev1", "ev2"))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["models"]["fine-tuned"]["rouge1"]["mean"] == m1["models"]["fine-tuned"]["rouge1"]["mean"]
