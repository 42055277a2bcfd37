"""`phi2sum train` through the real loop on the tiny model: the loss falls, the run folder is complete, the
adapter reloads to the same logits, an interrupted run resumes to exactly the weights of an uninterrupted one,
a non-finite step is skipped (never replayed), and the run folder is guarded: --resume/--overwrite rules, the
train.lock, files that are not phi2sum's. CPU, fp32, a second or two per run. Checkpoint files: test_checkpoint.py;
kills and full disks: test_faults.py."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import assert_same_tensors, error_lines, tensors, unwrapped, write_config
from phi2sum import checkpoint
from phi2sum import train as train_mod
from phi2sum.checkpoint import TrainState
from phi2sum.cli import app
from phi2sum.config import ConfigError, Phi2sumError, load_config
from phi2sum.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = {"max_steps": 2, "eval_every": 0, "save_every": 2}  # the least a finished run needs


def metrics(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def sigint_after(step: int):
    """An on_step hook that sends this process a real SIGINT once optimizer step `step` is done, so the loop's
    own signal handler asks for the stop."""

    def on_step(state: TrainState) -> None:
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# One real run, shared by the tests that only read it


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """16 steps on the tiny model, with the trained PeftModel kept from inside train()."""
    tmp = tmp_path_factory.mktemp("train")
    config = write_config(tmp, tiny_model, train={"max_steps": 16, "learning_rate": 1e-2, "eval_every": 8,
                                                  "save_every": 8, "keep_best": False})
    captured = {}
    real_add_lora = train_mod.modeling.add_lora

    def add_lora(*args, **kwargs):
        captured["model"] = real_add_lora(*args, **kwargs)
        return captured["model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.modeling, "add_lora", add_lora)
        result = train(load_config(config))
    return {"config": config, "run": tmp / "run", "result": result, "model": captured["model"]}


def test_tiny_model_loss_falls(trained):
    losses = [r["loss"] for r in metrics(trained["run"], "train")]
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    evals = metrics(trained["run"], "eval")
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_run_dir_holds_adapter_tokenizer_config_metrics_plot_summary(trained):
    run, result = trained["run"], trained["result"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "config.yaml", "metrics.jsonl", "loss.png", "summary.json", "prepare_report.json"):
        assert (run / name).is_file(), name
    assert not (run / "last").exists() and not list(run.glob(".tmp-*"))
    assert load_config(run / "config.yaml") == load_config(trained["config"])

    from PIL import Image

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(run / "loss.png") as img:
        img.verify()

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 16 and summary["stopped"] == "finished"
    assert summary["device"] == "cpu" and summary["precision"] == "fp32" and summary["world_size"] == 1
    assert summary["real_tokens"] > 16 * 8 * 32 and summary["seconds"] > 0 and summary["skipped_steps"] == 0
    assert summary["train_loss"] == pytest.approx(metrics(run, "train")[-1]["loss"])
    assert summary["final_eval_loss"] == pytest.approx(metrics(run, "eval")[-1]["eval_loss"])
    assert summary["trainable_parameters"] > 0
    assert summary["base_model"] == load_config(trained["config"]).model.name
    assert summary == {**summary, **vars(result)}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    assert tok.pad_token is not None and tok.eos_token == "<|endoftext|>"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]


def test_adapter_reloads_to_identical_logits(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_memory = trained["model"].eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(trained["run"])).eval()(input_ids=ids).logits
    assert (in_memory - base_logits).abs().max() > 1e-3  # training moved the model: the check below can fail
    torch.testing.assert_close(reloaded, in_memory, atol=1e-6, rtol=0)


def test_cli_trains_and_prints_the_table(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, train=SHORT)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "error:" not in result.output and "Traceback" not in result.output
    for needle in ("2/2 (finished)", "train loss", "best validation loss", "real tokens", "tokens/s",
                   "n/a (CPU)", "cpu, fp32, 1 process(es)"):
        assert needle in result.output
    assert "skipped updates" not in result.output  # only when there were some
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model):
    # 8 training rows: every step sees all of them, as one batch of 8 or as two micro-batches of 4.
    # The loss is normalised by the step's summary tokens, so loss, gradient norm and update agree.
    run = {}
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        tmp = tmp_path / f"b{batch_size}"
        config = write_config(tmp, tiny_model, data={"max_rows": {"train": 8, "validation": 8}},
                              train={"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 3,
                                     "group_by_length": False, "eval_every": 0, "keep_best": False})
        assert train(load_config(config)).steps == 3
        run[batch_size] = tmp / "run"
    rows = json.loads((run[8] / "prepare_report.json").read_text())["splits"]["train"]["rows_kept"]
    assert 4 < rows <= 8
    big, small = metrics(run[8], "train"), metrics(run[4], "train")
    assert [r["loss"] for r in small] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    assert [r["grad_norm"] for r in small] == pytest.approx([r["grad_norm"] for r in big], rel=1e-4)
    assert_same_tensors(tensors(run[4] / "adapter_model.safetensors"), tensors(run[8] / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("packing", [False, True])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_model, packing):
    # LoRA dropout draws random numbers every step, so this fails unless the RNG state is restored too. Packed:
    # 2 rows of 1,024 tokens a micro-batch make 4 steps an epoch, so the resumed run also crosses into new epochs.
    sections = dict(lora={"dropout": 0.1},
                    train={"max_steps": 12, "learning_rate": 1e-2, "eval_every": 2, "save_every": 4,
                           "keep_best": True, "keep_checkpoints": 2})
    if packing:
        sections.update(data={"max_length": 1024}, train={**sections["train"], "packing": True, "batch_size": 2,
                                                          "eval_every": 4})
    straight = train(load_config(write_config(tmp_path / "a", tiny_model, **sections)))
    run_a = tmp_path / "a" / "run"

    config_b = write_config(tmp_path / "b", tiny_model, **sections)
    run_b = tmp_path / "b" / "run"
    stopped = train(load_config(config_b), on_step=sigint_after(5))  # between two checkpoints and two evaluations
    assert stopped.stopped == "interrupted" and stopped.steps == 5
    assert (run_b / "checkpoints" / "step-00000005").is_dir()
    assert not (run_b / "adapter_model.safetensors").exists()  # an interrupted run ships no adapter
    assert json.loads((run_b / "summary.json").read_text())["stopped"] == "interrupted"
    resumed = train(load_config(config_b), resume=True)

    assert resumed.steps == straight.steps == 12 and resumed.stopped == "finished"
    assert resumed.best_step == straight.best_step and resumed.best_eval_loss == pytest.approx(straight.best_eval_loss)
    final_a = tensors(run_a / "checkpoints" / "step-00000012" / "trainable.safetensors")
    assert_same_tensors(final_a, tensors(run_b / "checkpoints" / "step-00000012" / "trainable.safetensors"))
    assert_same_tensors(tensors(run_a / "adapter_model.safetensors"), tensors(run_b / "adapter_model.safetensors"))
    assert_same_tensors(tensors(run_a / "best" / "adapter_model.safetensors"),
                        tensors(run_b / "best" / "adapter_model.safetensors"))
    # keep_best: the shipped adapter is the best one, byte for byte.
    shipped = (run_b / "adapter_model.safetensors").read_bytes()
    assert shipped == (run_b / "best" / "adapter_model.safetensors").read_bytes()

    # The metrics log reads as one run: no duplicated or missing steps, the same losses.
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        a, b = metrics(run_a, kind), metrics(run_b, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-6)


@pytest.mark.parametrize("steps", [2, 3])  # 3: the last step is not a multiple of save_every
def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny_model, steps):
    config = write_config(tmp_path, tiny_model, train={**SHORT, "max_steps": steps})
    assert train(load_config(config)).stopped == "finished"
    before = snapshot(tmp_path / "run")
    result = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert result.exit_code == 0, result.output
    said = unwrapped(result.output)
    assert f"is already finished (finished, {steps} of {steps} steps); nothing to resume, nothing changed" in said
    assert f"{steps}/{steps} (finished)" in said  # the table shows what the run recorded
    # train.resume: auto (resume through the config) finds it finished too.
    again = train(load_config(config, ["train.resume=auto"]))
    assert (again.steps, again.stopped) == (steps, "finished")
    assert snapshot(tmp_path / "run") == before  # summary.json, metrics, adapter, checkpoints: byte for byte


# ----------------------------------------------------------------------------------------------------
# Non-finite steps: skipped, counted, never replayed; too many in a row stop the run


def poison(monkeypatch, bad: set[int], what: str) -> list[list[tuple]]:
    """Patch the loss so that training micro-batch number n (1-based, in the order the loop runs them) in
    `bad` gives a NaN loss (what="loss") or NaN gradients under a finite loss (what="gradients"). Returns the
    rows each training micro-batch saw, as token tuples."""
    seen: list[list[tuple]] = []
    real_forward = train_mod.SummaryLoss.forward

    def forward(self, input_ids, attention_mask, labels):
        loss = real_forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if not self.training:
            return loss
        seen.append([tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)])
        if len(seen) in bad:
            if what == "loss":
                return loss * float("nan")
            loss.register_hook(lambda grad: grad * float("nan"))  # the value stays finite, its gradient does not
        return loss

    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    return seen


@pytest.mark.parametrize("what", ["loss", "gradients"])
def test_a_non_finite_step_is_skipped_and_its_batch_never_seen_again(tmp_path, tiny_model, monkeypatch, what, capsys):
    """Step 3's first micro-batch is poisoned. The update is skipped, the step counter moves on (the data position
    is a function of it, so the next step takes the next batches), the skip is counted and logged, and every
    training row is seen exactly once in the epoch: the poisoned batch is not replayed."""
    config = write_config(tmp_path, tiny_model, train={"max_steps": 6, "eval_every": 0, "save_every": 3,
                                                       "keep_best": False, "group_by_length": False})
    seen = poison(monkeypatch, {5}, what)  # 2 micro-batches per step: the 5th is step 3's first
    result = train(load_config(config))
    run = tmp_path / "run"
    assert (result.stopped, result.steps, result.skipped_steps) == ("finished", 6, 1)
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
    rows = json.loads((run / "prepare_report.json").read_text())["splits"]["train"]["rows_kept"]
    assert len(seen) == 12  # 6 steps x 2 micro-batches: one epoch of the tiny slice
    everything = [r for batch in seen for r in batch]
    assert len(everything) == len(set(everything)) == rows  # each row once, the poisoned ones included
    [skipped] = metrics(run, "skipped")
    assert skipped["step"] == 3 and not math.isfinite(skipped["grad_norm"])
    assert math.isfinite(skipped["loss"]) == (what == "gradients")
    assert [r["step"] for r in metrics(run, "train")] == [1, 2, 4, 5, 6]  # no loss logged for the skipped step
    err = unwrapped(capsys.readouterr().err)
    assert f"step 3: {'loss' if what == 'loss' else 'gradient norm'} is nan; update skipped (1/10 in a row)" in err
    assert all(torch.isfinite(t).all() for t in tensors(run / "adapter_model.safetensors").values())


@pytest.mark.parametrize("what,cause", [("loss", "the loss was NaN/inf"),
                                        ("gradients", "the gradients were NaN/inf (the loss looked finite)")])
def test_non_finite_steps_in_a_row_stop_with_the_cause_and_the_last_good_checkpoint(tmp_path, tiny_model,
                                                                                   monkeypatch, what, cause):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 8, "save_every": 2, "eval_every": 0,
                                                       "keep_best": False, "max_bad_steps": 3})
    poison(monkeypatch, set(range(9, 100)), what)  # 4 good steps of 2 micro-batches, then it blows up for good
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "--debug" not in result.output
    [line] = error_lines(result.output)
    line = unwrapped(line)
    assert f"{cause} for 3 steps in a row (up to step 7)" in line
    # Step 6's checkpoint holds the weights of step 4 (the updates in between were skipped): still a good one.
    assert f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000006'}" in line
    assert "Lower train.learning_rate" in line and "attn_implementation: eager" in line
    assert unwrapped(result.output).count("update skipped") == 3
    assert [r["step"] for r in metrics(tmp_path / "run", "skipped")] == [5, 6, 7]


def test_out_of_gpu_memory_is_one_line_that_says_what_to_lower(tmp_path, tiny_model, monkeypatch):
    """An OOM mid-run (a long batch late in an epoch) names the micro-batch and the settings to lower, and
    points at the last checkpoint, which is intact."""
    config = write_config(tmp_path, tiny_model, train={"max_steps": 6, "save_every": 2, "eval_every": 0,
                                                       "keep_best": False})
    real_forward = train_mod.SummaryLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] > 4:  # 2 steps of 2 micro-batches, then the card is full
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result.output)
    line = unwrapped(line)
    assert "out of GPU memory at step 3" in line and "rows x" in line
    assert "train.batch_size" in line and "train.gradient_checkpointing" in line
    last = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert f"Last checkpoint: {last}" in line
    assert checkpoint.is_valid(last)


# ----------------------------------------------------------------------------------------------------
# The run folder: what --resume and --overwrite may do, and who may write


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> Path:
    """A finished 2-step run; tests take a copy of it (`copy_of_finished`)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert train(load_config(write_config(tmp, tiny_model, train=SHORT))).stopped == "finished"
    return tmp


