"""The run directory: what a run holds, where each verb reads and writes, and writes that never leave half a file.

`train` writes a run folder (train.output_dir); `eval`, `summarize`, `push` and `merge` read it. Every rule
about that folder lives here, so the verbs cannot drift apart:

    config.yaml           the resolved config (the verbs that read a run start from it)
    adapter_*, tokenizer* the adapter (or, for a full fine-tune, config.json + model weights)
    metrics.jsonl         train/validation rows; loss.png the curves; summary.json the run's totals
    prepare_report.json   the data report of the prepared set used
    checkpoints/step-N/   resumable checkpoints; best/ the adapter at the best validation loss
    eval/                 what `phi2sum eval` wrote (metrics.json, predictions*.jsonl), unless --out
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from pydantic import ValidationError

from .config import SECTIONS, ConfigError, Phi2sumError, RunConfig, looks_local, to_yaml

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# Files a run writes at its top level; `push` uploads the shippable ones, `--overwrite` deletes only these.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.*", "tokenizer*", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "config.json",
                 "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json")
SHIP = ADAPTER_FILES + (CONFIG, SUMMARY, METRICS, "loss.png", "prepare_report.json")
OWN = SHIP + ("README.md", ".tmp-*", "*.tmp", "train.lock")
OWN_DIRS = (CHECKPOINTS, "best", "last", "eval", "trackers", ".tmp-*")


def eval_dir(run: Path | None, cfg: RunConfig, out: Path | None = None) -> Path:
    """Where `eval` writes and `push` reads: --out, else eval.output_dir, else <run>/eval (./eval without a run)."""
    if out is not None:
        return Path(out)
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    return run / "eval" if run is not None else Path("eval")


def is_full_model(run: Path) -> bool:
    """A run of a full fine-tune (lora.enabled: false) holds a whole model instead of an adapter."""
    return (run / "config.json").is_file() and not (run / "adapter_config.json").is_file()


def check_adapter(adapter: str | None) -> None:
    """Fail fast on an --adapter that cannot be one, before any data or model is loaded."""
    if adapter is None:
        return
    local = Path(adapter)
    if local.exists():
        if not (local / "adapter_config.json").is_file() and not is_full_model(local):
            raise ConfigError(f"{adapter} is not an adapter or run directory (no adapter_config.json or "
                              "config.json); pass the output_dir of `phi2sum train`")
    elif looks_local(adapter) or adapter.count("/") != 1:
        raise ConfigError(f"--adapter {adapter}: no such directory, and not a hub id (user/name)")


def check_adapter_config(adapter: str | Path | None) -> None:
    """A local adapter_config.json that PEFT cannot read (cut short, overwritten) is refused before any model
    loads, instead of failing later as a tokenizer or hub error."""
    path = Path(adapter) / "adapter_config.json" if adapter is not None else None
    if path is None or not path.is_file():
        return
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raw = None
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ConfigError(f"{path} is not a PEFT adapter config (a JSON object with peft_type); restore it from "
                          "the run, or pass the output_dir of a finished `phi2sum train`")


def require_trained(run: Path, full_ok: bool = False) -> None:
    """`push` and `merge` need a finished run: an adapter (or, where full_ok, a whole model)."""
    if (run / "adapter_config.json").is_file() or (full_ok and is_full_model(run)):
        return
    if (run / "config.json").is_file():
        raise ConfigError(f"{run} holds a full fine-tune, not a LoRA adapter; it is already a standalone "
                          "model (load it with AutoModelForCausalLM or upload it with `hf upload`)")
    raise ConfigError(f"{run} is not a run directory (no adapter_config.json); pass the train.output_dir "
                      "of a finished `phi2sum train`")


def saved_config(run: Path) -> dict:
    """A run's config.yaml as written by `train`: complete by construction, so a file missing a section
    (cut short, edited by hand) is refused rather than filled in with defaults that change what is scored."""
    import yaml

    path = run / CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} cannot be read as YAML ({type(e).__name__}); restore it from the run or pass "
                          "--config with the settings the run was trained with") from None
    missing = [s for s in SECTIONS if not isinstance(raw, dict) or not isinstance(raw.get(s), dict)]
    if missing:
        raise ConfigError(f"{path} is incomplete (no {', '.join(missing)} section); a run's config.yaml is "
                          "written whole by `phi2sum train`: restore it, or pass --config with the run's settings")
    return raw


def own_entries(run: Path) -> list[Path]:
    """The files and folders in `run` that phi2sum wrote: what --overwrite may delete."""
    out = []
    for p in run.iterdir():
        patterns = OWN_DIRS if p.is_dir() and not p.is_symlink() else OWN
        if any(fnmatch(p.name, pat) for pat in patterns):
            out.append(p)
    return out


def is_run(run: Path) -> bool:
    return (run / CONFIG).is_file() or (run / CHECKPOINTS).is_dir()


@dataclass
class TrainResult:
    """What `train` returns and writes to summary.json."""

    run_dir: str
    steps: int
    total_steps: int
    real_tokens: int
    seconds: float
    tokens_per_second: float
    train_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    final_eval_loss: float | None
    peak_memory_gib: float | None
    peak_reserved_gib: float | None
    device: str
    precision: str
    world_size: int
    stopped: str  # finished | early_stopping | interrupted
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    expected_peak_gib: float | None = None  # the memory check's estimate before the first step (CUDA only)


def finished_result(run: Path, step: int, total_steps: int) -> TrainResult | None:
    """What a run that already finished at this checkpoint recorded in summary.json (so a --resume of it
    changes nothing); None when there is training left (an interrupted run, or more steps asked for)."""
    try:
        saved = json.loads((run / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("stopped") == "interrupted" or saved.get("steps") != step:
        return None
    if step < total_steps and saved.get("stopped") != "early_stopping":
        return None
    known = {f.name for f in dataclasses.fields(TrainResult)}
    return TrainResult(**{k: v for k, v in saved.items() if k in known})


# ----------------------------------------------------------------------------------------------------
# What `train` may do with a folder


def check_for_train(run: Path, overwrite: bool, resume: bool) -> None:
    """Refuse what could lose a run before anything is loaded; nothing is deleted here (see clear_run)."""
    if overwrite and resume:
        raise ConfigError("--resume continues the run in train.output_dir and --overwrite deletes it; pass one")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"train.output_dir {run} is a file; set it to a folder")
    # A folder holding only a lock (and temp files) of a run that failed before writing anything is empty.
    if not run.exists() or resume or all(p.name == "train.lock" or p.name.startswith(".tmp-") for p in run.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{run} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                          "or set train.output_dir to a new folder")
    if not is_run(run):
        raise ConfigError(f"{run} is not a phi2sum run folder; --overwrite deletes only runs. "
                          "Set train.output_dir to a new or empty folder")


def clear_run(run: Path) -> None:
    """--overwrite, once the inputs loaded: delete the files phi2sum wrote, never anything else in the folder."""
    for p in own_entries(run):
        if p.name == "train.lock":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def lock(run: Path):
    """One `phi2sum train` per run folder. The OS releases the lock when the process dies, even by SIGKILL,
    so a killed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    fh = open(run / "train.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(f"another `phi2sum train` is writing to {run}; wait for it, or set train.output_dir "
                          "to another folder") from None
    return fh


