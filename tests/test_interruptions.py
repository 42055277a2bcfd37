"""Interruptions, full disks and two processes at once lose nothing.

- `python -m phi2sum train` stopped by SIGKILL, SIGTERM and Ctrl-C (SIGINT) at seeded random moments (the SIGKILL
  in the middle of a checkpoint write, one of the others in the middle of validation) and resumed with `--resume`
  each time ships the adapter an uninterrupted run ships, bit for bit (fp32, CPU, one thread). The schedule is
  seeded (SEED): a failure names it, and the same seed replays it. A second Ctrl-C aborts at once.
- An eval stopped halfway leaves no metrics.json that `push` would publish as its scores.
- A disk that fills up while a checkpoint or the best adapter is written leaves what was there and says where.
- A second `train` on a run folder in use is refused; two `prepare` runs sharing a cache make one valid cache.

tests/test_faults.py has the neighbours: each checkpoint writer failing on a full disk, SIGKILLs at random delays,
the printed resume command."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
SEED = 27
STEPS = 20
EVAL_EVERY = 2  # and a checkpoint with each validation
# LoRA dropout on, so a resume that lost the random state would drift; validation and keep_best on, so the
# resumed run must also agree on the best step; 24 validation rows, so validation lasts long enough to be
# interrupted in.
SECTIONS = dict(lora={"dropout": 0.1},
                data={"max_rows": {"train": 48, "validation": 24, "test": 6}},
                train={"max_steps": STEPS, "learning_rate": 1e-2, "eval_every": EVAL_EVERY, "save_every": EVAL_EVERY,
                       "keep_best": True, "keep_checkpoints": 2, "eval_max_rows": 24})


def schedule(rng: random.Random) -> list[tuple[signal.Signals, str]]:
    """Each signal once, in a seeded order: SIGKILL in the middle of a checkpoint write (the one moment a kill
    could damage something), SIGTERM and Ctrl-C one in the middle of validation and one at a random moment."""
    graceful = rng.sample(["validation", "random"], 2)
    plan = [(signal.SIGKILL, "checkpoint write"), (signal.SIGTERM, graceful[0]), (signal.SIGINT, graceful[1])]
    return rng.sample(plan, len(plan))


def write_config(tmp: Path, model_dir: Path, cache: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(model_dir, tmp, **SECTIONS)
    raw["data"]["cache_dir"] = str(cache)  # one tokenized cache for every run here
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


_seen: dict[Path, tuple] = {}


def rows(run: Path) -> list[dict]:
    """metrics.jsonl as far as it is written (a line being appended is left out); parsed again only when it
    changed, so polling it every millisecond costs the children nothing."""
    path = run / "metrics.jsonl"
    try:
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        if _seen.get(path, (None,))[0] != key:
            out = []
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
            _seen[path] = (key, out)
    except FileNotFoundError:
        return []
    return _seen[path][1]


def validating(run: Path, step: int) -> int | None:
    """The step (`step` or later) whose train row is logged and whose validation row is not: validation of it
    is running."""
    logged = {(r["kind"], r["step"]) for r in rows(run)}
    running = [s for kind, s in logged
               if kind == "train" and s >= step and s % EVAL_EVERY == 0 and ("eval", s) not in logged]
    return max(running, default=None)


def writing_checkpoint(run: Path, step: int, stale: set[str]) -> int | None:
    """The step (`step` or later) whose checkpoint is being written (its temporary folder exists)."""
    names = {p.name for p in (run / "checkpoints").glob(f".tmp-{checkpoint.PREFIX}*")} - stale
    steps = [int(n.removeprefix(f".tmp-{checkpoint.PREFIX}")[:8]) for n in names]
    return max((s for s in steps if s >= step), default=None)


def reached(run: Path, step: int) -> int | None:
    return next((r["step"] for r in rows(run) if r["kind"] == "train" and r["step"] >= step), None)


def newest_checkpoint(run: Path) -> int:
    found = checkpoint.latest(run) if (run / "checkpoints").is_dir() else None
    return int(found.name.removeprefix(checkpoint.PREFIX)) if found else 0


def wait_for(child: subprocess.Popen, ready, log: Path, every: float = 0.001, timeout: float = 120.0):
    """Poll `ready()` until it returns something; that."""
    deadline = time.monotonic() + timeout
    while (found := ready()) is None:
        assert child.poll() is None, f"the run ended before the moment came:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(every)
    return found


def start_training(tmp: Path, config: Path, log: Path) -> subprocess.Popen:
    env = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as out:  # a file, not a pipe: nobody has to drain it while we wait
        return subprocess.Popen([sys.executable, "-m", "phi2sum", "train", "--config", str(config), "--resume"],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)


def interrupt(tmp: Path, config: Path, attempt: int, sig: signal.Signals, moment: str, step: int,
              delay: float) -> str:
    """Start (or resume) the run, send `sig` at `moment` of `step` (or of the next step with one, should this
    poll miss it), wait for the end; what happened, in words."""
    run, log = tmp / "run", tmp / f"attempt{attempt}.log"
    stale = {p.name for p in (run / "checkpoints").glob(".tmp-*")}  # a killed attempt's, until the next save
    child = start_training(tmp, config, log)
    try:
        # Until the run has loaded and cut metrics.jsonl back to its checkpoint, the file is the last attempt's.
        wait_for(child, lambda: True if "model: " in log.read_text() else None, log, every=0.02)
        if moment == "checkpoint write":
            step = wait_for(child, lambda: writing_checkpoint(run, step, stale), log)
        elif moment == "validation":
            step = wait_for(child, lambda: validating(run, step), log)
        else:
            step = wait_for(child, lambda: reached(run, step), log)
            time.sleep(delay)
        child.send_signal(sig)
        code = child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    output = log.read_text()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, output
        # The kill landed where it was aimed: a half-written checkpoint folder, or a step without its validation.
        if moment == "checkpoint write":
            assert writing_checkpoint(run, step, stale) == step, f"checkpoint {step} was finished before the kill"
        if moment == "validation":
            assert validating(run, step) == step, f"validation of step {step} was finished before the kill"
    else:  # the step finishes, a checkpoint is written, exit 130 with the resume command
        assert code == 130, output
        assert "Traceback" not in output and "interrupted at step" in output and "--resume" in output, output
        stopped = int(output.split("interrupted at step ")[1].split(";")[0])
        assert stopped >= step and checkpoint.is_valid(run / "checkpoints" / f"{checkpoint.PREFIX}{stopped:08d}")
        if moment == "validation":  # the validation the signal came in finished before the stop
            assert validating(run, step) is None
    return f"{sig.name} at {moment} of step {step}"


def interrupted_run(tmp: Path, config: Path, plan: list, rng: random.Random) -> list[str]:
    """Interrupt one run as `plan` says, resuming it each time; what happened, in words."""
    done: list[str] = []
    for attempt, (sig, moment) in enumerate(plan):
        base = newest_checkpoint(tmp / "run")  # where this attempt resumes from
        if moment == "random":
            step, delay = base + rng.randint(1, 3), rng.uniform(0.0, 0.3)
        else:
            step, delay = base + EVAL_EVERY * rng.randint(1, 2), 0.0
        assert step < STEPS - 2, done
        done.append(interrupt(tmp, config, attempt, sig, moment, step, delay))
    return done


def test_random_interruptions_then_resume_match_an_uninterrupted_run(tmp_path, tiny_model):
    """One run interrupted as `schedule` says (in a thread, while this process trains the uninterrupted run), then
    resumed to the end and compared with it."""
    rng = random.Random(SEED)
    plan = schedule(rng)
    cache = tmp_path / "cache"  # both runs prepare it at once: one publishes, the other keeps its copy
    config = write_config(tmp_path / "interrupted", tiny_model, cache)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(interrupted_run, tmp_path / "interrupted", config, plan, rng)
        train_mod.train(load_config(write_config(tmp_path / "uninterrupted", tiny_model, cache)))
        done = job.result()
    run, reference = tmp_path / "interrupted" / "run", tmp_path / "uninterrupted" / "run"

    resumed = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, (done, resumed.output)
    assert f"{STEPS}/{STEPS} (finished)" in resumed.output
    for sub in (".", "best"):  # the shipped adapter, and the best one it was chosen as
        ours, theirs = adapter(run / sub), adapter(reference / sub)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (done, sub, name)
    steps = [r["step"] for r in rows(run) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), done  # the log reads as one run
    assert not list((run / "checkpoints").glob(".tmp-*")), done
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert (summary["stopped"], summary["best_step"]) == ("finished", expected["best_step"]), done


def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_model, monkeypatch):
    """The first Ctrl-C asks for a checkpoint after the step; a second one does not wait for it."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model, tmp_path)))
    real = train_mod.lr_at

    def twice_in_step_2(step, *args):  # lr_at runs once per step, given the 0-based step
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", twice_in_step_2)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 130, result.output
    assert [x for x in result.output.splitlines() if x.startswith("error:")] == ["error: interrupted"]
    assert checkpoint.latest(tmp_path / "run") is None  # step 2 was not finished, nothing was saved for it


