"""Resumable checkpoints (phi2sum/checkpoint.py): what one holds comes back exactly (weights, optimizer, every
random generator, the loop's TrainState), a damaged one is never used and never displaces a good one, and a kill
in the middle of a write leaves the previous checkpoint. The unit tests use the tiny model with LoRA; the rest
run `phi2sum train` itself."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import ONE_THREAD, ROOT, assert_same_tensors, sigkill_when, tensors, unwrapped, write_config
from phi2sum import checkpoint, modeling
from phi2sum.checkpoint import TrainState
from phi2sum.cli import app
from phi2sum.config import ConfigError, LoraSettings, TrainConfig, load_config
from phi2sum.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(tiny_model: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = modeling.add_lora(model, LoraSettings(r=4, dropout=0.0), TrainConfig(gradient_checkpointing=False),
                              quantized=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def a_step(model, optimizer) -> None:
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ----------------------------------------------------------------------------------------------------
# The files


def test_a_checkpoint_restores_weights_optimizer_random_state_and_the_loop_state(tiny_model, tmp_path):
    model, optimizer = lora_model(tiny_model, seed=0)
    a_step(model, optimizer)
    state = TrainState(step=7, micro_per_step=2, batch_size=4, real_tokens=1234, seconds=5.5, best_eval_loss=2.5,
                       best_step=6, final_eval_loss=2.75, bad_evals=1, skipped_steps=1)
    path = checkpoint.save(tmp_path, state, model, optimizer, None, keep=2)
    assert path == tmp_path / "checkpoints" / "step-00000007" and checkpoint.is_valid(path)
    draws = (random.random(), np.random.rand(), torch.rand(3))  # what each generator gives next after the save

    other, other_optimizer = lora_model(tiny_model, seed=1)  # another LoRA init, a fresh optimizer
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    fresh = TrainState(micro_per_step=2, batch_size=4)
    assert checkpoint.load(path, other, other_optimizer, None, fresh) == state
    assert_same_tensors(checkpoint.trainable_state(other), checkpoint.trainable_state(model), atol=0)
    saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[k][name], loaded[k][name])
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])


def test_train_state_from_an_older_checkpoint_keeps_the_fields_it_lacks():
    fresh = TrainState(micro_per_step=4, batch_size=8)
    old = fresh.updated({"step": 12, "real_tokens": 99, "field_from_the_future": 1})
    assert (old.step, old.real_tokens, old.micro_per_step, old.batch_size, old.skipped_steps) == (12, 99, 4, 8, 0)


def test_only_the_newest_checkpoints_are_kept_and_never_a_newer_abandoned_one(tiny_model, tmp_path, capsys):
    model, optimizer = lora_model(tiny_model, seed=0)
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, TrainState(step=step), model, optimizer, None, keep=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000004"]
    # A resume from step 2 (3 and 4 were corrupt): its step 3 replaces them, they are never "newest" again.
    (ckpts / "step-00000004" / "state.pt").write_bytes(b"torn")
    assert checkpoint.latest(tmp_path) == ckpts / "step-00000003"
    assert "step-00000004 is incomplete or corrupted" in unwrapped(capsys.readouterr().err)
    checkpoint.save(tmp_path, TrainState(step=3), model, optimizer, None, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003"]
    for name in ("manifest.json", "trainable.safetensors"):  # any missing or changed file: not valid
        broken = ckpts / "broken"
        shutil.copytree(ckpts / "step-00000003", broken)
        (broken / name).unlink() if name == "manifest.json" else (broken / name).write_bytes(b"x")
        assert not checkpoint.is_valid(broken)
        shutil.rmtree(broken)


def test_resume_keeps_the_runs_rows_per_step_under_another_process_count():
    """The data position is the step number, so a resumed run must keep its micro-batches per step."""
    t = TrainConfig(batch_size=4, grad_accum=1)
    # saved by 2 processes x grad_accum 2; resumed by 1 process: grad_accum becomes 4
    assert checkpoint.resumed_micro_per_step(TrainState(micro_per_step=4, batch_size=4), t, 1, False) == 4
    # the same split as before: nothing changes
    assert checkpoint.resumed_micro_per_step(TrainState(micro_per_step=2, batch_size=4), t, 2, False) == 2
    # a checkpoint from before these fields: the loop's fresh state (the current setup) fills them in
    fresh = TrainState(micro_per_step=3, batch_size=4)
    assert checkpoint.resumed_micro_per_step(fresh.updated({"step": 7}), t, 3, False) == 3
    with pytest.raises(ConfigError, match="cannot split that evenly"):
        checkpoint.resumed_micro_per_step(TrainState(micro_per_step=3, batch_size=4), t, 2, False)
    with pytest.raises(ConfigError, match="train.batch_size=8"):
        checkpoint.resumed_micro_per_step(TrainState(micro_per_step=2, batch_size=8), t, 1, False)
    # train.packing changes what a batch is: the run keeps the value it started with
    with pytest.raises(ConfigError, match="the run used train.packing=false; resume with that value"):
        checkpoint.resumed_micro_per_step(TrainState(micro_per_step=1, batch_size=4), t.model_copy(
            update={"packing": True}), 1, False)


def test_a_checkpoint_from_before_packing_reads_as_unpacked(tiny_model, tmp_path):
    model, optimizer = lora_model(tiny_model, seed=0)
    path = checkpoint.save(tmp_path, TrainState(step=3, micro_per_step=2, batch_size=4), model, optimizer, None, 2)
    saved = json.loads((path / "trainer.json").read_text())
    del saved["packing"]
    (path / "trainer.json").write_text(json.dumps(saved))
    fresh = TrainState(micro_per_step=2, batch_size=4, packing=True)  # a config that now asks for packing
    assert checkpoint.load(path, model, optimizer, None, fresh).packing is False


# ----------------------------------------------------------------------------------------------------
# Through `phi2sum train`


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
    assert checkpoint.is_valid(ckpts / "step-00000006")  # rewritten whole
    assert not torn.exists()  # the next checkpoint write cleans up what a killed one left


def test_a_corrupt_checkpoint_never_displaces_a_good_one(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, train={"max_steps": 6, "eval_every": 0, "save_every": 2,
                                                       "keep_best": False, "keep_checkpoints": 1})
    train(load_config(config))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-00000006" / "trainable.safetensors").write_bytes(b"torn")

    def stop_at_3(state):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(load_config(config), resume=True, on_step=stop_at_3)  # nothing usable: starts over
    assert stopped.steps == 3 and stopped.stopped == "interrupted"
    # The fresh checkpoint is the one kept; the corrupt one, from a timeline we abandoned, is gone.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003"]
    assert checkpoint.latest(tmp_path / "run") == ckpts / "step-00000003"


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
        "import phi2sum.checkpoint as c\n"
        "real = c._sha256\n"
        "def slow(path):\n"
        "    if '.tmp-step-00000004' in str(path):\n"
        f"        pathlib.Path({str(writing)!r}).touch()\n"
        "        time.sleep(300)\n"
        "    return real(path)\n"
        "c._sha256 = slow\n"
        "from phi2sum.cli import main\n"
        "main()\n")
    env = os.environ | ONE_THREAD | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, str(hang), "train", "--config", str(config)], cwd=tmp_path,
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
    sigkill_when(child, writing.exists, log)  # the child is inside checkpoint 4's write
    torn = list((run / "checkpoints").glob(".tmp-step-00000004-*"))
    assert len(torn) == 1 and (torn[0] / "trainable.safetensors").is_file()
    assert not (run / "checkpoints" / "step-00000004").exists()
    assert checkpoint.latest(run) == run / "checkpoints" / "step-00000002"

    resumed = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "step-00000002 (step 2 of 6)" in unwrapped(resumed.output)
    straight = train(load_config(write_config(tmp_path / "straight", tiny_model, **sections)))
    assert straight.steps == 6
    assert_same_tensors(tensors(run / "adapter_model.safetensors"),
                        tensors(tmp_path / "straight" / "run" / "adapter_model.safetensors"))
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
