"""QLoRA on a real 4-bit (bitsandbytes NF4) base on the GPU: the CUDA-graph decoding loop serves a 4-bit model, and
`phi2sum train` + `phi2sum eval` run end to end with model.quantization: 4bit. (The k-bit preparation itself:
tests/test_kbit.py, on the CPU and here.) Skipped without a CUDA GPU (tests/conftest.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import DIALOGUES, padded_batch, write_config
from phi2sum import modeling
from phi2sum.config import GenerationConfig, ModelConfig
from phi2sum.decoding import decode_static, graph_decoding_applies
from phi2sum.generate import Loaded

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def four_bit(tiny_model, dtype):
    hw = modeling.Hardware(CUDA, dtype, torch.cuda.get_device_name(0))
    model = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="4bit"), hw, quantize=True)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].mlp.fc1).__name__ == "Linear4bit"
    return model, hw


def test_graph_decoding_serves_a_4bit_model(tiny_model, capsys):
    model, hw = four_bit(tiny_model, torch.bfloat16)
    tok = modeling.load_tokenizer(ModelConfig(name=str(tiny_model), quantization="4bit"))
    loaded = Loaded(model.eval(), tok, "plain", [-1], None, hw)
    gen = GenerationConfig(max_new_tokens=16)
    assert graph_decoding_applies(loaded, gen)
    ids, mask = padded_batch(loaded, gen, DIALOGUES)
    with torch.inference_mode(), torch.cuda.device(CUDA):
        graph = decode_static(loaded, ids, mask, gen, graph=True)
        eager = decode_static(loaded, ids, mask, gen, graph=False)
    assert [t for t, _ in graph] == [t for t, _ in eager]
    assert "could not capture" not in capsys.readouterr().err
    assert not graph_decoding_applies(replace(loaded, model=modeling.load_base(
        ModelConfig(name=str(tiny_model), quantization="8bit"), hw, quantize=True)), gen)  # 8-bit: generate's


def test_qlora_train_and_eval_end_to_end(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from phi2sum.cli import app

    config = write_config(tmp_path, tiny_model, model={"quantization": "4bit"},
                          train={"device": "cuda", "precision": "bf16", "max_steps": 6, "learning_rate": 1e-2},
                          generation={"device": "auto"})
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["precision"], summary["skipped_steps"]) == (6, "bf16", 0)
    assert summary["peak_memory_gib"] > 0 and summary["device"] == torch.cuda.get_device_name(0)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    result = runner.invoke(app, ["eval", "--adapter", str(run), "--limit", "4", "--out", str(tmp_path / "scores")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert metrics["device"] != "cpu" and set(metrics["models"]) == {"base", "fine-tuned"}
    assert metrics["stop_tokens"] == ["<|endoftext|>"]