# ----------------------------------------------------------------------------------------------------
# An eval stopped halfway


def test_an_interrupted_eval_leaves_no_scores_that_push_would_publish(trained_run, tmp_path, monkeypatch):
    """Ctrl-C in the middle of an eval, in a folder an earlier eval scored: the old metrics.json goes, so `push`
    says the run is not evaluated instead of publishing scores that do not belong to the predictions beside them,
    and the next eval scores afresh."""
    from phi2sum import evaluate

    scores = tmp_path / "scores"
    eval_args = ["eval", "--adapter", str(trained_run), "--limit", "4", "--out", str(scores),
                 "--set", "generation.max_new_tokens=4", "--set", "generation.batch_size=2"]
    first = runner.invoke(app, [*eval_args, "--compare", "none"])
    assert first.exit_code == 0, first.output
    assert list(json.loads((scores / "metrics.json").read_text())["models"]) == ["fine-tuned"]

    real = evaluate.generate

    def ctrl_c_after_the_first_batch(loaded, dialogues, instruction, gen, on_batch):
        def finished(batch):
            on_batch(batch)
            # What Python's default SIGINT handler raises on a terminal's Ctrl-C. Raised directly: a pytest-xdist
            # worker ignores SIGINT itself.
            raise KeyboardInterrupt
        return real(loaded, dialogues, instruction, gen, finished)

    monkeypatch.setattr(evaluate, "generate", ctrl_c_after_the_first_batch)
    stopped = runner.invoke(app, [*eval_args, "--compare", "base"])
    monkeypatch.undo()
    assert stopped.exit_code == 130 and "error: interrupted" in stopped.output, stopped.output
    assert not (scores / "metrics.json").exists()

    staged = runner.invoke(app, ["push", "--adapter", str(trained_run), "--eval-dir", str(scores), "--dry-run",
                                 str(tmp_path / "staged")])
    assert staged.exit_code == 0, staged.output
    assert "warning: no eval scores at" in staged.output
    assert "Not evaluated yet" in (tmp_path / "staged" / "README.md").read_text()

    again = runner.invoke(app, [*eval_args, "--compare", "base"])
    assert again.exit_code == 0, again.output
    assert sorted(json.loads((scores / "metrics.json").read_text())["models"]) == ["base", "fine-tuned"]


