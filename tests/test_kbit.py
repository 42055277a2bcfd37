"""QLoRA on a real 4-bit (bitsandbytes NF4/FP4) base, run on the CPU through bitsandbytes' CPU backend: the k-bit
preparation upcasts only under fp16, the bf16 path trains through gradient checkpointing, and for generation the
4-bit base is dequantized and the adapter folded in without changing the model. The 4-bit decoding loop and a QLoRA
`phi2sum train` on a GPU: tests/gpu/test_qlora.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_config_dict
from phi2sum import evaluate, generate, modeling
from phi2sum.batches import SummaryLoss
from phi2sum.config import LoraSettings, ModelConfig, RunConfig, TrainConfig

LORA = LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])


@pytest.fixture(scope="module")
def nf4_on_cpu(tiny_model) -> None:
    """Skip where this bitsandbytes has no CPU backend for NF4 (older releases are CUDA-only)."""
    try:
        model, _ = four_bit(tiny_model, torch.bfloat16)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    except Exception as e:  # noqa: BLE001 - any failure means: no NF4 on this CPU
        pytest.skip(f"bitsandbytes cannot run NF4 on the CPU here ({type(e).__name__}: {str(e)[:80]})")


def four_bit(tiny_model, dtype: torch.dtype, **model_settings):
    hw = modeling.Hardware(torch.device("cpu"), dtype, "cpu")
    model = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="4bit", **model_settings), hw,
                               quantize=True)
    assert model.is_loaded_in_4bit and type(model.model.layers[0].mlp.fc1).__name__ == "Linear4bit"
    return model, hw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kbit_preparation_upcasts_only_for_fp16(tiny_model, nf4_on_cpu, dtype):
    """Under bf16 the unquantized weights stay bf16 (so the residual stream and LayerNorms run in bf16); under
    fp16 PEFT's k-bit preparation makes them fp32. The base is frozen and the LoRA weights train in fp32 either way."""
    model, _ = four_bit(tiny_model, dtype)
    model = modeling.add_lora(model, LORA, TrainConfig(gradient_checkpointing=False), quantized=True)
    base = model.get_base_model()
    want = dtype if dtype == torch.bfloat16 else torch.float32
    assert base.get_input_embeddings().weight.dtype == want
    assert base.model.final_layernorm.weight.dtype == want
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_kbit_bf16_path_trains_with_gradient_checkpointing(tiny_model, nf4_on_cpu):
    """Skipping the k-bit preparation leaves nothing out that checkpointing needs: with non-reentrant
    checkpointing on a frozen 4-bit bf16 base, a backward through phi2sum's loss under autocast reaches every
    LoRA weight."""
    model, hw = four_bit(tiny_model, torch.bfloat16)
    model = modeling.add_lora(model, LORA, TrainConfig(gradient_checkpointing=True), quantized=True)
    assert model.get_base_model().is_gradient_checkpointing
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(hw.device)
    labels = ids.clone()
    labels[:, :8] = -100
    with torch.autocast(hw.device.type, dtype=torch.bfloat16):
        loss = SummaryLoss(model)(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_a + lora_b)
    assert any(p.grad.abs().sum() > 0 for p in lora_b)  # B starts at zero, so its gradient is the live one


# ----------------------------------------------------------------------------------------------------
# Generation: the 4-bit base dequantized, the adapter folded in

