"""Config: every shipped YAML validates on the hardware it is for and says on top how to run it, defaults < YAML
< --set, and every mistake is one readable line naming where it came from (the file, or --set)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT
from phi2sum.cli import app
from phi2sum.config import ConfigError, RunConfig, load_config, to_yaml

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

runner = CliRunner()


def write(tmp_path: Path, raw, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw), encoding="utf-8")
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates_and_round_trips(path):
    cfg = load_config(path)
    # The resolved YAML that --dry-run prints and runs save is itself a valid config with the same values.
    again = RunConfig.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_runs_on_the_hardware_it_asks_for(path):
    """A CPU config is valid on a machine without a GPU; a GPU config on a GPU with bf16, and on one without
    (P100/T4) unless it asks for bf16 itself."""
    cfg = load_config(path)
    if cfg.train.device == "cpu":
        assert cfg.problems(cuda=False) == []
    else:
        assert cfg.problems(cuda=True, bf16=True) == []
        if cfg.train.precision != "bf16":
            assert cfg.problems(cuda=True, bf16=False) == []


def header_command(path: Path) -> list[str]:
    """The first comment line of a config, as the arguments of the `phi2sum` command it must hold (only its
    first command when it chains several with &&)."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{path.name}: start with a comment holding the command that runs it"
    try:
        words = shlex.split(first.lstrip("#"))
    except ValueError:  # an unbalanced quote: prose, not a command
        words = []
    words = words[: words.index("&&")] if "&&" in words else words
    assert words[:1] == ["phi2sum"], f"{path.name}: the first line must be the `phi2sum ...` command that runs it"
    return words[1:]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_says_on_top_how_to_run_it(path, monkeypatch):
    """The first line is a command a user can paste: it names this very file with --config, and run from the
    repository root (with --dry-run: nothing is loaded) it parses and resolves to this config."""
    args = header_command(path)
    assert "--config" in args, f"{path.name}: the command on top must pass --config {path.relative_to(ROOT)}"
    assert (ROOT / args[args.index("--config") + 1]).resolve() == path.resolve()
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert RunConfig.model_validate(yaml.safe_load(result.stdout)) == load_config(path)


# ----------------------------------------------------------------------------------------------------
# Precedence and --set


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, {"train": {"learning_rate": 1e-3, "batch_size": 2}, "lora": {"r": 8}})
    cfg = load_config(path, ["train.learning_rate=5e-4"])
    assert cfg.train.learning_rate == 5e-4  # --set beats YAML
    assert cfg.train.batch_size == 2  # YAML beats the default
    assert cfg.lora.r == 8
    assert cfg.train.grad_accum == RunConfig().train.grad_accum  # untouched fields keep their defaults
    assert load_config(path).train.learning_rate == 1e-3
    assert load_config().train.learning_rate == RunConfig().train.learning_rate


def test_set_parses_values_as_yaml(tmp_path):
    cfg = load_config(None, ["train.max_steps=10", "train.learning_rate=0.0003", "lora.alpha=12.5",
                             "lora.target_modules=[q_proj, v_proj]", "data.max_rows={train: 5}",
                             "train.keep_best=false", "model.name=some/model"])
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == 3e-4
    assert cfg.lora.alpha == 12.5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_rows == {"train": 5}
    assert cfg.train.keep_best is False
    assert cfg.model.name == "some/model"


@pytest.mark.parametrize("item", ["train.max_steps", "=5", " =5"])
def test_set_without_field_and_value_is_an_error(item):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, [item])


def test_set_into_a_value_is_an_error(tmp_path):
    path = write(tmp_path, {"train": {"seed": 1}})
    with pytest.raises(ConfigError, match="seed is not a section"):
        load_config(path, ["train.seed.x=1"])