# ----------------------------------------------------------------------------------------------------
# A disk that fills up (test_faults.py: each writer of a checkpoint failing outright)


def no_space_at_fsync(real):
    """os.fsync that fails with ENOSPC for the files of checkpoint 4: a disk that accepted every write and
    only says it is full when the data must reach it (delayed allocation)."""

    def fsync(fd):
        if "step-00000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


def no_space_at_the_second_best_adapter(real):
    """A tokenizer write that fails with ENOSPC the second time the best adapter is written."""
    calls = []

    def save_pretrained(self, folder, *args, **kwargs):
        if ".tmp-best-" in str(folder):
            calls.append(folder)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, folder, *args, **kwargs)

    return save_pretrained


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("where", ["checkpoint fsync", "best adapter"])
def test_a_full_disk_leaves_what_was_written_before_and_says_where(where, tmp_path, tiny_model, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model, tmp_path, train={
        "max_steps": 6, "eval_every": 2, "save_every": 2, "keep_best": True, "learning_rate": 1e-2})))
    run = tmp_path / "run"
    if where == "checkpoint fsync":
        monkeypatch.setattr(os, "fsync", no_space_at_fsync(os.fsync))
    else:
        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained",
                            no_space_at_the_second_best_adapter(PreTrainedTokenizerBase.save_pretrained))
    best_before = []
    monkeypatch.setattr(checkpoint, "save", keep_a_copy(checkpoint.save, run, best_before))
    result = runner.invoke(app, ["train", "--config", str(config)])
    monkeypatch.undo()

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = [x for x in result.output.splitlines() if x.startswith("error:")]
    folder = run / "checkpoints" / "step-00000004" if where == "checkpoint fsync" else run / "best"
    assert line.startswith(f"error: could not write {'checkpoint' if 'checkpoint' in where else 'the adapter to'} "
                           f"{folder} (OSError: [Errno 28] No space left on device); is the disk full?"), line
    assert "--resume" in line
    assert "It needs about " in line and f" MiB in {folder.parent}, " in line and " MiB free" in line, line
    assert checkpoint.latest(run) == run / "checkpoints" / "step-00000002"  # the one before is whole
    assert not [p for p in run.rglob(".tmp-*")]  # no half-written folder left
    if where == "best adapter":  # the best adapter is the one written before, byte for byte
        assert (run / "best" / "adapter_model.safetensors").read_bytes() == best_before[-1]