# Logits that must agree up to bf16 rounding agree within 4 units in the last place of bf16 at the tiny model's
# logit scale (below 1). Where bitsandbytes' CPU kernel is dequantize + F.linear the dequantized base gives the
# 4-bit logits exactly; other kernels (AVX512-BF16 CPUs, a GPU's fused 4-bit matmul) and the adapter's other
# rounding path (PEFT's 4-bit LoRA layer rounds its output before adding it) differ by one to two units (the
# same model computed in bf16 rather than fp32 differs by one). What the tests must tell apart is far larger:
# the unquantized checkpoint differs from the 4-bit model by about 0.09, the adapter switched on or off by 0.3.
ROUNDING = 4 * 2**-8
IDS = torch.tensor([[5, 60, 7, 300, 11, 42, 500, 3, 90, 17, 250, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def four_bit_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.fixture(scope="module")
def random_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny model with random A and B (a fresh adapter's B is zero: it would change
    nothing), B at a tenth of PEFT's random init: the logits move clearly (by about 0.3), not wildly."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="none"), modeling.Hardware(
        torch.device("cpu"), torch.float32, "cpu"), quantize=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA.target_modules,
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    out = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(out)
    return out


def four_bit_inference(monkeypatch, tiny_model, tmp_path, **generation) -> RunConfig:
    """eval and summarize load a 4-bit base in bf16 as they would on a GPU: load_for_inference quantizes on CUDA
    only, so the hardware and the quantization are forced here."""
    hw = modeling.Hardware(torch.device("cpu"), torch.bfloat16, "cpu")
    load_base = modeling.load_base
    monkeypatch.setattr(modeling, "pick_hardware", lambda device, precision: hw)
    monkeypatch.setattr(modeling, "load_base", lambda m, hw, path=None, quantize=True: load_base(m, hw, path, True))
    return RunConfig.model_validate(tiny_config_dict(tiny_model, tmp_path, model={"quantization": "4bit"},
                                                     generation=generation))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_the_dequantized_base_gives_the_4bit_logits(tiny_model, nf4_on_cpu, quant_type, double_quant):
    """Every 4-bit layer becomes a bf16 Linear holding the 4-bit values: the 4-bit model's logits, up to rounding,
    and not the unquantized checkpoint's (which the adapter was not trained against)."""
    kbit, hw = four_bit(tiny_model, torch.bfloat16, quant_type=quant_type, double_quant=double_quant)
    model, _ = four_bit(tiny_model, torch.bfloat16, quant_type=quant_type, double_quant=double_quant)
    assert modeling.dequantize_4bit(model)
    assert four_bit_layers(model) == 0 and not model.is_loaded_in_4bit
    assert {type(m.mlp.fc1) for m in model.model.layers} == {nn.Linear}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(model), logits(kbit), atol=ROUNDING, rtol=0)
    unquantized = modeling.load_base(ModelConfig(name=str(tiny_model)), hw, quantize=False)
    assert (logits(unquantized) - logits(kbit)).abs().max() > 4 * ROUNDING
    assert not modeling.dequantize_4bit(unquantized)  # nothing 4-bit: left as it is


def test_eval_on_a_4bit_base_runs_the_base_pass_then_folds_the_adapter(tiny_model, nf4_on_cpu, random_adapter,
                                                                       tmp_path, monkeypatch):
    """`phi2sum eval` on a 4-bit base: the model is dequantized as it loads; the base pass (adapter switched off)
    gives the 4-bit base's logits, and the fine-tuned pass, with the adapter folded into the dequantized weights,
    those of the 4-bit base with the adapter beside it (PEFT's 4-bit LoRA layers, unmerged)."""
    cfg = four_bit_inference(monkeypatch, tiny_model, tmp_path)
    passes = []

    def spy(loaded, *args):  # each pass's model as generation gets it (merged read first: a forward may unmerge)
        merged = {m.merged for m in loaded.model.modules() if hasattr(m, "merged")}
        passes.append((logits(loaded.model), four_bit_layers(loaded.model), merged))
        return real(loaded, *args)

    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", spy)
    metrics = evaluate.run_eval(cfg, str(random_adapter), compare_base=True, out_dir=tmp_path / "eval")
    assert list(metrics["models"]) == ["base", "fine-tuned"] and metrics["dequantized_4bit"] is True
    (base_pass, base_4bit, base_merged), (tuned_pass, tuned_4bit, tuned_merged) = passes
    assert (base_4bit, base_merged, tuned_4bit, tuned_merged) == (0, {False}, 0, {True})

    kbit, _ = four_bit(tiny_model, torch.bfloat16)
    plain = logits(kbit)
    beside = logits(modeling.load_adapter(kbit, str(random_adapter)).eval())
    torch.testing.assert_close(base_pass, plain, atol=ROUNDING, rtol=0)
    torch.testing.assert_close(tuned_pass, beside, atol=ROUNDING, rtol=0)
    assert (beside - plain).abs().max() > 10 * ROUNDING  # the adapter matters: the passes differ by its effect


def tiny_linear_bytes(tiny_model) -> int:
    """What the tiny model's 4-bit layers take dequantized to bf16."""
    model, _ = four_bit(tiny_model, torch.bfloat16)
    import bitsandbytes as bnb

    return sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("case", ["fits", "too little free memory", "switched off"])
def test_a_4bit_base_is_dequantized_only_where_it_fits_and_is_wanted(case, tiny_model, nf4_on_cpu, random_adapter,
                                                                    tmp_path, monkeypatch, capsys):
    """The bf16 copy may take half the free GPU memory: at exactly half it is made and the adapter folds; with one
    byte less the base stays 4-bit with the adapter beside it, and a warning says why and how to silence it;
    generation.dequantize: false keeps it 4-bit without a word."""
    need = tiny_linear_bytes(tiny_model)
    free = 2 * need - (case == "too little free memory")
    monkeypatch.setattr(modeling, "gpu_free_bytes", lambda device: free)  # as a GPU would report it
    cfg = four_bit_inference(monkeypatch, tiny_model, tmp_path, dequantize=case != "switched off")
    loaded = generate.load_for_inference(cfg, str(random_adapter))
    folded = generate.fold_adapter(loaded)
    err = " ".join(capsys.readouterr().err.split())
    assert loaded.dequantized == (case == "fits")  # what eval's metrics.json records
    if case == "fits":
        assert four_bit_layers(loaded.model) == 0 and folded and "warning:" not in err
    else:
        assert four_bit_layers(loaded.model) > 0 and not folded
        assert err.count("warning:") == (case == "too little free memory")
    if case == "too little free memory":
        assert "generating with the 4-bit base as it is" in err and "generation.dequantize: false" in err
    summaries = generate.generate(loaded, ["#Person1#: Hi.\n#Person2#: Hey."], "Summarize.",
                                  cfg.generation.model_copy(update={"max_new_tokens": 4}))
    assert summaries[0].new_tokens > 0  # either way the model generates
