"""Model building (phi2sum/modeling.py) on the tiny model: the fused GELU and the LayerNorms outside autocast give
the same numbers, per-block compilation matches eager loss and gradients, cuDNN attention is a CUDA-only switch,
and the cache folder follows the environment. (4-bit loading needs a GPU: tests/gpu/.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from phi2sum import modeling
from phi2sum.config import load_config


def test_fused_gelu_matches_gelu_new(tiny_model):
    """load_base swaps gelu_new for PyTorch's fused tanh GELU: same function, same logits."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from phi2sum.config import ModelConfig

    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert any(isinstance(m, NewGELUActivation) for m in reference.modules())
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    fused = modeling.load_base(ModelConfig(name=str(tiny_model), quantization="none"), hw)
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(ids).logits, fused(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(NewGELUActivation()(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)



def test_layer_norms_outside_autocast_return_the_compute_dtype_with_the_same_values(tiny_model):
    """CUDA's autocast runs LayerNorm in fp32 and returns fp32 (then every reader casts it back; CPU
    autocast has no such rule, so the fp32 result is computed here by hand); switched, it returns the
    compute dtype with the fp32 result's values rounded once, and gradients still flow."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    before = torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                                            norm.bias.float(), norm.eps)
    assert modeling.norms_in_compute_dtype(model) == model.config.num_hidden_layers + 1
    assert norm.forward.__func__ is modeling._layer_norm_outside_autocast
    seen = []
    layer_norm = torch.nn.functional.layer_norm

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer_norm(*a, **k)

    x.requires_grad_(True)
    norm.weight.requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(torch.nn.functional, "layer_norm", spy)
        assert torch.is_autocast_enabled("cpu")
        after = norm(x)
    assert seen == [False]  # the kernel ran outside autocast
    assert after.dtype == torch.bfloat16
    assert torch.allclose(after.float(), before, atol=2e-2, rtol=1e-2)
    after.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    assert norm.weight.grad is not None  # trainable norms (full fine-tune) still learn
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids).logits.float()).all()



def test_compiled_blocks_match_eager_loss_and_gradients(tiny_model):
    """train.compile compiles each transformer block, not the whole body: one compilation serves every
    block and, being dynamic, every batch width. aot_eager traces forward and backward as inductor does
    (without building kernels, so it runs in seconds on a CPU): same loss and LoRA gradients as eager,
    and the state-dict names (checkpoints, adapters) unchanged."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from phi2sum.config import LoraSettings, TrainConfig
    from phi2sum.batches import SummaryLoss, collate

    lora = LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], dropout=0.0)

    def build():
        torch.manual_seed(0)  # 4 blocks (2 saved, 2 seeded), so sharing one compilation is visible
        model = AutoModelForCausalLM.from_pretrained(tiny_model, num_hidden_layers=4)
        model = modeling.add_lora(model, lora, TrainConfig(gradient_checkpointing=False), quantized=False)
        for n, p in model.named_parameters():  # B starts at zero; give it values so every path carries gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        return model.train()

    gen = torch.Generator().manual_seed(2)
    batches = [collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in widths], 0)
               for widths in ([11, 7, 9], [23, 5], [17, 17, 3, 12])]

    def run(model):
        out = []
        for b in batches:
            model.zero_grad()
            loss = SummaryLoss(model)(**b)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        return out

    eager_model = build()
    eager = run(eager_model)
    model = build()
    names = list(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() leaves the counters of earlier compiles
    assert modeling.compile_body(model, backend="aot_eager") == "4 x PhiDecoderLayer"
    compiled = run(model)
    assert list(model.state_dict()) == names
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-5)
        assert g1.keys() == g2.keys()
        assert all(torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6) for k in g1)
    frames = torch._dynamo.utils.counters["frames"]
    # One dynamic graph for all blocks and widths, not one per block: the first block gets its own only
    # because its input (the frozen embeddings' output) needs no gradient.
    assert frames["ok"] == 2
    torch._dynamo.reset()


def test_model_cudnn_attention_sets_sdpa_switch_and_compile_cache_key_on_cuda_only():
    """model.cudnn_attention reaches SDPA's process-wide switch for CUDA devices, and the compile caches' key
    (a graph traced with the other setting must not be reused); CPU runs and the unset default leave both alone."""
    before, tag = torch.backends.cuda.cudnn_sdp_enabled(), torch.compiler.config.cache_key_tag
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.compiler.config.cache_key_tag = "users-own"
        off = load_config(None, ["model.cudnn_attention=false"]).model
        modeling.choose_attention_kernels(off, torch.device("cpu"))
        modeling.choose_attention_kernels(load_config(None, []).model, torch.device("cuda", 0))
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.compiler.config.cache_key_tag == "users-own"
        modeling.choose_attention_kernels(off, torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.compiler.config.cache_key_tag == "users-own;phi2sum-cudnn-sdp=0"
        modeling.choose_attention_kernels(load_config(None, ["model.cudnn_attention=true"]).model, torch.device("cuda", 0))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.compiler.config.cache_key_tag == "users-own;phi2sum-cudnn-sdp=1"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
        torch.compiler.config.cache_key_tag = tag




def test_cache_folder_follows_phi2sum_cache_then_xdg(tmp_path):
    """Converted GGUF models go to $PHI2SUM_CACHE, else $XDG_CACHE_HOME/phi2sum, else ~/.cache/phi2sum (read at
    import, so each case is a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PHI2SUM_CACHE", "XDG_CACHE_HOME")}
    cases = [({"PHI2SUM_CACHE": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "mine"),
             ({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "phi2sum"),
             ({"HOME": str(tmp_path / "home")}, tmp_path / "home" / ".cache" / "phi2sum")]
    script = "; ".join(["import os, importlib, json", "from phi2sum import modeling", "out = []",
                        *[f"os.environ.clear(); os.environ.update({json.dumps(env | extra)}); "
                          "importlib.reload(modeling); out.append(str(modeling.CACHE))" for extra, _ in cases],
                        "print(json.dumps(out))"])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [str(want) for _, want in cases]
