"""phi2sum's decoding loop for greedy decoding and sampling: a static KV cache, one prompt prefill shared by all
of its samples, and on a GPU the one-token step captured once as a CUDA graph and replayed for every token.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from . import modeling
from .config import GenerationConfig
from .console import warn


def decode_candidates(loaded, input_ids: torch.Tensor, attention: torch.Tensor, gen: GenerationConfig,
                      graph: bool, logprobs: bool = True) -> list[list[tuple[list[int], float | None]]]:
    """decode_static for a batch of prompts, grouped per prompt: one sequence each, or with MBR sampling its
    mbr_candidates samples (each prompt's cache copied to that many rows of its own after one prefill), with
    their log-probabilities where `logprobs` (MBR candidates only)."""
    per = gen.mbr_candidates or 1  # only sampling reaches here with candidates (beams go to generate)
    rows = decode_static(loaded, input_ids, attention, gen, graph, copies=per,
                         logprobs=logprobs and bool(gen.mbr_candidates))
    return [rows[k : k + per] for k in range(0, len(rows), per)]


def graph_decoding_applies(loaded, gen: GenerationConfig, total: int | None = None) -> bool:
    """Plain greedy decoding or sampling, MBR's samples included (bf16/fp16 or 4-bit), with a transformers
    whose static cache counts its own length on the GPU (5.x): the cases decode_static serves; everything
    else (beams among them) goes through generate. `total` is the batch's prompt width + max_new_tokens:
    a model with sliding-window layers (Gemma 3, Mistral) qualifies only for batches that fit in its window."""
    from transformers import StaticCache

    base = modeling.unwrap_peft(loaded.model)
    one_beam = gen.num_beams == 1 and (gen.do_sample or gen.mbr_candidates == 0)  # MBR without sampling: beams
    plain = (gen.cuda_graph and one_beam and gen.repetition_penalty == 1.0 and gen.no_repeat_ngram_size == 0
             and gen.cache == "dynamic")
    # 4-bit NF4 captures and replays (Phi-2 shape on an H200: 69.9 vs 20.9 dialogues/s); 8-bit's outlier
    # handling was never tried in a graph.
    if not plain or getattr(base, "is_loaded_in_8bit", False):
        return False
    # The loop's 4D float masks are what SDPA and eager attention take; flash-attention reads masks as 2D
    # padding masks.
    if getattr(base.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    try:
        layers = StaticCache(config=base.config, max_cache_len=8).layers
    except Exception:  # an older transformers with another StaticCache signature
        return False
    # A sliding-window layer keeps only the window's columns, and once full it rolls them (Python-side state a
    # replayed graph would not advance). A batch whose prompt and new tokens all fit in the window never
    # fills it: the layer then writes in place like a full one and every token sees what full attention sees.
    window = getattr(base.config, "sliding_window", None)
    fits = bool(window) and total is not None and total <= window
    return bool(layers) and all(hasattr(layer, "cumulative_length") and
                                (type(layer).__name__ == "StaticLayer" or (getattr(layer, "is_sliding", False) and fits))
                                for layer in layers)


# SDPA backends allowed in the one-token decoding step (None: PyTorch's own pick). The step's attention reads
# each row's whole static cache for a single query.
DECODE_BACKENDS: list | None = None


def decode_attention():
    """The SDPA backend choice (DECODE_BACKENDS) for the decoding steps."""
    if not DECODE_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in DECODE_BACKENDS])


def sampling_scores(logits: torch.Tensor, gen: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens sampling may draw and their scores, as transformers' temperature, top-k and top-p warpers
    leave them: the k best tokens' ids and their logits / temperature, -inf where top-p drops one (a token
    goes once the better tokens before it hold top_p of the mass; the best always stays). Exactly k tokens:
    transformers' top-k also keeps tokens tied with the k-th, so the two differ where logits tie there.
    Fixed shapes, so the step that uses it can be captured in a CUDA graph."""
    scores = logits.float() / gen.temperature
    k = min(gen.top_k or scores.shape[-1], scores.shape[-1])
    values, ids = scores.topk(k, dim=-1)  # sorted, best first
    if gen.top_p < 1.0:
        probs = values.softmax(-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= gen.top_p, float("-inf"))
    return values, ids


def sample_token(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """One token per row drawn from softmax(sampling_scores) by the Gumbel-max trick: the argmax of the
    scores plus independent Gumbel noise is an exact draw from their softmax, and uniform noise is what a
    CUDA graph can replay (each replay advances the generator; torch.multinomial cannot be captured)."""
    values, ids = sampling_scores(logits, gen)
    uniform = torch.rand_like(values).clamp_(min=torch.finfo(values.dtype).tiny)
    return ids.gather(-1, (values - (-uniform.log()).log()).argmax(-1, keepdim=True)).squeeze(-1)


def decode_static(loaded, input_ids: torch.Tensor, attention: torch.Tensor, gen: GenerationConfig,
                  graph: bool, copies: int = 1, logprobs: bool = True) -> list[tuple[list[int], float | None]]:
    """Greedy decoding or sampling (gen.do_sample) of one left-padded batch with a static KV cache; with
    `graph` (CUDA) the decoding step is captured once as a CUDA graph and replayed for every token. With
    `copies` > 1 each prompt is decoded that many times (MBR's samples): its prompt runs through the model once
    and its cache rows are copied, instead of prefilling the same prompt `copies` times. Returns, per output row
    (prompt r's copies at rows r * copies ...), the new tokens and the sum of their log-probabilities under
    the model (temperature 1, before any top-k/top-p), up to and including the stop token (None without
    `logprobs`: a vocabulary-wide log-softmax per token that only MBR's saved candidates use).

    Why not generate(): for a small model its per-token Python and kernel launches, not the GPU, set the
    pace (SmolLM2-135M, 500 dialogues: ~0.1 s per token whatever the batch size). A captured step replays
    in one launch, and the static cache is written in place instead of grown by concatenation. Greedy tokens
    are generate()'s (tested on CPU without the graph): same masks, positions and argmax. Samples come from
    the distribution generate samples from (sample_token) but are other draws. Rows that stop early keep
    decoding (cut at their stop token afterwards); the loop ends when all have."""
    from transformers import StaticCache

    model, device = loaded.model, loaded.hardware.device
    base = modeling.unwrap_peft(model)
    dtype = base.get_input_embeddings().weight.dtype
    prompts, width = input_ids.shape
    rows = prompts * copies
    total = width + gen.max_new_tokens
    cache = StaticCache(config=base.config, max_cache_len=total)
    # newer transformers (5.2x) name the argument `cache`; `past_key_values` before (a deprecated alias now)
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    ids, real = input_ids.to(device), attention.to(device).bool()
    pad = (~real).sum(1)
    cols = torch.arange(total, device=device)
    blocked = torch.finfo(dtype).min

    # Prefill: prompt token i sees tokens j <= i of its own row; a padding position sees only itself
    # (a row with nothing to attend to would turn into NaN and spread through the cache).
    q = torch.arange(width, device=device)[None, :, None]
    allowed = ((cols <= q) & (cols >= pad[:, None, None])) | (cols == q)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)[:, None]
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **{cache_arg: cache}).logits[:, -1]
    del mask, allowed
    if copies > 1:
        # Each prompt's cache rows and last logits, copied to its candidates' rows (the cache's own
        # reordering, as beam search uses it). Prefilling 64 copies of a prompt cost 64x the compute and the
        # activation memory that capped MBR batches.
        expand = torch.arange(prompts, device=device).repeat_interleave(copies)
        cache.reorder_cache(expand)
        for layer in cache.layers:  # reorder_cache replaces the tensors but not the recorded batch size
            if hasattr(layer, "batch_size"):
                layer.batch_size = rows
        logits, real, pad = logits[expand], real[expand], pad[expand]
    pick = functools.partial(sample_token, gen=gen) if gen.do_sample else (lambda scores: scores.argmax(-1))
    first = pick(logits)
    stops = torch.tensor(loaded.stop_ids, device=device)
    tokens = torch.full((rows, gen.max_new_tokens), loaded.tokenizer.pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = first
    # Log-probabilities of the chosen tokens, summed while a row has not stopped (its stop token counts).
    logprob = (logits.float().log_softmax(-1).gather(-1, first[:, None]).squeeze(-1) if logprobs
               else torch.zeros(rows, device=device))
    done = (first[:, None] == stops).any(1)
    del logits

    # Decoding state lives in tensors updated in place, so one captured step serves every token.
    current = first[:, None].clone()
    position = real.sum(1, keepdim=True)  # the next token's position: the row's length so far
    out_col = torch.tensor([1], device=device)  # the output column of the next token; its cache slot is
    # width + out_col - 1
    step_mask = torch.zeros((rows, 1, 1, total), dtype=dtype, device=device)
    step_mask.masked_fill_(((cols < pad[:, None]) | (cols > width))[:, None, None], blocked)

    def step():
        scores = model(input_ids=current, attention_mask=step_mask, position_ids=position, use_cache=True,
                       **{cache_arg: cache}).logits[:, -1]
        nxt = pick(scores)
        if logprobs:
            chosen = scores.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
            logprob.add_(chosen.masked_fill_(done, 0.0))
        tokens.index_copy_(1, out_col, nxt[:, None])
        done.logical_or_((nxt[:, None] == stops).any(1))
        current.copy_(nxt[:, None])
        position.add_(1)
        out_col.add_(1)
        step_mask.index_fill_(3, out_col + (width - 1), 0.0)  # open the slot the next token is written to

    steps = gen.max_new_tokens - 1
    with decode_attention():  # around the eager steps and the capture (a replay keeps the captured kernels)
        run, ran = _capture(step, graph and steps > 1)
        for k in range(ran, steps):
            if k % 8 == 0 and bool(done.all()):  # one host sync every 8 tokens
                break
            run()
    return list(zip(tokens.cpu().tolist(), logprob.cpu().tolist() if logprobs else [None] * rows))


def _capture(step, graph: bool):
    """(the function that runs one step, steps already run): the captured graph's replay, or `step` itself
    without a graph or where capture fails."""
    if not graph:
        return step, 0
    # The first step runs for real on a side stream (warms kernels and workspaces, as capture requires);
    # capturing records the second without running it.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(captured):
            step()
    except torch.OutOfMemoryError:
        raise  # the caller halves the batch
    except RuntimeError as e:  # capture records nothing it ran: the state is intact, decode without it
        warn(f"could not capture the decoding step as a CUDA graph ({str(e).splitlines()[0][:120]}); "
             "decoding without it (set generation.cuda_graph: false to skip the attempt)")
        return step, 1
    return captured.replay, 1
