"""What the environment decides: an accelerate launch set up for FSDP or DeepSpeed is refused with one line before
anything loads, and the caches follow the usual variables (PHI2SUM_CACHE, XDG_CACHE_HOME, HF_HOME), never a
hard-coded folder in the home directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ONE_THREAD, ROOT, error_lines, write_config
from phi2sum.cli import app

runner = CliRunner()


@pytest.mark.parametrize("var, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharded_accelerate_launch_is_refused_before_anything_loads(var, name, make_config, tmp_path, monkeypatch):
    """What `accelerate launch` sets for an FSDP or DeepSpeed config: one line naming what to do, exit 2, and no run
    folder, prepared data or model (DeepSpeed is not even installed: no ImportError either)."""
    monkeypatch.setenv(var, "true")
    res = runner.invoke(app, ["train", "--config", str(make_config())])
    assert res.exit_code == 2, res.output
    assert error_lines(res.output) == [res.output.strip()]  # one line, no traceback
    line = res.output.strip()
    assert f"accelerate is set up for {name} ({var}=true" in line
    assert "`accelerate config`" in line and "accelerate launch --multi_gpu --num_processes N" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_caches_follow_xdg_cache_home_and_hf_home(tiny_model, tmp_path):
    """With HOME, XDG_CACHE_HOME and HF_HOME pointed at fresh folders, `prepare` with no data.cache_dir caches its
    tokenized data in $XDG_CACHE_HOME/phi2sum/prepared, beside the model cache (modeling.CACHE), datasets' own cache
    goes under $HF_HOME, and nothing is written in the home directory. PHI2SUM_CACHE moves both of phi2sum's."""
    home, xdg, hf = tmp_path / "home", tmp_path / "xdg", tmp_path / "hf"
    home.mkdir()
    config = write_config(tmp_path / "cfg", tiny_model, data={"cache_dir": None, "source": str(ROOT / "tests" / "data" /
                                                                                                 "custom" / "samsum")})
    hidden = ("PHI2SUM_CACHE", "XDG_CACHE_HOME", "HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
              "TRANSFORMERS_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in hidden} | ONE_THREAD
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(xdg), "HF_HOME": str(hf)}
    proc = subprocess.run([sys.executable, "-m", "phi2sum", "prepare", "--config", str(config)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((xdg / "phi2sum" / "prepared").glob("*/report.json"))) == 1
    assert (hf / "datasets").is_dir()  # the CSV builder's cache
    assert not list(home.rglob("*")), list(home.rglob("*"))

    script = ("import json; from phi2sum import modeling, data; from phi2sum.config import DataConfig; "
              "print(json.dumps([str(modeling.CACHE), str(data.cache_folder(DataConfig()))]))")
    for extra, root in (({}, xdg / "phi2sum"), ({"PHI2SUM_CACHE": str(tmp_path / "mine")}, tmp_path / "mine")):
        proc = subprocess.run([sys.executable, "-c", script], env=env | extra, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.splitlines()[-1]) == [str(root), str(root / "prepared")]


def test_resume_on_a_machine_with_another_cache_folder_is_the_same_setup(tiny_model, tmp_path):
    """The prepared-data cache is per machine (a fresh Kaggle box, another user's XDG_CACHE_HOME): --resume
    compares what is trained, not where its tokenized copy lives."""
    from phi2sum.config import ConfigError, load_config, to_yaml
    from phi2sum.runs import check_same_setup

    config = write_config(tmp_path, tiny_model)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(config)))
    check_same_setup(run / "config.yaml", load_config(config, ["data.cache_dir=null"]))
    with pytest.raises(ConfigError, match="the data settings differ"):
        check_same_setup(run / "config.yaml", load_config(config, ["data.cache_dir=null", "data.max_length=300"]))
