"""GPU check of the CUDA-graph greedy loop against transformers' generate, in fp32 (TF32 off) so rounding
cannot hide a logic error: tiny random Phi (multi-head) and Llama (grouped-query) models, each bare and
wrapped in a PEFT LoRA adapter with non-zero weights, on a left-padded batch of prompts of mixed lengths
with a stop token that some rows hit. Prints one JSON line per model and exits non-zero on any mismatch.

    python3 bench/graph_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi2sum import evaluate, modeling  # noqa: E402
from phi2sum.config import GenerationConfig  # noqa: E402


class Tok:  # the two attributes the loop and generate use
    pad_token_id = 0


def models():
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    yield "phi", PhiForCausalLM(PhiConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                          num_attention_heads=4, partial_rotary_factor=0.4, initializer_range=0.2))
    yield "llama-gqa", LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                                    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                                    initializer_range=0.2))


def main() -> int:
    from peft import LoraConfig, get_peft_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test only
    gen = GenerationConfig(max_new_tokens=40)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (24,), generator=g)]
    failures = 0
    for name, model in models():
        for adapter in (False, True):
            m = model
            if adapter:
                m = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(p, std=0.05)
            m = m.to(device).eval()
            hw = modeling.Hardware(device, torch.float32, device.type)
            free = evaluate.Loaded(m, Tok(), "plain", [-1], None, hw)
            reference = [c[0] for c in evaluate._generate_padded(free, prompts, gen.model_copy(update={"cuda_graph": False}))]
            stop = reference[0][10]  # a token row 0 makes mid-way: rows that make it stop there
            loaded = evaluate.Loaded(m, Tok(), "plain", [stop], None, hw)
            want = [c[0] for c in evaluate._generate_padded(loaded, prompts, gen.model_copy(update={"cuda_graph": False}))]
            got = [c[0] for c in evaluate._generate_padded(loaded, prompts, gen)]
            assert evaluate.graph_decoding_applies(loaded, gen)

            def upto(row):
                return row[: row.index(stop) + 1] if stop in row else row
            same = sum(upto(a) == upto(b) for a, b in zip(want, got))
            stopped = sum(stop in row for row in want)
            row = {"model": name, "adapter": adapter, "rows": len(prompts), "identical": same, "rows_stopping_early": stopped,
                   "card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
            print(json.dumps(row), flush=True)
            failures += same != len(prompts)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
