"""phi2sum's decoding loop captured as a CUDA graph (phi2sum/decoding.py) on a real GPU: in fp32 with TF32 off, so
rounding cannot hide a logic error, its greedy tokens are transformers' generate's, for Phi (multi-head), Llama
(grouped-query) and Gemma 3 (a sliding-window layer, the batch within its window), bare and with a LoRA adapter,
on a left-padded batch whose rows stop at different places; its samples (MBR's copies, one prefill each) are the
eager loop's draws with the same seed; and eval's generate() really goes through it. Skipped without a CUDA GPU
(tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from phi2sum import generate
from phi2sum.config import GenerationConfig
from phi2sum.decoding import decode_static, graph_decoding_applies
from phi2sum.generate import Loaded
from phi2sum.modeling import Hardware

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]
CUDA = torch.device("cuda", 0)


class Tok:  # the one tokenizer attribute the loop and generate use
    pad_token_id = 0


def model(family: str, adapter: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PhiConfig,
                              PhiForCausalLM)

    torch.manual_seed(0)
    if family == "gemma3-sliding":  # a sliding-window layer whose window holds the whole batch (59 + 40 tokens)
        m = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=32, query_pre_attn_scalar=32, sliding_window=100,
                                               layer_types=["sliding_attention", "full_attention"],
                                               initializer_range=0.2, tie_word_embeddings=False))
    elif family == "phi":
        m = PhiForCausalLM(PhiConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                     num_attention_heads=4, partial_rotary_factor=0.4, initializer_range=0.2))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                         num_attention_heads=8, num_key_value_heads=2, initializer_range=0.2))
    if adapter:
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for n, p in m.named_parameters():
            if "lora_B" in n:  # B starts at zero: give the adapter a real effect
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    return m.to(CUDA).eval()


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids.to(CUDA), mask.to(CUDA)


PROMPTS = (lambda g: [torch.randint(1, 512, (int(n),), generator=g).tolist()
                      for n in torch.randint(3, 60, (24,), generator=g)])(torch.Generator().manual_seed(1))


def upto(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop) + 1] if stop in row else row


@pytest.mark.parametrize("adapter", [False, True], ids=["bare", "lora"])
@pytest.mark.parametrize("family", ["phi", "llama-gqa", "gemma3-sliding"])
def test_graph_greedy_tokens_are_generates_and_graph_samples_are_the_eager_loops(family, adapter, capsys):
    m = model(family, adapter)
    hw = Hardware(CUDA, torch.float32, torch.cuda.get_device_name(0))
    gen = GenerationConfig(max_new_tokens=40)
    endless = Loaded(m, Tok(), "plain", [-1], None, hw)
    plain = gen.model_copy(update={"cuda_graph": False})  # transformers' generate
    reference = [c[0][0] for c in generate._generate_padded(endless, PROMPTS, plain)]
    stop = reference[0][10]  # a token row 0 makes mid-way: the rows that make it stop there
    loaded = replace(endless, stop_ids=[stop])
    width = max(len(p) for p in PROMPTS)
    assert graph_decoding_applies(loaded, gen, total=width + gen.max_new_tokens)
    want = [c[0][0] for c in generate._generate_padded(loaded, PROMPTS, plain)]
    got = [c[0][0] for c in generate._generate_padded(loaded, PROMPTS, gen)]  # the captured loop
    assert [upto(r, stop) for r in got] == [upto(r, stop) for r in want]
    assert 0 < sum(stop in r for r in want) < len(want)  # some rows stop early, some run to the end

    warm = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=0.8, top_k=20, top_p=0.95,
                            mbr_candidates=4)
    ids, mask = padded(PROMPTS)
    runs = []
    for graph in (True, False):
        torch.manual_seed(7)
        with torch.inference_mode():
            runs.append(decode_static(loaded, ids, mask, warm, graph=graph, copies=4))
    assert [upto(t, stop) for t, _ in runs[0]] == [upto(t, stop) for t, _ in runs[1]]
    assert [lp for _, lp in runs[0]] == pytest.approx([lp for _, lp in runs[1]], abs=1e-3)
    assert any(len({tuple(upto(t, stop)) for t, _ in runs[0][k : k + 4]}) > 1 for k in range(0, len(runs[0]), 4))
    assert "could not capture" not in capsys.readouterr().err  # the graph really ran, no eager fallback


def test_eval_generation_goes_through_the_graph_on_a_gpu(tiny_model):
    """generate() on a CUDA model in bf16 takes the loop (MBR samples come back with their log-probabilities,
    which only the loop computes) and gives the greedy summaries of transformers' generate."""
    from phi2sum import data as data_mod
    from phi2sum import modeling
    from phi2sum.config import ModelConfig

    from conftest import DIALOGUES, INSTRUCTION

    m = ModelConfig(name=str(tiny_model), quantization="none")
    hw = Hardware(CUDA, torch.bfloat16, torch.cuda.get_device_name(0))
    tok = modeling.load_tokenizer(m)
    loaded = Loaded(modeling.load_base(m, hw, quantize=False).eval(), tok, "plain", data_mod.stop_ids(tok, "plain"),
                    None, hw)
    sampled = generate.generate(loaded, DIALOGUES, INSTRUCTION,
                                GenerationConfig(max_new_tokens=12, do_sample=True, mbr_candidates=4))
    assert all(len(g.candidate_logprobs) == 4 and None not in g.candidate_logprobs for g in sampled)
    graph = generate.generate(loaded, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=12))
    eager = generate.generate(loaded, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=12, cuda_graph=False))
    # bf16: a near-tie may round either way between the two kernels' orders; almost all must agree.
    assert sum(a.raw == b.raw for a, b in zip(graph, eager)) >= len(DIALOGUES) - 1
