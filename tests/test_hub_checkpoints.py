"""train.hub_checkpoints through the real code: checkpoints uploaded in the background to the local Hub stand-in
(tests/hub_server.py), a run resumed on a "fresh machine" (its folder deleted) from the Hub to exactly the weights
of an uninterrupted run, a failed upload that warns once and is retried, and a token that is never written out."""

from __future__ import annotations

import os
import signal
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_config_dict
from hub_server import FakeHub
from phi2sum import hubsync
from phi2sum import train as train_mod
from phi2sum.cli import app
from phi2sum.config import load_config
from phi2sum.train import train

TOKEN = "hf_plantedCheckpointT0kenNeverPrinted"
REPO = "me/ckpts"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub with huggingface_hub pointed at it (uploads read constants.ENDPOINT, downloads the URL
    template built from it at import) and the planted token in HF_TOKEN."""
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches it on for everything else
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def write_config(tmp: Path, model_dir: Path, **train) -> Path:
    # LoRA dropout draws random numbers every step: resuming matches only if the RNG state travels too.
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(
        model_dir, tmp, lora={"dropout": 0.1},
        train={"max_steps": 6, "eval_every": 2, "save_every": 2, "keep_best": False, "keep_checkpoints": 2,
               "learning_rate": 1e-2, **train})))
    return path


def sigint_at(monkeypatch, at_step: int) -> None:
    """A real SIGINT while optimizer step `at_step` runs (lr_at is called once per step with the 0-based step)."""
    real = train_mod.lr_at

    def lr_and_signal(step, *args):
        if step == at_step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", lr_and_signal)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


def hub_steps(server: FakeHub, branch: str = "run") -> list[str]:
    return sorted({p.split("/")[1] for p in server.repos[REPO]["branches"][branch] if p.startswith("checkpoints/")})


def assert_token_nowhere(tmp: Path, *outputs: str) -> None:
    for text in outputs:
        assert TOKEN not in text
    for f in tmp.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the background upload did not get there in time"
        time.sleep(0.05)


def test_a_fresh_machine_resumes_from_the_hub_exactly(tmp_path, tiny_model, hub, monkeypatch, capfd):
    straight = train(load_config(write_config(tmp_path / "a", tiny_model)))
    config = write_config(tmp_path / "b", tiny_model, hub_checkpoints=REPO)
    run = tmp_path / "b" / "run"
    commits = lambda: sum(1 for method, path, _ in hub.requests if method == "POST" and "/commit/" in path)
    with monkeypatch.context() as mp:
        sigint_at(mp, 3)
        # Uploads are newest-wins: let step-2 through before step-3 is written, so both reach the Hub.
        stopped = train(load_config(config), on_step=lambda state: state.step == 3 and wait_until(lambda: commits()))
    assert stopped.stopped == "interrupted" and stopped.steps == 3
    # The interrupted run's last checkpoint is on the Hub before train() returns; a private repo, one branch
    # named after the run folder, the newest keep_checkpoints (2) step folders.
    assert hub.repos[REPO]["private"] is True
    assert hub_steps(hub) == ["step-00000002", "step-00000003"]
    for f in (run / "checkpoints" / "step-00000003").iterdir():
        assert hub.repos[REPO]["branches"]["run"][f"checkpoints/step-00000003/{f.name}"] == f.read_bytes()
    assert not list(run.glob(".tmp-*"))  # no staging left behind

    # The machine is gone: no run folder. The newest checkpoint on the Hub is damaged in storage, so the resume
    # must check the manifest and fall back to the one before.
    shutil.rmtree(run)
    blob = bytearray(hub.repos[REPO]["branches"]["run"]["checkpoints/step-00000003/trainable.safetensors"])
    blob[-3] ^= 0xFF
    hub.repos[REPO]["branches"]["run"]["checkpoints/step-00000003/trainable.safetensors"] = bytes(blob)
    capfd.readouterr()
    resumed = train(load_config(config), resume=True)
    out, err = capfd.readouterr()
    err = " ".join(err.split())

    assert "checkpoint step-00000003 in me/ckpts (branch run) does not match its manifest" in err
    assert "resuming from" in err and "step-00000002 (step 2 of 6)" in err
    assert resumed.steps == straight.steps == 6 and resumed.stopped == "finished"
    a, b = adapter(tmp_path / "a" / "run"), adapter(run)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert hub_steps(hub) == ["step-00000004", "step-00000006"]  # the damaged step-3 is gone from the branch
    assert not hub.unhandled, hub.unhandled
    assert_token_nowhere(tmp_path, out, err)


def test_a_failed_upload_warns_once_and_the_next_checkpoint_gets_through(tmp_path, tiny_model, hub, capfd):
    config = write_config(tmp_path, tiny_model, hub_checkpoints=REPO, hub_checkpoints_revision="exp-1")
    commits = lambda: sum(1 for method, path, _ in hub.requests if method == "POST" and "/commit/" in path)

    def fail_one_upload(state):
        # on_step runs before the step's checkpoint: make the stand-in refuse that checkpoint's commit once.
        if state.step == 4:
            wait_until(lambda: commits() == 1)  # step-2 is through
            hub.fail_next["commit"] = 500
        if state.step == 6:  # the last one fails too: the end of training retries it
            wait_until(lambda: commits() == 2 and "commit" not in hub.fail_next)
            hub.fail_next["commit"] = 500

    result = train(load_config(config), on_step=fail_one_upload)
    out, err = capfd.readouterr()
    warnings = [" ".join(w.split()) for w in err.split("warning: ")[1:]]

    assert result.steps == 6 and result.stopped == "finished"  # training went on
    assert len(warnings) == 2, warnings  # one line per failed upload, nothing else
    assert warnings[0].startswith("checkpoint step-00000004 was not uploaded to me/ckpts (branch exp-1): HTTP 500")
    assert warnings[1].startswith("checkpoint step-00000006 was not uploaded")
    assert "training goes on" in warnings[0]
    # step-4 was superseded by step-6, whose retry at the end went through before train() returned.
    assert [c["summary"] for c in hub.repos[REPO]["commits"]] == ["phi2sum checkpoint step-00000002",
                                                                  "phi2sum checkpoint step-00000006"]
    assert hub_steps(hub, "exp-1") == ["step-00000002", "step-00000006"]
    local = tmp_path / "run" / "checkpoints" / "step-00000006"
    assert {f.name: f.read_bytes() for f in local.iterdir()} == {
        p.rsplit("/", 1)[1]: b for p, b in hub.repos[REPO]["branches"]["exp-1"].items() if "step-00000006" in p}
    writes = {auth for method, path, auth in hub.requests if method == "POST"}
    assert writes == {f"Bearer {TOKEN}"}
    assert_token_nowhere(tmp_path, out, err)


def test_no_token_is_one_config_error_before_anything_loads(tmp_path, tiny_model, monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    config = write_config(tmp_path, tiny_model, hub_checkpoints=REPO)
    res = runner.invoke(app, ["train", "--config", str(config)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: train.hub_checkpoints needs a Hugging Face token with write access: set HF_TOKEN or run "
        "`hf auth login`"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()

    res = runner.invoke(app, ["train", "--config", str(config), "--set", "train.hub_checkpoints=not a repo"])
    assert res.exit_code == 2 and "train.hub_checkpoints" in res.output


def test_stale_checkpoints_follow_the_local_rule():
    # Keep the newest `keep` up to the new one; anything newer belongs to a history a resume abandoned.
    assert hubsync._stale({"step-00000002", "step-00000004"}, "step-00000006", 2) == ["step-00000002"]
    assert hubsync._stale(set(), "step-00000002", 2) == []
    assert hubsync._stale({"step-00000004", "step-00000006"}, "step-00000002", 2) == ["step-00000004",
                                                                                    "step-00000006"]