def test_set_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match=r"^--set: train\.learning_rat: unknown field"):
        load_config(None, ["train.learning_rat=1e-4"])


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    """A field given with --set is reported as --set's, a field from the file as the file's: the user is sent
    to the place to fix."""
    path = write(tmp_path, {"train": {"batch_size": 0}, "lora": {"r": 8}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.dropout=2", "eval.limit=0"])
    assert sorted(str(info.value).splitlines()) == [
        "--set: eval.limit: Input should be greater than or equal to 1",
        "--set: lora.dropout: Input should be less than 1",
        f"{path}: train.batch_size: Input should be greater than or equal to 1"]
    result = runner.invoke(app, ["prepare", "--config", str(path), "--set", "lora.dropout=2"])
    assert result.exit_code == 2
    assert sorted(error_lines(result.output)) == [
        "error: --set: lora.dropout: Input should be less than 1",
        f"error: {path}: train.batch_size: Input should be greater than or equal to 1"]


def test_cli_set_reaches_the_resolved_config(make_config):
    result = runner.invoke(app, ["train", "--config", str(make_config()), "--set", "train.max_steps=7",
                                 "--set", "lora.r=4", "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 7 and resolved["lora"]["r"] == 4


# ----------------------------------------------------------------------------------------------------
# Bad configs: one ConfigError naming the field or file, and through the CLI one line each, exit 2


BAD = {
    "unknown key": ({"train": {"learning_rat": 1e-4}}, ["train.learning_rat", "unknown field"]),
    "unknown section": ({"trian": {"seed": 1}}, ["trian", "unknown field"]),
    "wrong type": ({"train": {"batch_size": "four"}}, ["train.batch_size", "integer"]),
    "out of range": ({"lora": {"dropout": 1.5}}, ["lora.dropout", "less than 1"]),
    "bad literal": ({"model": {"quantization": "3bit"}}, ["model.quantization", "'4bit'"]),
    "section not a mapping": ({"train": 5}, ["train"]),
    "malformed YAML": ("train:\n  seed: 1\n bad: [\n", ["not valid YAML", "line"]),
    "not a mapping": ("- just\n- a list\n", ["expected a mapping"]),
    "non-UTF-8": (b"train:\n  seed: 1 # caf\xe9\n", ["not UTF-8"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_is_a_config_error_naming_the_problem(tmp_path, case):
    raw, needles = BAD[case]
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("verb", [["prepare"], ["train", "--dry-run"]], ids=["prepare", "train"])
@pytest.mark.parametrize("case", [*BAD, "missing file"])
def test_cli_reports_bad_config_in_one_line(tmp_path, verb, case):
    if case == "missing file":
        path, needles = tmp_path / "nope.yaml", ["not found"]
    else:
        raw, needles = BAD[case]
        path = write(tmp_path, raw)
    result = runner.invoke(app, [verb[0], "--config", str(path), *verb[1:]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert str(path) in lines[0]
    for needle in needles:
        assert needle in lines[0]


def test_every_pydantic_problem_gets_its_own_line(tmp_path):
    path = write(tmp_path, {"train": {"batch_size": 0, "learning_rat": 1}, "lora": {"dropout": 2}})
    result = runner.invoke(app, ["prepare", "--config", str(path)])
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 3, result.output
    for field in ("train.batch_size", "train.learning_rat", "lora.dropout"):
        assert sum(field in line for line in lines) == 1, result.output


def test_cross_field_problems_are_collected_together(tmp_path):
    path = write(tmp_path, {"train": {"keep_best": True, "eval_every": 20, "save_every": 50},
                            "data": {"max_length": 64, "max_summary_tokens": 128}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value).splitlines()
    assert len(message) == 2
    assert "train.save_every (50) must be a multiple of train.eval_every (20)" in message[0]
    assert "data.max_length (64)" in message[1] and "raise max_length" in message[1]
    for verb in (["prepare"], ["train", "--dry-run"]):
        result = runner.invoke(app, [verb[0], "--config", str(path), *verb[1:]])
        assert result.exit_code == 2
        assert "Traceback" not in result.output
        assert len(error_lines(result.output)) == 2, result.output


@pytest.mark.parametrize("overrides, fix", [
    (["train.early_stopping_patience=2", "train.eval_every=0"], "needs train.eval_every > 0"),
    (["lora.enabled=false"], "set model.quantization: none"),
    (["lora.use_dora=true", "model.quantization=8bit"], "use model.quantization: 4bit or none"),
    (["train.optimizer=adamw_8bit", "train.device=cpu"], "use adamw on the CPU"),
    (["train.precision=bf16", "train.device=cpu"], "use fp32"),
    (["model.quantization=4bit", "train.device=cpu"], "set model.quantization: none to train on the CPU"),
    (["generation.do_sample=true", "generation.num_beams=4"], "pick one"),
    (["generation.mbr_candidates=1"], "use 0 \\(off\\) or 2 or more"),
    (["generation.mbr_evidence=8"], "mbr_evidence needs sampled MBR candidates"),
    (["generation.mbr_evidence=8", "generation.mbr_candidates=4"], "mbr_evidence needs sampled MBR candidates"),
    (["train.packing=true", "model.trust_remote_code=true"], "set train.packing: false"),
    (["train.packing=true", "model.attn_implementation=flash_attention_2"], "set model.attn_implementation: sdpa"),
])
def test_cross_field_checks_name_the_fix(overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        load_config(None, overrides)


# ----------------------------------------------------------------------------------------------------
# --dry-run prints the resolved config and runs nothing


@pytest.mark.parametrize("verb", [["prepare"], ["train"], ["eval"], ["summarize", "x.txt"]],
                         ids=["prepare", "train", "eval", "summarize"])
def test_dry_run_prints_resolved_config(make_config, tmp_path, verb):
    path = make_config()
    result = runner.invoke(app, [*verb, "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "learning_rate" in result.output
    assert RunConfig.model_validate(yaml.safe_load(result.stdout)) == load_config(path)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing ran


# ----------------------------------------------------------------------------------------------------
# Checks that depend on the machine


def test_bf16_on_a_gpu_without_bf16_points_to_fp16():
    cfg = load_config(None, ["train.precision=bf16"])
    assert cfg.problems() == []  # the config alone is fine: it depends on the card
    problems = cfg.problems(cuda=True, bf16=False)
    assert len(problems) == 1 and "fp16" in problems[0]
    assert cfg.problems(cuda=True, bf16=True) == []


def test_quantization_on_cpu_points_to_none():
    cfg = load_config(None, ["model.quantization=4bit"])
    assert cfg.problems() == [] and cfg.problems(cuda=True, bf16=False) == []
    assert any("quantization: none" in p for p in cfg.problems(cuda=False))
    assert load_config(None, ["model.quantization=none"]).problems(cuda=False) == []


def test_cuda_device_without_gpu():
    cfg = load_config(None, ["train.device=cuda", "model.quantization=none"])
    assert cfg.problems() == []
    assert any("train.device is cuda" in p for p in cfg.problems(cuda=False))


def test_packing_needs_transformers_packed_sequence_masks(monkeypatch):
    """transformers 4.x builds the packed (block-diagonal) mask only with torch 2.6+, and says nothing otherwise:
    train.packing is refused there, and where transformers has no packed-sequence masks at all."""
    import torch
    import transformers
    from transformers import masking_utils

    cfg = load_config(None, ["train.packing=true"])
    assert cfg.problems(cuda=True, bf16=True) == []
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    [why] = cfg.problems(cuda=True, bf16=True)
    assert "train.packing needs torch 2.6+ with transformers 4.57.6" in why and "set train.packing: false" in why
    assert cfg.problems() == [] and load_config(None).problems(cuda=True, bf16=True) == []  # only when it would run
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    assert cfg.problems(cuda=True, bf16=True) == []
    monkeypatch.delattr(masking_utils, "find_packed_sequence_indices")
    [why] = cfg.problems(cuda=True, bf16=True)
    assert "which transformers 4.57.6 lacks" in why


def test_generation_has_its_own_device_and_precision():
    """eval and summarize no longer borrow train.device/precision: a GPU-trained run can be scored on a CPU."""
    cfg = load_config(None, ["train.device=cuda", "train.precision=bf16", "generation.device=cpu",
                             "generation.precision=fp32"])
    assert (cfg.generation.device, cfg.generation.precision) == ("cpu", "fp32")
    assert (RunConfig().generation.device, RunConfig().generation.precision) == ("auto", "auto")
    with pytest.raises(ConfigError, match="generation.device"):
        load_config(None, ["generation.device=tpu"])


def test_looks_local_is_a_path_by_spelling_or_existence(tmp_path, monkeypatch):
    from phi2sum.config import looks_local

    monkeypatch.chdir(tmp_path)
    for name in ("./run", "../run", "/abs/run", "~/run"):
        assert looks_local(name)
    assert not looks_local("microsoft/phi-2") and not looks_local("gpt2")
    (tmp_path / "user" / "name").mkdir(parents=True)
    assert looks_local("user/name")  # a folder that happens to look like a hub id is the folder
