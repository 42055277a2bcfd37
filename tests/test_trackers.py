"""train.report_to through the real code: TensorBoard event files written by training and eval, read back with
tensorboard's own reader and compared with metrics.jsonl and metrics.json; a tracker that is not installed is one
line before anything loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config_dict
from phi2sum.cli import app
from phi2sum.config import load_config
from phi2sum.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp: Path, model_dir: Path, **train) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(model_dir, tmp, train={"max_steps": 4, "eval_every": 2,
                                                                            "save_every": 2, **train})))
    return path


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    found = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: points for tag, points in found.items() if points}  # a purged tag stays listed, empty


def assert_same_as_metrics_jsonl(logged: dict, run: Path) -> None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("kind", "step") and v is not None:
                expected.setdefault(f"{r['kind']}/{k}", []).append((r["step"], v))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "eval/eval_loss"} <= set(expected)
    assert logged.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_tensorboard_logs_the_metrics_rows_the_config_and_eval_rouge(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")
    config = write_config(tmp_path, tiny_model, report_to=["tensorboard"])
    train(load_config(config))
    run = tmp_path / "run"
    logdir = run / "trackers" / "phi2sum"

    logged = scalars(logdir)
    assert_same_as_metrics_jsonl(logged, run)
    # The resolved config, flattened, is the run's hyperparameters.
    (hparams,) = logdir.glob("*/hparams.yml")
    saved = yaml.safe_load(hparams.read_text())
    assert saved["train.learning_rate"] == 3e-3 and saved["train.report_to"] == '["tensorboard"]'
    assert saved["lora.target_modules"] == json.dumps(load_config(config).lora.target_modules)

    # eval of the run adds its ROUGE means to the same log dir, at the run's last step.
    curves = logged
    res = runner.invoke(app, ["eval", "--adapter", str(run), "--limit", "2"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    logged = scalars(logdir)
    for model in ("fine-tuned", "base"):
        for m in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert logged[f"rouge_test/{model}/{m}"] == [(4, pytest.approx(metrics["models"][model][m]["mean"],
                                                                            rel=1e-6))]
    assert {tag: logged[tag] for tag in curves} == curves  # training's curves untouched

    # --overwrite: TensorBoard shows the new run only, as metrics.jsonl does (the old points are purged).
    train(load_config(config, ["train.seed=7", "train.learning_rate=1e-2"]), overwrite=True)
    assert_same_as_metrics_jsonl(scalars(logdir), run)


def test_a_tracker_not_installed_is_one_line_before_anything_loads(tmp_path, tiny_model):
    absent = next((n for n in ("wandb", "swanlab", "dvclive", "clearml", "aim") if importlib.util.find_spec(n) is None),
                  None)
    if absent is None:
        pytest.skip("every tracker package is installed here")
    config = write_config(tmp_path, tiny_model, report_to=["tensorboard", absent])
    res = runner.invoke(app, ["train", "--config", str(config)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: train.report_to names {absent}, which is not installed: pip install {absent} "
        "(or drop it from train.report_to)"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()

    res = runner.invoke(app, ["train", "--config", str(config), "--set", "train.report_to=[tensorbored]"])
    assert res.exit_code == 2 and "train.report_to" in res.output
