"""GPU check of the CUDA-graph greedy loop against transformers' generate, in fp32 (TF32 off) so rounding
cannot hide a logic error: tiny random Phi (multi-head) and Llama (grouped-query) models, each bare and
wrapped in a PEFT LoRA adapter with non-zero weights, on a left-padded batch of prompts of mixed lengths
with a stop token that some rows hit. Then sampling (MBR's candidates: 4 copies of each prompt, one prefill
each) in the captured graph against the same loop run eagerly with the same seed: the graph's random numbers
replay per token, so the draws and their log-probabilities must agree. Prints one JSON line per model and
check, and exits non-zero on any mismatch.

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


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask


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
            reference = [c[0][0] for c in evaluate._generate_padded(free, prompts, gen.model_copy(update={"cuda_graph": False}))]
            stop = reference[0][10]  # a token row 0 makes mid-way: rows that make it stop there
            loaded = evaluate.Loaded(m, Tok(), "plain", [stop], None, hw)
            want = [c[0][0] for c in evaluate._generate_padded(loaded, prompts, gen.model_copy(update={"cuda_graph": False}))]
            got = [c[0][0] for c in evaluate._generate_padded(loaded, prompts, gen)]
            assert evaluate.graph_decoding_applies(loaded, gen)

            def upto(row):
                return row[: row.index(stop) + 1] if stop in row else row
            same = sum(upto(a) == upto(b) for a, b in zip(want, got))
            stopped = sum(stop in row for row in want)
            row = {"model": name, "adapter": adapter, "rows": len(prompts), "identical": same, "rows_stopping_early": stopped,
                   "card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
            print(json.dumps(row), flush=True)
            failures += same != len(prompts)

            # Sampling inside the captured graph vs the same loop without it, same seed.
            warm = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=0.8, top_k=20, top_p=0.95,
                                    mbr_candidates=4)
            ids, mask = _padded(prompts)
            ids, mask = ids.to(device), mask.to(device)
            runs = []
            for graph in ((True, False) if device.type == "cuda" else (False, False)):  # CPU: a smoke test
                torch.manual_seed(7)
                with torch.inference_mode():
                    runs.append(evaluate.decode_static(loaded, ids, mask, warm, graph=graph, copies=4))
            same = sum(upto(a) == upto(b) for (a, _), (b, _) in zip(*runs))
            gap = max(abs(a - b) for (_, a), (_, b) in zip(*runs))
            distinct = sum(len({tuple(upto(t)) for t, _ in runs[0][k : k + 4]}) > 1 for k in range(0, len(runs[0]), 4))
            row = {"model": name, "adapter": adapter, "check": "sampling, graph vs eager loop", "rows": len(runs[0]),
                   "identical": same, "max_logprob_gap": gap, "prompts_with_distinct_samples": distinct}
            print(json.dumps(row), flush=True)
            failures += same != len(runs[0]) or gap > 1e-3 or distinct == 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
