"""The training loop through the real code on the tiny model: the loss falls, the run directory is
complete, the adapter reloads to the same logits, and an interrupted run resumes to exactly the weights
of an uninterrupted one. CPU, fp32, a few seconds per run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ONE_THREAD, ROOT, tiny_config_dict
from phi2sum import modeling
from phi2sum import train as train_mod
from phi2sum.cli import app
from phi2sum.config import ConfigError, Phi2sumError, load_config
from phi2sum.train import epoch_batches, lr_at, train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp: Path, model_dir: Path, **sections) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(model_dir, tmp, **sections)))
    return path


def metrics(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def unwrapped(output: str) -> str:
    """Console output with rich's line wrapping undone (long paths wrap at 120 columns)."""
    return " ".join(output.split())


def sigint_at(monkeypatch, at_step: int) -> None:
    """Send this process a real SIGINT while optimizer step `at_step` runs (lr_at is called once per step,
    with the 0-based step), so the loop's own signal handler asks for the stop."""
    real = train_mod.lr_at

    def lr_and_signal(step, *args):
        if step == at_step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", lr_and_signal)


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def test_epoch_batches_cover_every_row_once_and_repeat_exactly():
    lengths = np.random.default_rng(0).integers(10, 400, size=203)
    for group in (False, True):
        batches = epoch_batches(lengths, 8, seed=3, epoch=0, group=group)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(203))
        assert [len(b) for b in batches].count(8) == 25 and sorted(len(b) for b in batches)[0] == 3
        again = epoch_batches(lengths, 8, seed=3, epoch=0, group=group)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        other = epoch_batches(lengths, 8, seed=3, epoch=1, group=group)
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other))

    # Grouping puts similar lengths together: much less padding than a random split.
    def padding(bs):
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in bs)

    assert padding(epoch_batches(lengths, 8, 3, 0, True)) < 0.5 * padding(epoch_batches(lengths, 8, 3, 0, False))


def test_lr_warms_up_then_decays():
    peak, warmup, total = 1e-3, 4, 20
    cosine = [lr_at(s, total, peak, warmup, "cosine") for s in range(total)]
    assert all(a < b for a, b in zip(cosine[:warmup + 1], cosine[1:warmup + 1]))  # rises during warm-up
    assert cosine[warmup] == pytest.approx(peak)
    assert all(a > b for a, b in zip(cosine[warmup:], cosine[warmup + 1:]))  # then falls
    assert cosine[warmup + (total - warmup) // 2] == pytest.approx(peak / 2)  # half way down at mid-point
    assert lr_at(total, total, peak, warmup, "cosine") == pytest.approx(0, abs=1e-12)
    assert lr_at(total, total, peak, warmup, "linear") == pytest.approx(0, abs=1e-12)
    assert lr_at(12, total, peak, warmup, "linear") == pytest.approx(peak / 2)
    assert lr_at(15, total, peak, warmup, "constant") == peak
    assert 0 < lr_at(0, total, peak, warmup, "cosine") < peak  # the first step never runs at lr 0


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
    assert summary["real_tokens"] > 16 * 8 * 32 and summary["seconds"] > 0
    assert summary["train_loss"] == pytest.approx(metrics(run, "train")[-1]["loss"])
    assert summary["final_eval_loss"] == pytest.approx(metrics(run, "eval")[-1]["eval_loss"])
    assert summary["trainable_parameters"] > 0
    assert summary["base_model"] == load_config(trained["config"]).model.name
    assert summary == {**summary, **{k: v for k, v in vars(result).items()}}

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


# ----------------------------------------------------------------------------------------------------
# Resume


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_model, monkeypatch):
    # LoRA dropout draws random numbers every step, so this fails unless the RNG state is restored too.
    sections = dict(lora={"dropout": 0.1},
                    train={"max_steps": 12, "learning_rate": 1e-2, "eval_every": 2, "save_every": 4,
                           "keep_best": True, "keep_checkpoints": 2})
    straight = train(load_config(write_config(tmp_path / "a", tiny_model, **sections)))
    run_a = tmp_path / "a" / "run"

    config_b = write_config(tmp_path / "b", tiny_model, **sections)
    run_b = tmp_path / "b" / "run"
    with monkeypatch.context() as mp:
        sigint_at(mp, 5)  # between two checkpoints and two evaluations
        stopped = train(load_config(config_b))
    assert stopped.stopped == "interrupted" and stopped.steps == 5
    assert (run_b / "checkpoints" / "step-00000005").is_dir()
    assert not (run_b / "adapter_model.safetensors").exists()  # an interrupted run ships no adapter
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


