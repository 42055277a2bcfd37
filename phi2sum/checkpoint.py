"""Resumable checkpoints: written to a temporary folder, checksummed, fsynced and renamed into place, so a kill
(even SIGKILL) or a full disk mid-write leaves the previous checkpoint intact; read back only when every file
matches the manifest.

A checkpoint holds the trainable weights (safetensors), the optimizer, the fp16 loss scaler, every random
generator's state, and the loop's TrainState: enough for `phi2sum train --resume` to continue exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runs
from .config import ConfigError
from .console import info, warn

PREFIX = "step-"


@dataclass
class TrainState:
    """What the loop carries from step to step and a checkpoint carries across a restart."""

    step: int = 0  # optimizer steps taken, skipped ones included: the data position is a function of it
    micro_per_step: int = 1  # micro-batches per optimizer step over all processes (kept on resume)
    batch_size: int = 1
    packing: bool = False  # train.packing: batches of packed rows, another order; kept on resume like batch_size
    real_tokens: int = 0  # non-padding tokens trained on
    seconds: float = 0.0
    best_eval_loss: float | None = None
    best_step: int | None = None
    final_eval_loss: float | None = None
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    skipped_steps: int = 0  # steps whose update was skipped: non-finite loss or gradients

    def updated(self, raw: dict) -> "TrainState":
        """This state with the fields a checkpoint saved (one written before a field existed keeps ours)."""
        known = {f.name for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v for k, v in raw.items() if k in known})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(run: Path, state: TrainState, model, optimizer, scaler, keep: int) -> Path:
    """Write checkpoints/step-N for `state.step`, then keep only the newest `keep`."""
    from safetensors.torch import save_file

    root = run / runs.CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:08d}"
    for torn in root.glob(".tmp-*"):  # left by a killed run (only one process writes here)
        shutil.rmtree(torn, ignore_errors=True)
    try:
        with runs.replacing_dir(final, fsync=True) as tmp:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                       tmp / "state.pt")
            (tmp / "trainer.json").write_text(json.dumps(dataclasses.asdict(state)))
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / "manifest.json").write_text(json.dumps({"step": state.step,
                                                           "files": {f: _sha256(tmp / f) for f in files}}))
    except Exception as e:  # a full disk, most often: torch.save says so only as "unexpected pos" (RuntimeError)
        raise runs.write_error(e, f"checkpoint {final}", "The older checkpoints are intact", root,
                               _bytes(model, optimizer)) from e
    # Newer checkpoints than this one are ones resume skipped as corrupt: never keep them instead of this one.
    newer = [p for p in root.glob(f"{PREFIX}*") if p.name > final.name]
    for old in newer + sorted(p for p in root.glob(f"{PREFIX}*") if p.name <= final.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _bytes(model, optimizer) -> int:
    """About what a checkpoint takes on disk: the trainable weights and the optimizer's state tensors."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return weights + state


def is_valid(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return all(_sha256(path / f) == digest for f, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest(run: Path) -> Path | None:
    """The newest checkpoint whose files all match its manifest (a corrupted one is skipped, said once)."""
    for path in sorted((run / runs.CHECKPOINTS).glob(f"{PREFIX}*"), reverse=True):
        if is_valid(path):
            return path
        warn(f"checkpoint {path} is incomplete or corrupted (checksum mismatch); skipping it")
    return None


def load(path: Path, model, optimizer, scaler, fresh: TrainState) -> TrainState:
    """Restore weights, optimizer, scaler and random state in place; return the loop's state (`fresh`
    updated with what the checkpoint saved)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    blob = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    rng = blob["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved = json.loads((path / "trainer.json").read_text())
    saved.setdefault("packing", False)  # written before train.packing existed: an unpacked run
    return fresh.updated(saved)


def resumed_micro_per_step(saved: TrainState, t, world: int, main: bool) -> int:
    """A resumed run keeps its global batch whatever the process count now: the data position is the
    step number, so rows per step must not change. grad_accum is adapted where it divides."""
    if saved.packing != t.packing:
        raise ConfigError(f"--resume: the run used train.packing={str(saved.packing).lower()}; resume with that value")
    if saved.batch_size != t.batch_size:
        raise ConfigError(f"--resume: the run used train.batch_size={saved.batch_size}; resume with that value")
    if saved.micro_per_step == t.grad_accum * world:
        return saved.micro_per_step
    if saved.micro_per_step % world:
        raise ConfigError(f"--resume: the run took {saved.micro_per_step} micro-batches per step (grad_accum x "
                          f"processes); {world} processes cannot split that evenly; resume with a process count "
                          f"that divides {saved.micro_per_step}")
    if main:
        info(f"resuming keeps the run's {saved.micro_per_step} micro-batches of {t.batch_size} rows per step: with "
             f"{world} process(es), train.grad_accum {t.grad_accum} -> {saved.micro_per_step // world}")
    return saved.micro_per_step


class StopRequests:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
