"""Experiment trackers through accelerate: `train.report_to: [tensorboard]` (or wandb, mlflow, trackio, ...) logs
the rows of metrics.jsonl and the resolved config; `phi2sum eval` of the run adds its ROUGE means.

    phi2sum train --config configs/p100.yaml --set 'train.report_to=[tensorboard]'
    tensorboard --logdir runs/phi2-dialogsum/trackers

TensorBoard writes into <run>/trackers/phi2sum, so training curves and eval scores share one log dir. The other
trackers log where their own settings point (WANDB_*, MLFLOW_TRACKING_URI, ...), in project `phi2sum` under the
run folder's name.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import runs
from .config import ConfigError, RunConfig
from .console import warn

PROJECT = "phi2sum"
FOLDER = "trackers"
# accelerate's tracker names -> the pip package that provides each.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def missing(names: list[str]) -> list[str]:
    """The named trackers whose package is not installed (accelerate's own availability checks)."""
    from accelerate import utils

    return [n for n in names if not getattr(utils, f"is_{n}_available")()]


def check(names: list[str]) -> None:
    """One ConfigError before anything loads, not a crash at the first logged step."""
    absent = missing(names)
    if absent:
        raise ConfigError(f"train.report_to names {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} "
                          f"not installed: pip install {' '.join(PACKAGES[n] for n in absent)} "
                          "(or drop it from train.report_to)")


def _init_kwargs(run_name: str, purge_from: int | None) -> dict:
    # purge_from: TensorBoard hides earlier points from this step on, as metrics.jsonl drops them: what an
    # interrupted process logged after its checkpoint (resume), or a whole older run in the folder (--overwrite).
    return {"tensorboard": {"purge_step": purge_from} if purge_from is not None else {},
            "wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}


def flat_config(cfg: RunConfig) -> dict:
    """The resolved config as one level of `section.field` keys with scalar values (what trackers store)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list) else value

    walk("", cfg.model_dump(mode="json"))
    return out


def start(accelerator, cfg: RunConfig, run: Path, resumed_at: int) -> None:
    """Open the tracker run of train.report_to (every process calls this; accelerate picks who writes)."""
    if cfg.train.report_to:
        accelerator.init_trackers(PROJECT, config=flat_config(cfg),
                                  init_kwargs=_init_kwargs(run.resolve().name, resumed_at + 1))


def scalars(row: dict) -> dict:
    """A metrics.jsonl row as tracker values: {"train/loss": ..., "train/lr": ...}, step and Nones left out."""
    return {f"{row['kind']}/{k}": v for k, v in row.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def finish(accelerator) -> None:
    # Not accelerator.end_training(): that also destroys the process group, which the caller of train() may
    # still use (a second run in the same process).
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def log_eval(cfg: RunConfig, adapter: str | None, metrics: dict) -> None:
    """`phi2sum eval` of a run whose config names trackers: its ROUGE means (fine-tuned and base) go to the same
    tracker run, at the run's last training step. A tracker not installed here is skipped with a warning: the
    scores are in metrics.json either way."""
    names = cfg.train.report_to
    if not names or adapter is None or not (Path(adapter) / runs.CONFIG).is_file():
        return
    absent = missing(names)
    if absent:
        warn(f"ROUGE not logged to {', '.join(absent)} (not installed: pip install "
             f"{' '.join(PACKAGES[n] for n in absent)}); the scores are in metrics.json")
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run = Path(adapter)
    try:
        step = json.loads((run / runs.SUMMARY).read_text())["steps"]
    except (OSError, ValueError, KeyError):
        step = None
    values = {f"rouge_{metrics['split']}/{model}/{m}": scores[m]["mean"]
              for model, scores in metrics["models"].items() for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    kwargs = _init_kwargs(run.resolve().name, None)  # adds to the training curves, hides nothing
    for name in names:
        if name in absent:
            continue
        cls = LOGGER_TYPE_TO_CLASS[name]
        tracker = (cls(PROJECT, str(run / FOLDER), **kwargs.get(name, {})) if cls.requires_logging_directory
                   else cls(PROJECT, **kwargs.get(name, {})))
        tracker.start()
        tracker.log(values, step=step)
        tracker.finish()