def check_same_setup(saved: Path, cfg: RunConfig) -> None:
    old = saved_config(saved.parent)
    try:  # a run saved before a setting existed lacks it: compare with its default filled in
        old = RunConfig.model_validate(old).model_dump(mode="json")
    except ValidationError:  # not a valid config now (a setting since removed): compare as written
        pass
    new = cfg.model_dump(mode="json")
    for part in (old, new):  # where prepared data is cached changes nothing trained (a new machine has its own)
        if isinstance(part.get("data"), dict):
            part["data"] = {k: v for k, v in part["data"].items() if k != "cache_dir"}
    for section in ("model", "lora", "data"):
        if old.get(section) != new[section]:
            raise ConfigError(f"--resume: the {section} settings differ from the run in {saved.parent}; "
                              "resume with the same config, or start a new output_dir")


# ----------------------------------------------------------------------------------------------------
# Writes that leave the old version or the new one, never half of either


def write_error(e: Exception, what: str, kept: str, folder: Path, needed: int) -> Phi2sumError:
    """One line for a write that failed, a full disk most often (whose errors rarely say so): what, where, the
    space it needs (`needed` bytes) and the space left."""
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
    except OSError:
        free = ""
    return Phi2sumError(f"could not write {what} ({type(e).__name__}: {cause}); is the disk full? It needs about "
                        f"{needed / 2**20:,.0f} MiB in {folder}{free}. {kept}: free some space, then continue "
                        "with --resume")


def _replace_file(dest: Path, write) -> None:
    """`write(tmp)` beside `dest`, then rename: a crash leaves the old file or the new one, never half."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_atomic(src: Path, dest: Path) -> None:
    _replace_file(dest, lambda tmp: shutil.copy2(src, tmp))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def replacing_dir(dest: Path, fsync: bool = False, keep_existing: bool = False):
    """Yield an empty folder beside `dest`; when the block succeeds it becomes `dest` in one rename (an older
    `dest` is removed first), when it fails it is deleted. With `fsync` the files reach the disk before the
    rename makes them visible (checkpoints). With `keep_existing`, a `dest` that another process published
    in the meantime (same content: a parallel conversion) is kept instead."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        if dest.exists() and not keep_existing:
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if not (keep_existing and dest.exists()):
                raise ConfigError(f"cannot put {dest} in place ({e.strerror}); delete it and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_config(cfg: RunConfig, path: Path) -> None:
    write_text_atomic(path, to_yaml(cfg))


def plot_losses(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run / METRICS).read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per summary token")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)