def test_resume_takes_the_newest_valid_checkpoint(tmp_path, tiny_model, capsys):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 6, "eval_every": 2, "save_every": 2,
                                                       "keep_best": False, "keep_checkpoints": 3})
    train(load_config(config))
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    shipped = tensors(run / "adapter_model.safetensors")

    # A torn write: a complete-looking copy in a temp folder, as a SIGKILL before the rename leaves it.
    torn = ckpts / ".tmp-step-00000008-4242"
    shutil.copytree(ckpts / "step-00000006", torn)
    # One flipped byte in the newest checkpoint: its manifest no longer matches.
    weights = ckpts / "step-00000006" / "trainable.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    capsys.readouterr()

    again = train(load_config(config, ["train.resume=auto"]))  # resume through the config, no flag
    err = unwrapped(capsys.readouterr().err)
    assert "step-00000006 is incomplete or corrupted" in err
    assert "resuming from" in err and "step-00000004 (step 4 of 6)" in err
    assert again.steps == 6 and again.stopped == "finished"
    assert_same_tensors(tensors(run / "adapter_model.safetensors"), shipped)
    assert train_mod.valid_checkpoint(ckpts / "step-00000006")  # rewritten whole
    assert not torn.exists()  # the next checkpoint write cleans up what a killed one left


def test_a_corrupt_checkpoint_never_displaces_a_good_one(tmp_path, tiny_model, monkeypatch):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 6, "eval_every": 0, "save_every": 2,
                                                       "keep_best": False, "keep_checkpoints": 1})
    train(load_config(config))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-00000006" / "trainable.safetensors").write_bytes(b"torn")
    with monkeypatch.context() as mp:
        sigint_at(mp, 3)
        stopped = train(load_config(config), resume=True)  # nothing usable: starts over, stops at step 3
    assert stopped.steps == 3
    # The fresh checkpoint is the one kept; the corrupt one, from a timeline we abandoned, is gone.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003"]
    assert train_mod.latest_checkpoint(tmp_path / "run") == ckpts / "step-00000003"


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, tiny_model):
    sections = dict(train={"max_steps": 6, "eval_every": 0, "save_every": 2, "keep_best": False})
    config = write_config(tmp_path, tiny_model, **sections)
    run = tmp_path / "run"
    # The child hangs in the middle of writing checkpoint 4 (files written, manifest not yet), as a slow
    # disk would; we kill it there.
    writing = tmp_path / "writing"
    hang = tmp_path / "hang_in_checkpoint.py"
    hang.write_text(
        "import sys, time, pathlib\n"
        "import phi2sum.train as t\n"
        "real = t._sha256\n"
        "def slow(path):\n"
        "    if '.tmp-step-00000004' in str(path):\n"
        f"        pathlib.Path({str(writing)!r}).touch()\n"
        "        time.sleep(300)\n"
        "    return real(path)\n"
        "t._sha256 = slow\n"
        "from phi2sum.cli import main\n"
        "main()\n")
    env = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, str(hang), "train", "--config", str(config)], cwd=tmp_path,
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not writing.exists():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the child never reached checkpoint 4"
            time.sleep(0.05)
        torn = list((run / "checkpoints").glob(".tmp-step-00000004-*"))
        assert len(torn) == 1 and (torn[0] / "trainable.safetensors").is_file()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (run / "checkpoints" / "step-00000004").exists()
    assert train_mod.latest_checkpoint(run) == run / "checkpoints" / "step-00000002"

    resumed = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "step-00000002 (step 2 of 6)" in unwrapped(resumed.output)
    straight = train(load_config(write_config(tmp_path / "straight", tiny_model, **sections)))
    assert straight.steps == 6
    assert_same_tensors(tensors(run / "adapter_model.safetensors"),
                        tensors(tmp_path / "straight" / "run" / "adapter_model.safetensors"))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model):
    # 8 training rows: every step sees all of them, as one batch of 8 or as two micro-batches of 4.
    # The loss is normalised by the step's summary tokens, so loss, gradient norm and update agree.
    runs = {}
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        tmp = tmp_path / f"b{batch_size}"
        config = write_config(tmp, tiny_model, data={"max_rows": {"train": 8, "validation": 8}},
                              train={"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 3,
                                     "group_by_length": False, "eval_every": 0, "keep_best": False})
        result = train(load_config(config))
        assert result.steps == 3
        runs[batch_size] = tmp / "run"
    rows = json.loads((runs[8] / "prepare_report.json").read_text())["splits"]["train"]["rows_kept"]
    assert 4 < rows <= 8
    big, small = metrics(runs[8], "train"), metrics(runs[4], "train")
    assert [r["loss"] for r in small] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    assert [r["grad_norm"] for r in small] == pytest.approx([r["grad_norm"] for r in big], rel=1e-4)
    assert_same_tensors(tensors(runs[4] / "adapter_model.safetensors"), tensors(runs[8] / "adapter_model.safetensors"),
                        atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Failures and the CLI


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_model, monkeypatch):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 8, "save_every": 2, "eval_every": 0,
                                                       "keep_best": False, "max_bad_steps": 3})
    real_forward = train_mod.SummaryLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 8:  # 4 good steps of 2 micro-batches, then the loss blows up for good
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "--debug" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "NaN/inf for 3 steps" in lines[0] and "step 5" in lines[0]
    assert f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000004'}" in lines[0]
    assert result.output.count("skipping the update") == 3


