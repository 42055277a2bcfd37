"""The run folder's rules (phi2sum/runs.py), one place for every verb: what phi2sum may delete, where eval writes and
push reads, which folders are runs or adapters, a run's saved config, and writes that leave the old file or the
new one, never half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from phi2sum import runs
from phi2sum.config import ConfigError, RunConfig, load_config


def touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")


def test_own_entries_are_what_phi2sum_wrote_and_nothing_else(tmp_path):
    ours = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "config.yaml", "summary.json", "metrics.jsonl", "loss.png",
            "prepare_report.json", "README.md", "train.lock", ".metrics.jsonl.123.tmp", "checkpoints/", "best/",
            "last/", "eval/", ".tmp-best-abc/", "model.safetensors", "config.json"]
    theirs = ["notes.txt", "src/", "data.jsonl", "checkpoints.txt", "eval.py", "config.yaml.bak", "best.txt",
              "my-model.safetensors"]
    touch(tmp_path, *ours, *theirs)
    (tmp_path / "summary").mkdir()  # a folder named like a file of ours is not ours
    assert sorted(p.name for p in runs.own_entries(tmp_path)) == sorted(n.rstrip("/") for n in ours)


def test_a_run_is_a_config_or_checkpoints(tmp_path):
    assert not runs.is_run(tmp_path)
    touch(tmp_path, "checkpoints/")
    assert runs.is_run(tmp_path)
    touch(tmp_path / "other", "config.yaml")
    assert runs.is_run(tmp_path / "other")


def test_eval_writes_to_out_then_eval_output_dir_then_the_run(tmp_path):
    run = tmp_path / "run"
    assert runs.eval_dir(run, RunConfig()) == run / "eval"
    assert runs.eval_dir(None, RunConfig()) == Path("eval")
    cfg = load_config(None, [f"eval.output_dir={tmp_path / 'scores'}"])
    assert runs.eval_dir(run, cfg) == tmp_path / "scores"
    assert runs.eval_dir(run, cfg, tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_adapters_runs_and_full_models_are_told_apart(tmp_path):
    adapter, full, neither = tmp_path / "adapter", tmp_path / "full", tmp_path / "neither"
    touch(adapter, "adapter_config.json")
    touch(full, "config.json", "model.safetensors")
    touch(neither, "notes.txt")
    assert not runs.is_full_model(adapter) and runs.is_full_model(full)
    runs.check_adapter(None)
    runs.check_adapter(str(adapter))
    runs.check_adapter(str(full))
    runs.check_adapter("someone/adapter")  # a hub id: checked when it loads
    with pytest.raises(ConfigError, match="is not an adapter or run directory"):
        runs.check_adapter(str(neither))
    for missing in (str(tmp_path / "gone"), "./gone", "a/b/c"):
        with pytest.raises(ConfigError, match="no such directory, and not a hub id"):
            runs.check_adapter(missing)
    runs.require_trained(adapter)
    runs.require_trained(full, full_ok=True)
    with pytest.raises(ConfigError, match="holds a full fine-tune"):
        runs.require_trained(full)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        runs.require_trained(neither)


def test_saved_config_must_be_whole(tmp_path):
    whole = RunConfig().model_dump(mode="json")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(whole))
    assert runs.saved_config(tmp_path) == whole
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: whole[k] for k in ("model", "data", "train")}))
    with pytest.raises(ConfigError, match=r"is incomplete \(no lora, generation, eval, push section\)"):
        runs.saved_config(tmp_path)
    (tmp_path / "config.yaml").write_bytes(b"model: {name: caf\xe9}\n")
    with pytest.raises(ConfigError, match="cannot be read as YAML"):
        runs.saved_config(tmp_path)


def test_atomic_writes_leave_the_old_file_when_they_fail(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    runs.write_text_atomic(path, "old")
    runs.write_jsonl_atomic(tmp_path / "rows.jsonl", [{"a": "é"}, {"b": 2}])
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError):
        runs.write_text_atomic(path, "new")
    source = tmp_path / "source.bin"
    source.write_bytes(b"new")
    with pytest.raises(OSError):
        runs.copy_atomic(source, path)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "source.bin", "summary.json"]  # no temp left
    runs.copy_atomic(source, path)
    assert path.read_bytes() == b"new"


def test_replacing_dir_publishes_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "best"
    with runs.replacing_dir(dest) as tmp:
        (tmp / "adapter_model.safetensors").write_text("one")
    assert (dest / "adapter_model.safetensors").read_text() == "one"
    with pytest.raises(RuntimeError), runs.replacing_dir(dest) as tmp:  # a failed write: the old one stays
        (tmp / "adapter_model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert (dest / "adapter_model.safetensors").read_text() == "one"
    with runs.replacing_dir(dest, fsync=True) as tmp:  # a successful one replaces it whole
        (tmp / "other.json").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["other.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp folder left either way


def test_a_conversion_published_by_another_process_first_is_kept(tmp_path):
    """Two processes converting the same GGUF (ranks of one `accelerate launch`): the second to finish
    finds the folder taken, keeps the finished copy and cleans up its own."""
    out = tmp_path / "smollm2-abc"
    for name in ("first", "second"):
        with runs.replacing_dir(out, keep_existing=True) as tmp:
            (tmp / "config.json").write_text(name)
            (tmp / "model.safetensors").write_text(name)
    assert (out / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-abc"]


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.learning_rate=1e-3", "lora.target_modules=[q_proj]"])
    runs.save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert json.loads(json.dumps(runs.saved_config(tmp_path)))["train"]["learning_rate"] == 1e-3
