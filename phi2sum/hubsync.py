"""Checkpoints that outlive the machine: with `train.hub_checkpoints: you/repo`, every checkpoint `train` writes is
uploaded to that private Hub repo in the background, and `phi2sum train --resume` on a machine without the run's
checkpoints (a fresh Kaggle/Colab machine) downloads the newest one that verifies and continues from it.

    phi2sum train --config configs/t4.yaml --set train.hub_checkpoints=you/phi2-ckpt            (uploads)
    phi2sum train --config configs/t4.yaml --set train.hub_checkpoints=you/phi2-ckpt --resume   (elsewhere)

On the Hub a run is one branch (train.hub_checkpoints_revision, default: the run folder's name) holding
`checkpoints/step-NNNNNNNN/`, the newest train.keep_checkpoints of them. The token is huggingface_hub's (HF_TOKEN or
`hf auth login`): it goes to HfApi and nowhere else, never into a message, a log or config.yaml.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import time
from pathlib import Path

from . import checkpoint, runs
from .config import ConfigError, Phi2sumError, TrainConfig
from .console import info, warn
from .hub import hub_reason

FLUSH_SECONDS = 600  # at the end of training, wait this long at most for the last upload
STAGING = ".tmp-hub-"  # run/.tmp-hub-step-N: hard links to a checkpoint waiting for its upload


def branch(t: TrainConfig) -> str:
    return t.hub_checkpoints_revision or Path(t.output_dir).resolve().name


def token(t: TrainConfig) -> str:
    """The token for train.hub_checkpoints; one ConfigError before anything loads when there is none."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("train.hub_checkpoints needs the Hub, but HF_HUB_OFFLINE is set; unset it, or set "
                          "train.hub_checkpoints: null")
    found = get_token()  # HF_TOKEN, else the one `hf auth login` saved
    if not found:
        raise ConfigError("train.hub_checkpoints needs a Hugging Face token with write access: set HF_TOKEN or "
                          "run `hf auth login`")
    return found


def _stale(on_hub: set[str], new: str, keep: int) -> list[str]:
    """Step folders to delete with the commit of `new`, by checkpoint.save's rule: newer ones belong to a
    history resume abandoned, and of the rest the newest `keep` (counting `new`) stay."""
    newer = [s for s in on_hub if s > new]
    older = sorted(s for s in on_hub | {new} if s <= new)[:-keep]
    return sorted(newer + [s for s in older if s != new])


# ----------------------------------------------------------------------------------------------------
# Upload, in the background