def test_cli_trains_and_prints_the_table(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 2, "eval_every": 0, "save_every": 2})
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "error:" not in result.output and "Traceback" not in result.output
    for needle in ("2/2 (finished)", "train loss", "best validation loss", "real tokens", "tokens/s",
                   "n/a (CPU)", "cpu, fp32, 1 process(es)"):
        assert needle in result.output
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_existing_run_needs_overwrite_or_resume_and_the_same_setup(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 2, "eval_every": 0, "save_every": 2})
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--config", str(config)]).exit_code == 0
    first = (run / "adapter_model.safetensors").read_bytes()

    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "already holds a run" in lines[0]
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert (run / "adapter_model.safetensors").read_bytes() == first  # untouched

    for change, section in (("lora.r=4", "lora"), ("data.max_length=300", "data"),
                            ("model.attn_implementation=eager", "model")):
        result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", change])
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and f"the {section} settings differ" in lines[0], result.output

    # A run saved before a setting existed (here model.cudnn_attention, at its default) resumes.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["cudnn_attention"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output

    (run / "stale.txt").write_text("from the old run")
    result = runner.invoke(app, ["train", "--config", str(config), "--overwrite", "--set", "train.learning_rate=1e-2"])
    assert result.exit_code == 0, result.output
    assert not (run / "stale.txt").exists()
    assert (run / "adapter_model.safetensors").read_bytes() != first
    assert load_config(run / "config.yaml").train.learning_rate == 1e-2


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    config = write_config(tmp_path, tiny_model, train={"output_dir": str(mine), "max_steps": 2})
    with pytest.raises(ConfigError, match="not a phi2sum run"):
        train(load_config(config), overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_fused_gelu_matches_gelu_new(tiny_model):
    """load_base swaps gelu_new for PyTorch's fused tanh GELU: same function, same logits."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from phi2sum.config import ModelConfig

    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert any(isinstance(m, NewGELUActivation) for m in reference.modules())
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    fused = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="none"), hw)
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(ids).logits, fused(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(NewGELUActivation()(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)


def test_resume_keeps_the_runs_rows_per_step_under_another_process_count():
    """The data position is the step number, so a resumed run must keep its micro-batches per step."""
    from phi2sum.config import TrainConfig

    t = TrainConfig(batch_size=4, grad_accum=1)
    # saved by 2 processes x grad_accum 2; resumed by 1 process: grad_accum becomes 4
    assert train_mod._resumed_micro_per_step({"micro_per_step": 4, "batch_size": 4}, t, 1, False) == 4
    # the same split as before: nothing changes
    assert train_mod._resumed_micro_per_step({"micro_per_step": 2, "batch_size": 4}, t, 2, False) == 2
    # a checkpoint from before these fields: taken as the current setup
    assert train_mod._resumed_micro_per_step({}, t, 3, False) == 3
    with pytest.raises(ConfigError, match="cannot split that evenly"):
        train_mod._resumed_micro_per_step({"micro_per_step": 3, "batch_size": 4}, t, 2, False)
    with pytest.raises(ConfigError, match="train.batch_size=8"):
        train_mod._resumed_micro_per_step({"micro_per_step": 2, "batch_size": 8}, t, 1, False)


def test_a_conversion_published_by_another_process_first_is_kept(tmp_path):
    """Two processes converting the same GGUF (ranks of one `accelerate launch`): the second to finish
    finds the folder taken, keeps the finished copy and cleans up its own; a half-made target still fails."""
    out = tmp_path / "smollm2-abc"
    for name in ("first", "second"):
        tmp = tmp_path / f".convert-{name}"
        tmp.mkdir()
        (tmp / "config.json").write_text(name)
        (tmp / "model.safetensors").write_text(name)
        assert modeling.publish_dir(tmp, out) == out
        assert not tmp.exists()
    assert (out / "config.json").read_text() == "first"
    broken = tmp_path / "broken"
    (broken / "stray").mkdir(parents=True)  # not empty, and no config.json: not a finished conversion
    tmp = tmp_path / ".convert-third"
    (tmp / "x").mkdir(parents=True)
    with pytest.raises(Phi2sumError, match="delete that folder"):
        modeling.publish_dir(tmp, broken)
    assert not tmp.exists()


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
    assert "out of GPU memory at step 3" in line and "rows x" in line
    assert "train.batch_size" in line and "train.gradient_checkpointing" in line
    last = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert f"Last checkpoint: {last}" in line
    assert train_mod.valid_checkpoint(last)


def test_layer_norms_outside_autocast_return_the_compute_dtype_with_the_same_values(tiny_model):
    """CUDA's autocast runs LayerNorm in fp32 and returns fp32 (then every reader casts it back; CPU
    autocast has no such rule, so the fp32 result is computed here by hand); switched, it returns the
    compute dtype with the fp32 result's values rounded once, and gradients still flow."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    before = torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                                            norm.bias.float(), norm.eps)
    assert modeling.norms_in_compute_dtype(model) == model.config.num_hidden_layers + 1
    assert norm.forward.__func__ is modeling._layer_norm_outside_autocast
    seen = []
    layer_norm = torch.nn.functional.layer_norm

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer_norm(*a, **k)

    x.requires_grad_(True)
    norm.weight.requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(torch.nn.functional, "layer_norm", spy)
        assert torch.is_autocast_enabled("cpu")
        after = norm(x)
    assert seen == [False]  # the kernel ran outside autocast
    assert after.dtype == torch.bfloat16
    assert torch.allclose(after.float(), before, atol=2e-2, rtol=1e-2)
    after.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    assert norm.weight.grad is not None  # trainable norms (full fine-tune) still learn
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kbit_preparation_upcasts_only_for_fp16(tiny_model, dtype):
    """4-bit training: under bf16 the unquantized weights stay bf16 (so the residual stream and LayerNorms run
    in bf16); under fp16 PEFT's k-bit preparation makes them fp32 as before. The base is frozen and the
    LoRA weights train in fp32 either way. (The 4-bit layers themselves need CUDA; this checks the rest.)"""
    from transformers import AutoModelForCausalLM

    from phi2sum.config import LoraSettings, TrainConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    lora = LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    model = modeling.add_lora(model, lora, TrainConfig(gradient_checkpointing=False), quantized=True)
    base = model.get_base_model()
    want = dtype if dtype == torch.bfloat16 else torch.float32
    assert base.get_input_embeddings().weight.dtype == want
    assert base.model.final_layernorm.weight.dtype == want
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def test_kbit_bf16_path_trains_with_gradient_checkpointing(tiny_model):
    """Skipping the k-bit preparation leaves nothing out that checkpointing needs: with non-reentrant
    checkpointing on a frozen bf16 base, a backward through phi2sum's loss under autocast reaches every
    LoRA weight."""
    from transformers import AutoModelForCausalLM

    from phi2sum.config import LoraSettings, TrainConfig
    from phi2sum.train import SummaryLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    lora = LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    model = modeling.add_lora(model, lora, TrainConfig(gradient_checkpointing=True), quantized=True)
    assert model.get_base_model().is_gradient_checkpointing
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SummaryLoss(model)(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_a + lora_b)
    assert any(p.grad.abs().sum() > 0 for p in lora_b)  # B starts at zero, so its gradient is the live one


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager_loss_and_gradients(tiny_model, checkpointing):
    """train.compile compiles each transformer block, not the whole body: one compilation serves every
    block and, being dynamic, every batch width. aot_eager traces forward and backward as inductor does
    (without building kernels, so it runs in seconds on a CPU): same loss and LoRA gradients as eager,
    and the state-dict names (checkpoints, adapters) unchanged."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from phi2sum.config import LoraSettings, TrainConfig
    from phi2sum.train import SummaryLoss, collate

    lora = LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], dropout=0.0)

    def build():
        torch.manual_seed(0)  # 4 blocks (2 saved, 2 seeded), so sharing one compilation is visible
        model = AutoModelForCausalLM.from_pretrained(tiny_model, num_hidden_layers=4)
        model = modeling.add_lora(model, lora, TrainConfig(gradient_checkpointing=checkpointing), quantized=False)
        for n, p in model.named_parameters():  # B starts at zero; give it values so every path carries gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        return model.train()

    gen = torch.Generator().manual_seed(2)
    batches = [collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in widths], 0)
               for widths in ([11, 7, 9], [23, 5], [17, 17, 3, 12])]

    def run(model):
        out = []
        for b in batches:
            model.zero_grad()
            loss = SummaryLoss(model)(**b)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        return out

    eager_model = build()
    eager = run(eager_model)
    model = build()
    names = list(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() leaves the counters of earlier compiles
    assert modeling.compile_body(model, backend="aot_eager") == "4 x PhiDecoderLayer"
    compiled = run(model)
    assert list(model.state_dict()) == names
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-5)
        assert g1.keys() == g2.keys()
        assert all(torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6) for k in g1)
    frames = torch._dynamo.utils.counters["frames"]
    # One dynamic graph for all blocks and widths, not one per block: the first block gets its own only
    # because its input (frozen embeddings) needs no gradient unless checkpointing makes it.
    assert frames["ok"] == (1 if checkpointing else 2)
    torch._dynamo.reset()


def test_model_cudnn_attention_sets_sdpa_switch_and_compile_cache_key_on_cuda_only():
    """model.cudnn_attention reaches SDPA's process-wide switch for CUDA devices, and the compile caches' key
    (a graph traced with the other setting must not be reused); CPU runs and the unset default leave both alone."""
    before, tag = torch.backends.cuda.cudnn_sdp_enabled(), torch.compiler.config.cache_key_tag
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.compiler.config.cache_key_tag = "users-own"
        off = load_config(None, ["model.cudnn_attention=false"]).model
        modeling.choose_attention_kernels(off, torch.device("cpu"))
        modeling.choose_attention_kernels(load_config(None, []).model, torch.device("cuda", 0))
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.compiler.config.cache_key_tag == "users-own"
        modeling.choose_attention_kernels(off, torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.compiler.config.cache_key_tag == "users-own;phi2sum-cudnn-sdp=0"
        modeling.choose_attention_kernels(load_config(None, ["model.cudnn_attention=true"]).model, torch.device("cuda", 0))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.compiler.config.cache_key_tag == "users-own;phi2sum-cudnn-sdp=1"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
        torch.compiler.config.cache_key_tag = tag


def test_pad_to_multiple_changes_widths_not_the_loss_or_gradients(tiny_model):
    """train.pad_to_multiple_of rounds each micro-batch's width up; the extra columns are padding (masked, no
    labels), so the summed loss and every gradient match the unpadded batch."""
    from transformers import AutoModelForCausalLM

    from phi2sum.train import SummaryLoss, collate

    gen = torch.Generator().manual_seed(3)
    rows = [(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (11, 7, 9)]
    assert collate(rows, 0)["input_ids"].shape[1] == 11
    assert collate(rows, 0, 8)["input_ids"].shape[1] == 16 and collate(rows, 0, 11)["input_ids"].shape[1] == 11
    assert collate(rows, 0, 8, cap=12)["input_ids"].shape[1] == 12  # never past data.max_length...
    assert collate(rows, 0, 8, cap=10)["input_ids"].shape[1] == 11  # ...nor shorter than the longest row
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    out = []
    for multiple in (1, 16):
        model.zero_grad()
        batch = collate(rows, 0, multiple)
        assert int(batch["attention_mask"].sum()) == sum(len(ids) for ids, _ in rows)
        loss = SummaryLoss(model)(**batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_and_its_evaluations_pad_to_the_configured_multiple(make_config, monkeypatch):
    """train.pad_to_multiple_of reaches every batch the loop builds, training and validation alike."""
    widths = []
    real_collate = train_mod.collate

    def recording(*args, **kwargs):
        batch = real_collate(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(train_mod, "collate", recording)
    cfg = load_config(make_config(train={"pad_to_multiple_of": 64, "max_steps": 3, "eval_every": 3}))
    train(cfg, overwrite=True)
    assert len(widths) >= 3 * 2 + 2  # 3 steps x 2 micro-batches, then 8 validation rows in batches of 4
    assert all(w % 64 == 0 or w == cfg.data.max_length for w in widths)


@pytest.mark.parametrize("family", ["phi", "llama"])
def test_dropping_the_padding_mask_changes_neither_loss_nor_gradients(tiny_model, family):
    """train.padding_mask: false (the default) leaves the mask out of the model call. Rows are right-padded
    and attention is causal, so no real token attends to a pad: the summed loss and every gradient equal the
    masked call's, for Phi-2's family and Llama's (SmolLM2's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from phi2sum.train import SummaryLoss, collate

    torch.manual_seed(0)
    if family == "phi":
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(4)
    batch = collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (13, 4, 9, 13)], 0, 8)
    assert batch["input_ids"].shape[1] == 16 and not batch["attention_mask"].all()  # padding is really there
    out = []
    for padding_mask in (True, False):
        model.zero_grad()
        loss = SummaryLoss(model, padding_mask)(**batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A left-padded row would see its pads without the mask: the same batch shifted right changes the loss,
    # so the equality above is not one the model would give whatever it was passed.
    shifted = {k: torch.roll(v, 3, dims=1) for k, v in batch.items()}
    with torch.no_grad():
        masked, unmasked = (SummaryLoss(model, flag)(**shifted) for flag in (True, False))
    assert not torch.allclose(masked, unmasked, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("setting,remote_code,want", [(None, False, False), (True, False, True), (None, True, True)])
def test_train_hands_the_padding_mask_setting_to_its_loss(make_config, monkeypatch, setting, remote_code, want):
    """The mask stays off unless asked for, or unless the model's code is the hub repo's (not known causal)."""
    seen = set()
    real_forward = train_mod.SummaryLoss.forward

    def forward(self, *args, **kwargs):
        seen.add(self.padding_mask)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    extra = {} if setting is None else {"padding_mask": setting}
    cfg = load_config(make_config(train={"max_steps": 1, "eval_every": 1, **extra}))
    cfg.model.trust_remote_code = remote_code
    train(cfg, overwrite=True)
    assert seen == {want}


def test_label_smoothing_and_neftune_change_the_training_loss_only(tiny_model):
    from transformers import AutoModelForCausalLM

    """train.label_smoothing: training loss is (1 - e) x CE + e x the mean -log p over the vocabulary, summed over
    summary tokens; train.neftune_alpha: training embeddings get uniform noise of size alpha / sqrt(L x d) per
    row. Validation loss (eval mode) is plain cross-entropy with both on."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(2)
    batch = train_mod.collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (13, 7, 10)], 0)
    plain = train_mod.SummaryLoss(model).train()
    with torch.no_grad():
        ce = plain(**batch)
        hidden = model.base_model(input_ids=batch["input_ids"])[0]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logp = model.get_output_embeddings()(hidden[:, :-1][keep]).float().log_softmax(-1)
        uniform = -logp.mean(-1).sum()
        smoothed = train_mod.SummaryLoss(model, label_smoothing=0.1).train()
        torch.testing.assert_close(smoothed(**batch), 0.9 * ce + 0.1 * uniform, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(smoothed.eval()(**batch), ce)

        seen = []
        hook = model.base_model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("inputs_embeds")),
                                                          with_kwargs=True)
        noisy = train_mod.SummaryLoss(model, neftune_alpha=5.0).train()
        torch.manual_seed(0)
        loss = noisy(**batch)
        torch.testing.assert_close(noisy.eval()(**batch), ce)
        hook.remove()
        assert seen[1] is None  # eval mode: token ids, no noise
        noise = seen[0] - model.get_input_embeddings()(batch["input_ids"])
        d = noise.shape[-1]
        for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            bound = 5.0 / (n * d) ** 0.5
            assert noise[row].abs().max() <= bound * (1 + 1e-5) and noise[row].abs().max() > 0.9 * bound
        assert not torch.isclose(loss, ce)