def keep_a_copy(real, run: Path, copies: list):
    """checkpoint.save, also noting the best adapter's bytes at each checkpoint."""

    def save(*args, **kwargs):
        if (run / "best").is_dir():
            copies.append((run / "best" / "adapter_model.safetensors").read_bytes())
        return real(*args, **kwargs)

    return save


# ----------------------------------------------------------------------------------------------------
# Two processes at once


def test_a_second_train_on_a_locked_run_is_refused_and_a_killed_holder_frees_it(tmp_path, tiny_model, monkeypatch):
    from phi2sum import modeling, runs

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model, tmp_path)))
    run = tmp_path / "run"
    run.mkdir()
    # The other process holds the lock as `phi2sum train` does, without loading anything.
    hold = ("import sys, time; from pathlib import Path; from phi2sum import runs; "
            "held = runs.lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        monkeypatch.setattr(modeling, "load_base", lambda *a, **k: pytest.fail("a model loaded"))
        for extra in ([], ["--resume"]):
            second = runner.invoke(app, ["train", "--config", str(config), *extra])
            assert second.exit_code == 2, second.output
            assert second.output.splitlines() == [f"error: another `phi2sum train` is writing to {run}; wait for it, "
                                                  "or set train.output_dir to another folder"]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    runs.lock(run).close()  # a killed holder leaves no stuck lock


def test_two_prepares_sharing_a_cache_make_one_valid_cache_that_a_third_reuses(tmp_path, tiny_model):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model, tmp_path, data={
        "max_rows": {"train": 400, "validation": 40}})))  # enough rows that both are tokenizing at once
    env = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "300"}
    children = [subprocess.Popen([sys.executable, "-m", "phi2sum", "prepare", "--config", str(config)], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [child.communicate(timeout=120)[0].decode() for child in children]
    for child, output in zip(children, outputs):
        assert child.returncode == 0, output
    [cache] = (tmp_path / "cache").iterdir()  # one cache, no temporary folder left beside it
    report = json.loads((cache / "report.json").read_text())
    assert report["splits"]["train"]["rows_kept"] > 300

    third = runner.invoke(app, ["prepare", "--config", str(config)], terminal_width=300)
    assert third.exit_code == 0, third.output
    assert "reused cache" in third.output and cache.name in " ".join(third.output.split())