class Uploader:
    """Uploads checkpoints one at a time on a background thread. A newer checkpoint replaces one still waiting
    (and one whose upload failed: it is the newer state that matters); `close` retries a failed last one once."""

    def __init__(self, repo_id: str, branch_name: str, secret: str, run: Path, keep: int):
        from huggingface_hub import HfApi

        self.repo_id, self.branch, self.run, self.keep = repo_id, branch_name, run, keep
        self._api = HfApi(token=secret)
        self._secret = secret
        self._cv = threading.Condition()
        self._next: Path | None = None  # staged snapshot to upload next
        self._failed: Path | None = None  # newest snapshot whose upload failed
        self._busy = self._closing = self._retried = self._repo_ready = False
        self._thread: threading.Thread | None = None
        for left in run.glob(f"{STAGING}*"):  # a killed process's staging
            shutil.rmtree(left, ignore_errors=True)

    def submit(self, ckpt: Path) -> None:
        """Queue checkpoint folder `ckpt`; returns at once. The files are hard-linked first, so the upload reads
        them even after checkpoint.save prunes the folder (checkpoint files are never rewritten in place)."""
        snap = self.run / f"{STAGING}{ckpt.name}"
        shutil.rmtree(snap, ignore_errors=True)
        snap.mkdir()
        for f in ckpt.iterdir():
            try:
                os.link(f, snap / f.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, snap / f.name)
        with self._cv:
            for old in (self._next, self._failed):
                if old is not None and old != snap:
                    shutil.rmtree(old, ignore_errors=True)
            self._next, self._failed = snap, None
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="phi2sum-hub-checkpoints", daemon=True)
                self._thread.start()
                atexit.register(self.close)  # an exception out of train() still flushes the last upload
            self._cv.notify_all()

    def close(self, timeout: float = FLUSH_SECONDS) -> None:
        """Wait (at most `timeout` s) for the upload in progress, retry a failed last one once, stop the thread."""
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout
        with self._cv:
            if self._thread is None:
                return
            while True:
                idle = self._cv.wait_for(lambda: not self._busy and self._next is None,
                                         max(0.0, deadline - time.monotonic()))
                if not idle:
                    pending = self._next or self._failed
                    warn(f"checkpoint upload to {self.repo_id} still running after {timeout:.0f} s; not waiting for "
                         f"it: {pending.name.removeprefix(STAGING) if pending else 'the last checkpoint'} stays in "
                         f"{self.run / runs.CHECKPOINTS}")
                    break
                if self._failed is None or self._retried:
                    break
                self._next, self._failed, self._retried = self._failed, None, True
                self._cv.notify_all()
            self._closing = True
            self._cv.notify_all()
        if idle:  # else the upload still reads its staging folder; the next Uploader clears it
            self._thread.join(timeout=1)
            for left in self.run.glob(f"{STAGING}*"):
                shutil.rmtree(left, ignore_errors=True)

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._next is not None or self._closing)
                if self._next is None:
                    return
                snap, self._next, self._busy = self._next, None, True
            ok = self._upload(snap)
            with self._cv:
                self._busy = False
                if ok or self._next is not None:  # uploaded, or superseded by a newer checkpoint
                    shutil.rmtree(snap, ignore_errors=True)
                else:
                    self._failed = snap
                self._cv.notify_all()

    def _upload(self, snap: Path) -> bool:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        name = snap.name.removeprefix(STAGING)
        if not checkpoint.is_valid(snap):  # never upload what resume would refuse
            warn(f"checkpoint {name} does not match its manifest; not uploaded")
            return True
        bars_were_off = are_progress_bars_disabled()
        disable_progress_bars()  # upload bars would tear through the training progress bar
        try:
            if not self._repo_ready:
                self._api.create_repo(self.repo_id, private=True, exist_ok=True)
                self._api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
                self._repo_ready = True
            on_hub = {p.split("/")[1] for p in self._api.list_repo_files(self.repo_id, revision=self.branch)
                      if p.startswith(f"{runs.CHECKPOINTS}/{checkpoint.PREFIX}")}
            ops = [CommitOperationAdd(f"{runs.CHECKPOINTS}/{name}/{f.name}", str(f)) for f in sorted(snap.iterdir())]
            ops += [CommitOperationDelete(f"{runs.CHECKPOINTS}/{s}/", is_folder=True)
                    for s in _stale(on_hub, name, self.keep)]
            self._api.create_commit(self.repo_id, ops, commit_message=f"phi2sum checkpoint {name}",
                                    revision=self.branch)
            return True
        except Exception as e:
            self._repo_ready = False  # the repo or branch may be what went missing
            later = (f"it is only in {self.run / runs.CHECKPOINTS}" if self._retried else
                     "training goes on; the next checkpoint (or the end of training) retries")
            warn(f"checkpoint {name} was not uploaded to {self.repo_id} (branch {self.branch}): "
                 f"{hub_reason(e, self._secret)}; {later}")
            return False
        finally:
            if not bars_were_off:
                enable_progress_bars()


# ----------------------------------------------------------------------------------------------------
# Download, on resume


def pull(t: TrainConfig, run: Path, secret: str) -> None:
    """`--resume` with no valid checkpoint in the run folder: put the newest checkpoint of the Hub branch that
    matches its manifest into <run>/checkpoints. Nothing on the Hub yet is said and training starts at step 0."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    root = run / runs.CHECKPOINTS
    if any(checkpoint.is_valid(p) for p in root.glob(f"{checkpoint.PREFIX}*")):
        return
    repo, rev = t.hub_checkpoints, branch(t)
    api = HfApi(token=secret)
    try:
        files = api.list_repo_files(repo, revision=rev)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        info(f"no checkpoints on the Hub in {repo} (branch {rev}): no such repo or branch yet, or the token cannot "
             "read it; starting from step 0")
        return
    except Exception as e:  # network, permissions: resuming from step 0 instead would silently waste the run
        raise Phi2sumError(f"--resume: cannot list the checkpoints in {repo} (branch {rev}): {hub_reason(e, secret)}; "
                           "check the network and the token, then run again") from None
    steps: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        if len(parts) == 3 and parts[0] == runs.CHECKPOINTS and parts[1].startswith(checkpoint.PREFIX):
            steps.setdefault(parts[1], []).append(f)
    root.mkdir(parents=True, exist_ok=True)
    for name in sorted(steps, reverse=True):
        tmp = root / f"{STAGING}{name}"  # checkpoint.save clears checkpoints/.tmp-* left by a kill
        shutil.rmtree(tmp, ignore_errors=True)
        info(f"downloading checkpoint {name} from {repo} (branch {rev})")
        try:
            for f in steps[name]:
                hf_hub_download(repo, f, revision=rev, local_dir=tmp, token=secret, endpoint=api.endpoint)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Phi2sumError(f"--resume: downloading checkpoint {name} from {repo} failed: {hub_reason(e, secret)}; "
                               "run again") from None
        got = tmp / runs.CHECKPOINTS / name
        if checkpoint.is_valid(got):
            shutil.rmtree(root / name, ignore_errors=True)  # an invalid local copy of the same step
            os.replace(got, root / name)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        warn(f"checkpoint {name} in {repo} (branch {rev}) does not match its manifest; trying the one before")
    info(f"no valid checkpoint on the Hub in {repo} (branch {rev}); starting from step 0")