def copy_of_finished(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, run) of a private copy of the finished run: the same config (its data cache included), with
    train.output_dir pointing at the copy."""
    run = Path(shutil.copytree(finished / "run", tmp_path / "run"))
    raw = yaml.safe_load((finished / "config.yaml").read_text())
    raw["train"]["output_dir"] = str(run)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "config.yaml", run


def test_existing_run_needs_resume_or_overwrite_and_overwrite_keeps_the_users_files(finished, tmp_path):
    config, run = copy_of_finished(finished, tmp_path)
    first = (run / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (run / "adapter_model.safetensors").read_bytes() == first  # untouched

    # A run saved before a setting existed (here model.cudnn_attention, at its default) resumes.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["cudnn_attention"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert "3/3 (finished)" in result.output

    # --overwrite replaces what phi2sum wrote (the old run's eval, checkpoints...) and nothing else.
    (run / "notes.txt").write_text("the user's own")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    (run / "checkpoints" / "step-00000099").mkdir()
    result = runner.invoke(app, ["train", "--config", str(config), "--overwrite", "--set", "train.learning_rate=1e-2"])
    assert result.exit_code == 0, result.output
    assert (run / "notes.txt").read_text() == "the user's own"
    assert not (run / "eval").exists() and not (run / "checkpoints" / "step-00000099").exists()
    assert (run / "adapter_model.safetensors").read_bytes() != first
    assert load_config(run / "config.yaml").train.learning_rate == 1e-2
    assert [r["step"] for r in metrics(run, "train")] == [1, 2]  # a new log, not the old one continued


@pytest.mark.parametrize("change,section", [("lora.r=4", "lora"), ("data.max_length=300", "data"),
                                            ("model.attn_implementation=eager", "model")])
def test_resume_with_other_model_lora_or_data_settings_is_refused(finished, tmp_path, change, section):
    config, run = copy_of_finished(finished, tmp_path)
    before = snapshot(run)
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", change])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert f"--resume: the {section} settings differ from the run in {run}" in unwrapped(line)
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["setup", "loop"])
def test_a_failed_train_leaves_the_folder_free_for_the_next_train_in_the_same_process(finished, tmp_path,
                                                                                     monkeypatch, where):
    """A notebook or a benchmark calls train() again after a failure, while the failure is still around (a
    notebook keeps the last exception, and with it the failed call's frames): the folder must not stay locked."""
    config, run = copy_of_finished(finished, tmp_path)
    if where == "setup":
        overrides, error = ["lora.r=4"], ConfigError
    else:
        poison(monkeypatch, set(range(1, 100)), "loss")
        overrides, error = ["train.max_steps=3", "train.max_bad_steps=1"], Phi2sumError
    with pytest.raises(error) as failed:
        train(load_config(config, overrides), resume=True)
    monkeypatch.undo()
    result = train(load_config(config, ["train.max_steps=3"]), resume=True)
    assert (result.steps, result.stopped) == (3, "finished") and failed.value


def test_resume_and_overwrite_together_are_refused(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, train=SHORT)
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert error_lines(result.output) == ["error: --resume continues the run in train.output_dir and --overwrite "
                                          "deletes it; pass one"]
    assert not (tmp_path / "run").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    config = write_config(tmp_path, tiny_model, train={"output_dir": str(mine), "max_steps": 2})
    with pytest.raises(ConfigError, match="not a phi2sum run"):
        train(load_config(config), overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("broken", ["data", "model"])
def test_overwrite_deletes_nothing_until_the_data_and_model_have_loaded(tmp_path, tiny_model, broken):
    """A folder that looks like a run (a config.yaml) but also holds the user's code: --overwrite with data or a
    model that cannot load stops before deleting anything, and would never delete src/ anyway."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    (folder / "src" / "a.py").write_text("print('mine')\n")
    (tmp_path / "empty").mkdir()
    sections = {"data": {"source": str(tmp_path / "empty")}} if broken == "data" else \
        {"model": {"name": str(tmp_path / "empty")}}
    config = write_config(tmp_path, tiny_model, train={"output_dir": str(folder), **SHORT}, **sections)
    result = runner.invoke(app, ["train", "--config", str(config), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert ("no file for split" if broken == "data" else "holds no config.json") in error_lines(result.output)[0]
    assert (folder / "config.yaml").read_text() == "model: {}\n"
    assert (folder / "src" / "a.py").read_text() == "print('mine')\n"


def test_a_run_folder_being_trained_is_refused_to_a_second_train(finished, tmp_path):
    """train.lock: while another process holds it (an flock, released by the OS even on SIGKILL), a second
    `phi2sum train` on the folder stops in one line; the file left behind by a finished run does not block."""
    config, run = copy_of_finished(finished, tmp_path)
    assert (run / "train.lock").is_file()  # left behind, unlocked
    with open(run / "train.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `phi2sum train` holds it
        before = snapshot(run)
        result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", "train.max_steps=3"])
        assert result.exit_code == 2, result.output
        [line] = error_lines(result.output)
        assert f"another `phi2sum train` is writing to {run}" in unwrapped(line)
        assert snapshot(run) == before
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert "3/3 (finished)" in result.output


def test_a_first_run_that_failed_before_writing_anything_can_be_started_again(tmp_path, tiny_model):
    """A first `phi2sum train` that stops on its data (a typo in data.source) leaves only train.lock; fixing the
    config and running the same command again must start the run."""
    (tmp_path / "empty").mkdir()
    bad = write_config(tmp_path / "bad", tiny_model, data={"source": str(tmp_path / "empty")},
                       train={"output_dir": str(tmp_path / "run"), **SHORT})
    assert runner.invoke(app, ["train", "--config", str(bad)]).exit_code == 2
    good = write_config(tmp_path / "good", tiny_model, train={"output_dir": str(tmp_path / "run"), **SHORT})
    result = runner.invoke(app, ["train", "--config", str(good)])
    assert result.exit_code == 0, result.output
