"""phi2sum's own decoding loop (phi2sum/decoding.py), run eagerly on the CPU: the static-cache loop that a GPU
replays as a CUDA graph gives transformers' greedy tokens, samples from transformers' warped distribution,
prefills each prompt once for MBR's copies and sums the model's log-probabilities. The graph itself is checked
on a GPU in tests/gpu/."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from conftest import padded_batch
from phi2sum import generate
from phi2sum.config import GenerationConfig
from phi2sum.decoding import decode_candidates, decode_static, graph_decoding_applies, sample_token, sampling_scores


def prompts_of(ids, mask) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def generate_tokens(loaded, ids, mask, gen) -> list[list[int]]:
    """transformers' generate on the same prompts (through phi2sum's padded batch), new tokens per row."""
    return [c[0][0] for c in generate._generate_padded(loaded, prompts_of(ids, mask), gen)]


def tokens(groups):
    return [[t for t, _ in group] for group in groups]


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_cache_greedy_loop_gives_generates_tokens(lm, request):
    """The loop produces transformers' greedy tokens for a left-padded batch (Phi, and Llama with
    grouped-query attention), including rows that stop early."""
    loaded = request.getfixturevalue(lm)
    gen = GenerationConfig(max_new_tokens=12)
    ids, mask = padded_batch(loaded, gen)
    endless = replace(loaded, stop_ids=[-1])
    reference = generate_tokens(endless, ids, mask, gen)
    assert [t for t, _ in decode_static(endless, ids, mask, gen, graph=False)] == reference
    assert len({tuple(r) for r in reference}) > 1  # the rows really differ
    # A token some rows produce mid-way becomes the stop token: those rows end there, the others go on.
    stop = reference[0][4]
    stopping = replace(loaded, stop_ids=[stop])
    reference = generate_tokens(stopping, ids, mask, gen)
    ours = [t for t, _ in decode_static(stopping, ids, mask, gen, graph=False)]
    cuts = [next((k for k, t in enumerate(r) if t == stop), None) for r in reference]
    assert cuts[0] == 4 and None in cuts
    for want, got, cut in zip(reference, ours, cuts):
        assert got[: None if cut is None else cut + 1] == want[: None if cut is None else cut + 1]


def gemma_lm(loaded, window: int):
    """A tiny Gemma 3 (a sliding-window layer, then a full one) with `window`, on `loaded`'s tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = loaded.tokenizer
    torch.manual_seed(2)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=2048, pad_token_id=tok.pad_token_id, initializer_range=1.0,
                           tie_word_embeddings=False)
    return replace(loaded, model=Gemma3ForCausalLM(cfg).eval())


def test_static_loop_serves_sliding_window_models_within_their_window(random_lm):
    """Gemma 3's sliding-window layers: a batch whose prompt and new tokens fit in the window decodes in the loop
    with transformers' greedy tokens; one that does not is left to generate."""
    gen = GenerationConfig(max_new_tokens=12)
    ids, mask = padded_batch(random_lm, gen)
    total = ids.shape[1] + gen.max_new_tokens
    fitting = replace(gemma_lm(random_lm, window=total), stop_ids=[-1])
    reference = generate_tokens(fitting, ids, mask, gen)
    assert [t for t, _ in decode_static(fitting, ids, mask, gen, graph=False)] == reference
    assert len({tuple(r) for r in reference}) > 1
    if graph_decoding_applies(random_lm, gen, total):  # this transformers counts cache lengths on the device
        assert graph_decoding_applies(fitting, gen, total)
        assert not graph_decoding_applies(fitting, gen, total + 1)
        assert not graph_decoding_applies(fitting, gen)  # no batch given: no window check possible


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=0.5, top_k=5),
                                      dict(temperature=1.3, top_k=0, top_p=0.8), dict(temperature=0.5, top_p=0.6),
                                      dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_k=5, top_p=0.5)])
