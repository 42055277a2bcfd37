"""Training survives what happens to long runs: Ctrl-C, SIGTERM from a scheduler, SIGKILL at any moment,
a disk that fills up during a checkpoint. Every test ends by resuming and checking that the adapter is
the one an uninterrupted run produces."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ONE_THREAD, tiny_config_dict
from phi2sum import checkpoint
from phi2sum import train as train_mod
from phi2sum.cli import app
from phi2sum.config import load_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
# LoRA dropout on, so a resume that lost the RNG state would drift; eval and keep_best on, so the
# resumed run must also agree about the best step.
SECTIONS = dict(lora={"dropout": 0.1},
                train={"max_steps": 20, "learning_rate": 1e-2, "eval_every": 2, "save_every": 2,
                       "keep_best": True, "keep_checkpoints": 2})


def write_config(tmp: Path, model_dir: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(model_dir, tmp, **SECTIONS)))
    return path


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


def assert_same_adapter(run: Path, reference: Path) -> None:
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def last_step(run: Path) -> int:
    """The newest optimizer step in metrics.jsonl (0 before the first); tolerates a line being written."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps)


def start_training(tmp: Path, config: Path, log: Path, *args: str) -> subprocess.Popen:
    env = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:  # a file, not a pipe: nobody has to drain it while we wait
        return subprocess.Popen([sys.executable, "-m", "phi2sum", "train", "--config", str(config), *args],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_step(child: subprocess.Popen, run: Path, beyond: int, log: Path, timeout: float = 180) -> bool:
    """Poll until the child logs a step past `beyond`; False if it exited first."""
    deadline = time.monotonic() + timeout
    while last_step(run) <= beyond:
        if child.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no progress past step {beyond}:\n{log.read_text()}"
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> Path:
    """The uninterrupted run every interrupted one must match."""
    tmp = tmp_path_factory.mktemp("reference")
    result = train_mod.train(load_config(write_config(tmp, tiny_model)))
    assert result.stopped == "finished" and result.steps == 20
    return tmp / "run"


# Harmless overrides (the defaults' values, one with spaces to quote) that the printed resume command must keep.
SETS = ("--set", "data.instruction=Summarize the following conversation.", "--set", "train.max_bad_steps=10")


def test_sigint_and_sigterm_save_a_checkpoint_and_print_the_command_that_resumes(tmp_path, tiny_model, reference):
    """Ctrl-C or a scheduler's SIGTERM: the step finishes, a checkpoint is written, exit 130, and one line gives
    the command that continues: the user's own command line (every --set kept, --overwrite dropped) with
    --resume. Running that command ends with the uninterrupted run's adapter."""
    # Both children run at once (separate folders, one thread each): half the wall time of one after the other.
    children = {}
    for sig, extra in ((signal.SIGINT, SETS), (signal.SIGTERM, ("--overwrite", *SETS))):
        tmp = tmp_path / sig.name
        config = write_config(tmp, tiny_model)
        children[sig] = (tmp, config, start_training(tmp, config, tmp / "train.log", *extra))
    try:
        for sig, (tmp, _, child) in children.items():
            assert wait_for_step(child, tmp / "run", 0, tmp / "train.log"), (tmp / "train.log").read_text()
            child.send_signal(sig)
        codes = {sig: child.wait(timeout=120) for sig, (_, _, child) in children.items()}
    finally:
        for _, _, child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()

    for sig, (tmp, config, _) in children.items():
        run, output = tmp / "run", (tmp / "train.log").read_text()
        assert codes[sig] == 130, (sig.name, output)
        assert "Traceback" not in output
        [line] = error_lines(output)
        step = int(line.split("interrupted at step ")[1].split(";")[0])
        assert 1 <= step < 20
        assert checkpoint.is_valid(run / "checkpoints" / f"step-{step:08d}")
        assert json.loads((run / "summary.json").read_text())["stopped"] == "interrupted"

        command = shlex.split(line.split("Continue with: ")[1])
        assert command[:2] == ["phi2sum", "train"]
        assert command[2:] == ["--config", str(config), *SETS, "--resume"]
        resumed = runner.invoke(app, command[1:])
        assert resumed.exit_code == 0, resumed.output
        assert "20/20 (finished)" in resumed.output
        assert_same_adapter(run, reference)


def test_random_sigkills_then_resume_match_an_uninterrupted_run(tmp_path, tiny_model, reference):
    rng = random.Random(20240611)
    config = write_config(tmp_path, tiny_model)
    run = tmp_path / "run"
    seen, kills = 0, []
    for attempt in range(2):
        log = tmp_path / f"attempt{attempt}.log"
        child = start_training(tmp_path, config, log, "--resume")
        try:
            # Let it get past the furthest point so far, then kill it somewhere in the next few steps:
            # mid-step, mid-evaluation or mid-checkpoint, wherever the random delay lands.
            assert wait_for_step(child, run, seen, log), log.read_text()
            time.sleep(rng.uniform(0.0, 0.3))
            child.send_signal(signal.SIGKILL)
            code = child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert code == -signal.SIGKILL, log.read_text()
        seen = last_step(run)
        kills.append(seen)
    assert seen < 20, kills  # both kills hit a running loop

    resumed = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "20/20 (finished)" in resumed.output
    assert_same_adapter(run, reference)
    assert_same_adapter(run / "best", reference / "best")
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 21))  # the log reads as one run
    assert not list((run / "checkpoints").glob(".tmp-*"))


def fail_in_checkpoint_4(real, error):
    """`real`, except that it raises (a copy of) `error` when it writes into the folder of checkpoint 4. A copy:
    the parameter itself would keep the failed run's frames alive through its __traceback__."""

    def write(*args, **kwargs):
        if any(isinstance(a, (str, Path)) and "step-00000004" in str(a) for a in args):
            raise type(error)(*error.args)
        return real(*args, **kwargs)

    return write


def full_disk_errors():
    from safetensors import SafetensorError
    from safetensors import torch as safetensors_torch

    # What each writer really raises on a full disk (checked on a 64 KiB tmpfs).
    return [(torch, "save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
            (safetensors_torch, "save_file",
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
            (Path, "write_text", OSError(errno.ENOSPC, "No space left on device"))]


@pytest.mark.parametrize("owner, name, error", full_disk_errors(), ids=["state.pt", "weights", "trainer.json"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(owner, name, error, tmp_path, tiny_model,
                                                              reference, monkeypatch):
    config = write_config(tmp_path, tiny_model)
    run = tmp_path / "run"
    monkeypatch.setattr(owner, name, fail_in_checkpoint_4(getattr(owner, name), error))
    result = runner.invoke(app, ["train", "--config", str(config)])
    monkeypatch.undo()

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "could not write checkpoint" in lines[0] and "step-00000004" in lines[0]
    assert type(error).__name__ in lines[0] and "disk full" in lines[0] and "--resume" in lines[0]
    assert re.search(r"It needs about [\d,]+ MiB in .*checkpoints, [\d,]+ MiB free", lines[0]), lines[0]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # no partial folder left
    assert checkpoint.is_valid(ckpts / "step-00000002")

    # Resume, as a user would after freeing space: the failed run released its lock.
    resumed = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter(run, reference)
