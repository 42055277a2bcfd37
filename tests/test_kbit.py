"""QLoRA's preparation on a real 4-bit (bitsandbytes NF4) base, run on the CPU through bitsandbytes' CPU backend: the
k-bit preparation upcasts only under fp16, and the bf16 path trains through gradient checkpointing. The 4-bit
decoding loop and a QLoRA `phi2sum train` on a GPU: tests/gpu/test_qlora.py."""

from __future__ import annotations

import pytest
import torch

from phi2sum import modeling
from phi2sum.batches import SummaryLoss
from phi2sum.config import LoraSettings, ModelConfig, TrainConfig

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


def four_bit(tiny_model, dtype: torch.dtype):
    hw = modeling.Hardware(torch.device("cpu"), dtype, "cpu")
    model = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="4bit"), hw, quantize=True)
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