def test_sampling_scores_are_transformers_warpers(settings):
    """The loop samples from the distribution transformers' temperature, top-k and top-p warpers leave."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = GenerationConfig(do_sample=True, **settings)
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    logits[0, :10] = 5.0  # ties at the top
    warpers = LogitsProcessorList([TemperatureLogitsWarper(gen.temperature)])
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1:
        warpers.append(TopPLogitsWarper(gen.top_p))
    want = warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone()).softmax(-1)
    values, ids = sampling_scores(logits, gen)
    got = torch.zeros_like(logits).scatter_(-1, ids, values.softmax(-1))
    assert torch.allclose(got[1:], want[1:], atol=1e-6)
    # Row 0's ten tied best tokens: which of equal tokens a cut keeps is the sort's choice, the mass is not.
    assert torch.allclose(got[0].sort().values, want[0].sort().values, atol=1e-6)
    assert (want > 0).sum(-1).min() < 300 or not (gen.top_k or gen.top_p < 1)  # the filters did cut something


def test_sample_token_draws_each_token_at_its_probability():
    gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=3)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.2, 0.9]]).repeat(200_000, 1)
    torch.manual_seed(0)
    drawn = sample_token(logits, gen)
    share = torch.bincount(drawn, minlength=5).double() / len(drawn)
    want = torch.zeros(5, dtype=torch.double)
    want[[0, 4, 1]] = torch.tensor([1.0, 0.9, 0.5], dtype=torch.double).div(0.5).softmax(0)
    assert torch.allclose(share, want, atol=0.005), (share, want)  # standard error ~0.001
    assert share[2] == 0 and share[3] == 0  # outside the top 3


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_samples_candidates_per_prompt(lm, request):
    """MBR's sampling through the loop: each prompt gets its own candidates (at a temperature near 0 they are
    the greedy tokens of that prompt), at temperature 1 they differ, and the same seed draws the same."""
    endless = replace(request.getfixturevalue(lm), stop_ids=[-1])
    greedy = GenerationConfig(max_new_tokens=10)
    ids, mask = padded_batch(endless, greedy)
    reference = generate_tokens(endless, ids, mask, greedy)
    cold = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1e-6, mbr_candidates=3)
    assert tokens(decode_candidates(endless, ids, mask, cold, graph=False)) == [[want] * 3 for want in reference]
    warm = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, mbr_candidates=4)
    torch.manual_seed(3)
    first = tokens(decode_candidates(endless, ids, mask, warm, graph=False))
    torch.manual_seed(3)
    assert tokens(decode_candidates(endless, ids, mask, warm, graph=False)) == first
    torch.manual_seed(3)  # MBR's evidence: no log-probabilities, the same draws
    bare = decode_candidates(endless, ids, mask, warm, graph=False, logprobs=False)
    assert tokens(bare) == first and {lp for c in bare for _, lp in c} == {None}
    assert all(len(c) == 4 and len({tuple(s) for s in c}) > 1 for c in first)
    # Both the prefill's token and the later steps' tokens are drawn, not argmax'd.
    # (top_k 3 so that candidates share first tokens: then only later draws can tell them apart)
    many = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=3, mbr_candidates=32)
    drawn = tokens(decode_candidates(endless, ids, mask, many, graph=False))
    assert any(len({s[0] for s in c}) > 1 for c in drawn)
    assert any(len({tuple(s[1:]) for s in c if s[0] == t}) > 1 for c in drawn for t in {s[0] for s in c})


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_log_probabilities_are_the_models(lm, request):
    """Each row's log-probability is the sum of log-softmax(logits) of its tokens in a plain forward pass over
    prompt + tokens (temperature 1, whatever the sampling temperature), up to and including its stop token."""
    loaded = request.getfixturevalue(lm)
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=0)
    ids, mask = padded_batch(loaded, gen)
    torch.manual_seed(0)
    free = decode_static(replace(loaded, stop_ids=[-1]), ids, mask, gen, graph=False)
    stop = free[0][0][3]  # a token row 0 draws mid-way: as the stop token, rows end at different places
    stopping = replace(loaded, stop_ids=[stop])
    torch.manual_seed(0)
    rows = decode_static(stopping, ids, mask, gen, graph=False)
    assert [t for t, _ in rows] == [t for t, _ in free]  # the same draws; only where the sums end differs
    torch.manual_seed(0)  # without log-probabilities (greedy evals): the same tokens, None for the sums
    assert decode_static(stopping, ids, mask, gen, graph=False, logprobs=False) == [(t, None) for t, _ in rows]
    ended = 0
    for prompt, m, (new, logprob) in zip(ids, mask, rows):
        kept = new[: new.index(stop) + 1] if stop in new else new
        ended += len(kept) < len(new)
        seq = torch.tensor([prompt[m.bool()].tolist() + kept])
        with torch.no_grad():
            logp = loaded.model(seq).logits[0, :-1].float().log_softmax(-1)
        n = len(kept)
        assert logprob == pytest.approx(logp[-n:].gather(-1, seq[0, -n:, None]).sum().item(), abs=1e-3)
    assert ended >= 1


@pytest.mark.parametrize("lm", ["random_lm", "gqa_lm"])
def test_static_loop_prefills_each_prompt_once_for_its_copies(lm, request):
    """MBR's candidates prefill each prompt once and copy its cache: the same tokens and log-probabilities as
    prefilling every copy of the prompt as a row of its own (same seed)."""
    loaded = replace(request.getfixturevalue(lm), stop_ids=[-1])
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0)
    ids, mask = padded_batch(loaded, gen)
    torch.manual_seed(5)
    shared = decode_static(loaded, ids, mask, gen, graph=False, copies=3)
    torch.manual_seed(5)
    repeated = decode_static(loaded, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), gen, graph=False)
    assert [t for t, _ in shared] == [t for t, _ in repeated]
    assert [lp for _, lp in shared] == pytest.approx([lp for _, lp in repeated], abs=1e-4)
    assert len({tuple(t) for t, _ in shared[:3]}) > 1  # the copies are separate draws


def test_graph_decoding_applies_only_to_plain_greedy_and_sampling(random_lm):
    from transformers import MistralConfig, MistralForCausalLM, PhiForCausalLM, StaticCache

    if not hasattr(StaticCache(config=random_lm.model.config, max_cache_len=8).layers[0], "cumulative_length"):
        pytest.skip("this transformers' static cache has no GPU-side length counter: generate serves everything")
    for settings in ({}, {"do_sample": True}, {"do_sample": True, "mbr_candidates": 8}):
        assert graph_decoding_applies(random_lm, GenerationConfig(**settings))
    for change in ({"num_beams": 2}, {"do_sample": True, "num_beams": 2}, {"repetition_penalty": 1.2},
                   {"no_repeat_ngram_size": 3}, {"cuda_graph": False}, {"cache": "static"}, {"mbr_candidates": 4},
                   {"do_sample": True, "repetition_penalty": 1.2}):
        assert not graph_decoding_applies(random_lm, GenerationConfig(**change))
    # Sliding-window attention keeps fewer cache columns than the loop's masks: left to generate.
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    assert not graph_decoding_applies(replace(random_lm, model=sliding), GenerationConfig())
    # Flash-attention reads a 4D mask as a 2D padding mask: left to generate.
    flash = PhiForCausalLM(copy.deepcopy(random_lm.model.config))  # the fixture's own config stays as it is
    flash.config._attn_implementation = "flash_attention_2"
    assert not graph_decoding_applies(replace(random_lm, model=flash), GenerationConfig())
