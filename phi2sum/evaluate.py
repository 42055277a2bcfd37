"""Evaluation: batched generation, ROUGE the standard way, and the base-vs-fine-tuned table.

    phi2sum eval --adapter runs/x            (whole test split, fine-tuned vs base)
    phi2sum eval --adapter runs/x --limit 50

ROUGE comes from Google's rouge-score package (what `evaluate`'s rouge wraps), F1, Porter stemming on by
default. DialogSum's test set has three references per dialogue: the headline number is the mean over
all dialogue-reference pairs (1,500 pairs for 500 dialogues); confidence intervals resample dialogues.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import modeling
from .config import (ConfigError, GenerationConfig, Phi2sumError, RunConfig, looks_local, write_jsonl_atomic,
                     write_text_atomic)
from .console import progress, warn

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# A line starting with a speaker tag, or a new prompt, means the model kept going past its summary.
RUN_ON = re.compile(r"(^|\n)\s*(#?Person\s?\d#?\s*:|#\w+#\s*:|Instruct:|Output:|<\|im_start\|>|User:|Assistant:)")


# ----------------------------------------------------------------------------------------------------
# Loading a model for inference (eval, summarize)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    fmt: str
    stop_ids: list
    adapter: str | None
    hardware: modeling.Hardware
    full: bool = False  # the run is a full fine-tune: no adapter to switch off for the base pass


def check_adapter(adapter: str | None) -> None:
    """Fail fast on an --adapter that cannot be one, before any data or model is loaded."""
    if adapter is None:
        return
    local = Path(adapter)
    if local.exists():
        if not (local / "adapter_config.json").is_file() and not modeling.is_full_model(local):
            raise ConfigError(f"{adapter} is not an adapter or run directory (no adapter_config.json or "
                              "config.json); pass the output_dir of `phi2sum train`")
    elif looks_local(adapter) or adapter.count("/") != 1:
        raise ConfigError(f"--adapter {adapter}: no such directory, and not a hub id (user/name)")


def load_for_inference(cfg: RunConfig, adapter: str | None) -> Loaded:
    """Base model (+ adapter). On CUDA the base is quantized as configured and computes in bf16 (fp16
    without bf16); on CPU it runs unquantized in fp32."""
    check_adapter(adapter)
    hw = modeling.pick_hardware(cfg.train.model_copy(update={"precision": "auto"}))
    path = modeling.base_path(cfg.model)
    # The run saved the tokenizer it trained with (chat template, added tokens): prefer it to the base's.
    own = adapter and Path(adapter, "tokenizer_config.json").is_file()
    tokenizer = modeling.load_tokenizer(cfg.model, adapter if own else path)
    quantize = hw.device.type == "cuda" and cfg.model.quantization != "none"
    full = bool(adapter) and modeling.is_full_model(Path(adapter))
    if full:  # the run holds the whole model, trained unquantized (train never quantizes a full fine-tune)
        model = modeling.load_base(cfg.model, hw, adapter, quantize=False)
    else:
        model = modeling.load_base(cfg.model, hw, path, quantize=quantize)
    if adapter and not full:
        try:
            model = modeling.load_adapter(model, adapter)
        except Phi2sumError as e:
            # PEFT's first line is only "Error(s) in loading state_dict"; the usual cause is another base.
            trained_on = modeling.read_adapter_base(adapter)
            if trained_on and trained_on != cfg.model.name:
                raise Phi2sumError(f"{str(e).rstrip(': ')} (it was trained on {trained_on}, not "
                                   f"{cfg.model.name}); set model.name to its base") from None
            raise
    model.eval()
    fmt = data_mod.resolve_format(cfg.data, tokenizer)
    return Loaded(model, tokenizer, fmt, data_mod.stop_ids(tokenizer, fmt), adapter, hw, full)


# ----------------------------------------------------------------------------------------------------
# Generation, shared by eval and summarize


@dataclass
class Generated:
    text: str  # the summary shown to people and scored
    raw: str  # everything generated before the stop token
    new_tokens: int
    hit_max: bool  # stopped by max_new_tokens, not by the stop token
    run_on: bool  # the model kept going past the summary (a new turn or prompt appeared)
    truncated_input: bool
    candidates: tuple[str, ...] = ()  # with MBR: every candidate's text in generation order (text is one of them)
    # Sum of the model's log-probabilities of the new tokens, stop token included (phi2sum's decoding loop only;
    # None where transformers' generate decoded), and with MBR each candidate's, with its new-token count.
    logprob: float | None = None
    candidate_logprobs: tuple[float | None, ...] = ()
    candidate_tokens: tuple[int, ...] = ()
    evidence: tuple[str, ...] = ()  # with generation.mbr_evidence: the samples the candidates were scored against


def clean_summary(raw: str) -> tuple[str, bool]:
    m = RUN_ON.search(raw)
    if m and m.start() > 0:
        return raw[: m.start()].strip(), True
    return raw.strip(), bool(m)


def plan_batches(lengths: list[int], order: list[int], gen: GenerationConfig) -> list[list[int]]:
    """Split prompts (sorted longest first) into batches of at most gen.batch_size rows and, with
    gen.batch_tokens, at most that many cache tokens (rows x beams or MBR candidates x (first row's length +
    max_new_tokens)):
    the few long dialogues then do not make every row of a big batch carry their padding."""
    batches, start = [], 0
    while start < len(order):
        rows = gen.batch_size
        if gen.batch_tokens:
            per_row = gen.sequences_per_dialogue * (lengths[start] + gen.max_new_tokens)
            rows = max(1, min(rows, gen.batch_tokens // per_row))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def generate(loaded: Loaded, dialogues: list[str], instruction: str, gen: GenerationConfig,
             on_batch=None) -> list[Generated]:
    tok = loaded.tokenizer
    prompts = [data_mod.fit_prompt(tok, d, loaded.fmt, instruction, gen.max_input_tokens) for d in dialogues]
    # Sampling draws from a generator seeded here, inside fork_rng so the caller's random state is left
    # as it was: same dialogues, batches and seed give the same samples, run after run.
    device = loaded.hardware.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=gen.do_sample):
        if gen.do_sample:
            torch.manual_seed(gen.seed)
        return _generate_batches(loaded, prompts, gen, on_batch)


def _generate_batches(loaded: Loaded, prompts: list, gen: GenerationConfig, on_batch) -> list[Generated]:
    # Longest first: the largest batch runs first (an OOM shows at once) and batches share lengths.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0]))
    results: list[Generated | None] = [None] * len(prompts)
    # A card smaller than the config assumed still finishes: a batch that runs out of memory is halved,
    # and later batches keep to the size that fitted (said once, so the config can be fixed).
    limit = None
    pending = plan_batches([len(prompts[i][0]) for i in order], order, gen)
    while pending:
        idx = pending.pop(0)
        if limit and len(idx) > limit:
            pending[:0] = [idx[:limit], idx[limit:]]
            continue
        width = max(len(prompts[i][0]) for i in idx)
        try:
            new_tokens = _generate_padded(loaded, [prompts[i][0] for i in idx], gen)
            evidence = _generate_padded(loaded, [prompts[i][0] for i in idx], evidence_config(gen)) \
                if gen.mbr_evidence else [[]] * len(idx)
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise Phi2sumError(
                    f"out of GPU memory generating one dialogue of {width}+{gen.max_new_tokens} tokens x "
                    f"{gen.sequences_per_dialogue} sequence(s): lower generation.max_input_tokens, "
                    f"generation.num_beams, generation.mbr_candidates or generation.mbr_evidence") from None
            new_tokens = None
        if new_tokens is None:  # outside the except block, so the failed batch's tensors are freed first
            if loaded.hardware.device.type == "cuda":
                torch.cuda.empty_cache()
            limit = (len(idx) + 1) // 2
            warn(f"out of GPU memory generating {len(idx)} dialogues x {width} prompt tokens at once; "
                 f"continuing with at most {limit} per batch (set generation.batch_size or "
                 f"generation.batch_tokens lower to start there)")
            pending.insert(0, idx)
            continue
        for i, candidates, drawn in zip(idx, new_tokens, evidence):
            finished = [_finish(loaded, tokens, prompts[i][1], logprob) for tokens, logprob in candidates]
            if len(finished) > 1:
                texts = [g.text for g in finished]
                others = tuple(_finish(loaded, tokens, False).text for tokens, _ in drawn)
                results[i] = replace(finished[mbr_pick(texts, evidence=others or None)], candidates=tuple(texts),
                                     evidence=others,
                                     candidate_logprobs=tuple(g.logprob for g in finished),
                                     candidate_tokens=tuple(g.new_tokens for g in finished))
            else:
                results[i] = finished[0]
        if on_batch:
            on_batch(len(idx))
    return results  # type: ignore[return-value]


def evidence_config(gen: GenerationConfig) -> GenerationConfig:
    """How MBR's evidence is sampled: generation.mbr_evidence samples at mbr_evidence_temperature, otherwise as
    the candidates (top_k, top_p, batches)."""
    return gen.model_copy(update={"temperature": gen.mbr_evidence_temperature, "mbr_candidates": gen.mbr_evidence,
                                  "mbr_evidence": 0})


def _finish(loaded: Loaded, tokens: list[int], truncated_input: bool, logprob: float | None = None) -> Generated:
    """The summary from the new tokens: everything before the first stop token, decoded and cleaned."""
    cut = next((k for k, t in enumerate(tokens) if t in loaded.stop_ids), None)
    kept = tokens if cut is None else tokens[:cut]
    raw = loaded.tokenizer.decode(kept, skip_special_tokens=True)
    text, run_on = clean_summary(raw)
    return Generated(text, raw, len(kept), cut is None, run_on, truncated_input, logprob=logprob)


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)._tokenizer


@functools.lru_cache(maxsize=65536)  # beams and samples repeat one another; the stemmer is the slow part
def _rouge_tokenize(text: str) -> tuple[str, ...]:
    return tuple(_rouge_tokenizer().tokenize(text))


def _lcs_length(a: tuple, b: tuple) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel (Allison-Dix / Hyyro):
    one row of the dynamic-programming table is the bits of one integer, so a token of `a` costs a few
    integer operations instead of len(b) Python steps. rouge-score's table gives the same length ~17x
    slower on summary-sized inputs, and MBR compares every pair of candidates."""
    masks: dict = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    row = full  # a 1 bit is a column where the LCS has not grown yet
    for token in a:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return len(b) - bin(row).count("1")


def ngram_overlaps(counts: list[collections.Counter]) -> np.ndarray:
    """Shared n-grams of every pair as rouge-score counts them, the sum over n-grams of min(count in a, count in b):
    min(x, y) is the number of t >= 1 with x >= t and y >= t, so the matrix is a sum of 0/1 matrix products."""
    index: dict = {}
    cells = np.array([(i, index.setdefault(g, len(index)), c) for i, grams in enumerate(counts)
                      for g, c in grams.items()], dtype=np.int64).reshape(-1, 3)
    dense = np.zeros((len(counts), len(index) + 1), dtype=np.int64)
    dense[cells[:, 0], cells[:, 1]] = cells[:, 2]
    out = np.zeros((len(counts), len(counts)), dtype=np.float32)  # exact: integers far below 2**24
    for t in range(1, dense.max() + 1):
        hit = dense >= t
        hit = hit[:, hit.any(0)].astype(np.float32)  # past t=1 only the few n-grams some text repeats
        out += hit @ hit.T
    return out


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64: numpy 2's bitwise_count, or the same from unpacked bytes on numpy 1.x (which
    GPU images may still carry)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1)
    return bits.reshape(*words.shape, 64).sum(-1, dtype=np.int64)


def lcs_lengths(seqs: list[list[int]], vocab_size: int) -> np.ndarray:
    """LCS length of every pair: _lcs_length's bit-parallel row, one numpy lane per pair. A text of up to 64
    tokens is one uint64 row and the LCS is symmetric, so each pair runs from a side that fits; pairs of two
    longer texts (rare: summaries are ~20-40 tokens) go through _lcs_length itself."""
    m = len(seqs)
    lengths = np.array([len(s) for s in seqs])
    short = np.flatnonzero(lengths <= 64)
    tokens = np.full((m, max(lengths.max(), 1)), vocab_size)  # padding: a token no text has, a step changing nothing
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lane, position = np.nonzero(np.arange(tokens.shape[1]) < lengths[short, None])  # every token of a short text
    masks = np.zeros((vocab_size + 1, len(short)), dtype=np.uint64)  # masks[token, lane]: where b has that token
    np.bitwise_or.at(masks, (tokens[short][lane, position], lane), np.uint64(1) << position.astype(np.uint64))
    full = np.array([(1 << int(n)) - 1 for n in lengths[short]], dtype=np.uint64)
    row = np.tile(full, (m, 1))
    for column in tokens.T:
        match = row & masks[column]
        row = ((row + match) | (row - match)) & full  # a carry past bit 63 wraps away; & full drops it anyway
    out = np.zeros((m, m), dtype=np.int64)
    out[:, short] = lengths[short] - _popcount(row)
    out[short, :] = out[:, short].T
    long = np.flatnonzero(lengths > 64)
    for x, a in enumerate(long):
        for b in long[x:]:
            out[a, b] = out[b, a] = _lcs_length(tuple(seqs[a]), tuple(seqs[b]))
    return out


def pair_overlaps(tokens: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared unigrams, shared bigrams and LCS length of every pair of token sequences: with the lengths, ROUGE-1/2/L
    F1 of every pair follow exactly, for the cost of a few matrix operations instead of a Python loop per pair."""
    vocab: dict = {}
    seqs = [[vocab.setdefault(w, len(vocab)) for w in t] for t in tokens]
    return (ngram_overlaps([collections.Counter(s) for s in seqs]),
            ngram_overlaps([collections.Counter(zip(s, s[1:])) for s in seqs]), lcs_lengths(seqs, len(vocab)))


def pair_f1(lengths: np.ndarray, unigrams: np.ndarray, bigrams: np.ndarray, lcs: np.ndarray) -> np.ndarray:
    """(3, m, m): ROUGE-1, ROUGE-2 and ROUGE-L F1 of every pair (a, b) from pair_overlaps' counts and the token
    counts, with rouge-score's float operations (precision over b, recall over a; F1 is the same bits either way
    round) and its n-gram counts floored at 1 (an empty text; one word has no bigram)."""
    n = np.asarray(lengths, dtype=np.float64)
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for shared, count in ((unigrams, np.maximum(n, 1)), (bigrams, np.maximum(n - 1, 1)), (lcs, n)):
            precision, recall = shared / count[None, :], shared / count[:, None]
            out.append(np.where(shared > 0, 2 * precision * recall / (precision + recall), 0.0))
    return np.stack(out)


def mbr_pick(texts: list[str], weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
             evidence: list[str] | tuple[str, ...] | None = None) -> int:
    """Minimum-Bayes-risk choice among candidate summaries: the index of the one with the highest mbr_supports;
    ties go to the earlier candidate (the better beam; supports within 1e-9 are ties)."""
    support = mbr_supports(texts, weights, evidence)
    # Equal supports summed in different orders can differ in the last bit: within 1e-9 is a tie.
    return int(np.flatnonzero(support >= support.max() - 1e-9)[0])


def mbr_supports(texts: list[str], weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 evidence: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """Each candidate's summed weighted-mean ROUGE-1/2/L F1 (Porter-stemmed, eval's default; `weights` weighs the
    three, for bench/mbr_pool.py's comparisons) against the evidence: all the other candidates, or with
    `evidence` (generation.mbr_evidence) those texts, every one of them (copies count; a candidate equal to an
    evidence text gets its self-score, 1 unless it is one word or empty). Texts repeat (beams rarely, samples of
    a confident model more often), so each distinct text is tokenized and compared once and weighted by its
    copies: the choice of comparing all pairs, for the cost of the distinct ones. The pairs are scored as
    matrices (pair_overlaps, pair_f1): a Python loop over 64 samples' ~2,000 pairs kept the GPU waiting for
    ~1/5 of an eval."""
    if not (len(weights) == 3 and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0):
        raise ValueError(f"mbr_pick weights must be three finite values >= 0, not all 0; got {weights}")
    if evidence is not None and not evidence:
        raise ValueError("mbr_pick evidence must hold at least one text (or be None: the candidates)")
    pool = list(texts) + list(evidence or ())
    distinct = list(dict.fromkeys(pool))  # first-seen order
    which = {t: i for i, t in enumerate(distinct)}
    copies = np.bincount([which[t] for t in (texts if evidence is None else evidence)], minlength=len(distinct))
    tokens = [_rouge_tokenize(t) for t in distinct]
    r1, r2, rl = pair_f1(np.array([len(t) for t in tokens]), *pair_overlaps(tokens))
    (w1, w2, wl), total = weights, sum(weights)
    pair = (w1 * r1 + w2 * r2 + wl * rl) / total
    terms = pair * copies
    if evidence is None:
        # Each text against every other candidate: other texts times their copies, and its own other copies
        # (1 for most texts, less for one word (no bigram), 0 for an empty one).
        np.fill_diagonal(terms, (copies - 1) * pair.diagonal())
    # Summed left to right (cumsum is sequential; sum is not), in the order a loop over the pairs adds them:
    # the same floats as the pairwise mbr_pick that chose earlier evals' predictions, so those reproduce exactly.
    return np.cumsum(terms, axis=1)[:, -1][[which[t] for t in texts]]


def _generate_padded(loaded: Loaded, prompts: list[list[int]],
                     gen: GenerationConfig) -> list[list[tuple[list[int], float | None]]]:
    """For each prompt, its sequence (or with MBR its candidates), each as (new tokens, log-probability): the
    log-probability (decode_static's sum) where phi2sum's loop decoded, None where generate did."""
    tok, model = loaded.tokenizer, loaded.model
    n = gen.sequences_per_dialogue
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                  num_beams=gen.num_beams if gen.do_sample else n, num_return_sequences=gen.mbr_candidates or 1,
                  repetition_penalty=gen.repetition_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
                  length_penalty=gen.length_penalty, eos_token_id=loaded.stop_ids, pad_token_id=tok.pad_token_id,
                  use_cache=True)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if gen.cache == "static":
        kwargs["cache_implementation"] = "static"
    width = max(len(ids) for ids in prompts)
    # Left padding: every prompt ends at the same column, so new tokens line up across the batch.
    input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    device = loaded.hardware.device
    if device.type == "cuda" and graph_decoding_applies(loaded, gen):
        # The device context: under `accelerate launch` each process's streams and graph belong to its GPU.
        with torch.inference_mode(), torch.cuda.device(device):
            return decode_candidates(loaded, input_ids, attention, gen, graph=True)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    new = [(tokens, None) for tokens in out[:, width:].cpu().tolist()]
    per = kwargs["num_return_sequences"]  # generate returns each prompt's sequences together
    return [new[k : k + per] for k in range(0, len(new), per)]


def decode_candidates(loaded: Loaded, input_ids: torch.Tensor, attention: torch.Tensor, gen: GenerationConfig,
                      graph: bool) -> list[list[tuple[list[int], float | None]]]:
    """decode_static for a batch of prompts, grouped per prompt: one sequence each, or with MBR sampling its
    mbr_candidates samples (each prompt's cache copied to that many rows of its own after one prefill)."""
    per = gen.mbr_candidates or 1  # only sampling reaches here with candidates (beams go to generate)
    rows = decode_static(loaded, input_ids, attention, gen, graph, copies=per, logprobs=bool(gen.mbr_candidates))
    return [rows[k : k + per] for k in range(0, len(rows), per)]


def graph_decoding_applies(loaded: Loaded, gen: GenerationConfig) -> bool:
    """Plain greedy decoding or sampling, MBR's samples included (bf16/fp16 or 4-bit), with a transformers
    whose static cache counts its own length on the GPU (5.x): the cases decode_static serves; everything
    else (beams among them) goes through generate."""
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
    # Only full-attention layers: a sliding-window layer keeps fewer columns than the loop's mask has.
    return bool(layers) and all(type(layer).__name__ == "StaticLayer" and hasattr(layer, "cumulative_length")
                                for layer in layers)


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


def decode_static(loaded: Loaded, input_ids: torch.Tensor, attention: torch.Tensor, gen: GenerationConfig,
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

    steps, ran = gen.max_new_tokens - 1, 0
    run = step
    if graph and steps > 1:
        # The first step runs for real on a side stream (warms kernels and workspaces, as capture requires);
        # capturing records the second without running it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        ran = 1
        captured = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(captured):
                step()
            run = captured.replay
        except torch.OutOfMemoryError:
            raise  # the caller halves the batch
        except RuntimeError as e:  # capture records nothing it ran: the state is intact, decode without it
            warn(f"could not capture the decoding step as a CUDA graph ({str(e).splitlines()[0][:120]}); "
                 "decoding without it (set generation.cuda_graph: false to skip the attempt)")
    for k in range(ran, steps):
        if k % 8 == 0 and bool(done.all()):  # one host sync every 8 tokens
            break
        run()
    return list(zip(tokens.cpu().tolist(), logprob.cpu().tolist() if logprobs else [None] * rows))


# ----------------------------------------------------------------------------------------------------
# ROUGE


def _sentences(text: str) -> str:
    # rougeLsum scores summary-level LCS over newline-separated sentences.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


@dataclass
class RougeResult:
    pairs: dict  # metric -> mean over all dialogue-reference pairs
    first: dict  # metric -> mean against the first reference only
    per_dialogue_sum: dict  # metric -> array: sum over the dialogue's pairs (for the bootstrap)
    counts: np.ndarray  # references per dialogue


def rouge(predictions: list[str], references: list[list[str]], use_stemmer: bool = True) -> RougeResult:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=use_stemmer)
    sums = {m: np.zeros(len(predictions)) for m in METRICS}
    first = {m: np.zeros(len(predictions)) for m in METRICS}
    counts = np.array([len(r) for r in references], dtype=float)
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        for j, ref in enumerate(refs):
            scores = scorer.score(_sentences(ref), _sentences(pred))
            for m in METRICS:
                sums[m][i] += scores[m].fmeasure
                if j == 0:
                    first[m][i] = scores[m].fmeasure
    total = counts.sum()
    return RougeResult({m: float(sums[m].sum() / total) for m in METRICS},
                       {m: float(first[m].mean()) for m in METRICS}, sums, counts)


def bootstrap_ci(result: RougeResult, samples: int, seed: int = 0) -> dict:
    """95% percentile intervals, resampling dialogues (a dialogue's references move together)."""
    if samples == 0:
        return {m: None for m in METRICS}
    rng = np.random.default_rng(seed)
    n = len(result.counts)
    idx = rng.integers(0, n, size=(samples, n))
    counts = result.counts[idx].sum(axis=1)
    out = {}
    for m in METRICS:
        means = result.per_dialogue_sum[m][idx].sum(axis=1) / counts
        out[m] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def words(text: str) -> int:
    return len(text.split())


def score_model(name: str, gens: list[Generated], references: list[list[str]], cfg: RunConfig,
                seconds: float) -> dict:
    preds = [g.text for g in gens]
    result = rouge(preds, references, cfg.eval.use_stemmer)
    ci = bootstrap_ci(result, cfg.eval.bootstrap_samples)
    row = {"name": name}
    for m in METRICS:
        row[m] = {"mean": result.pairs[m], "ci95": ci[m]}
    row["first_reference"] = result.first
    row["mean_words"] = float(np.mean([words(p) for p in preds]))
    row["reference_mean_words"] = float(np.mean([words(r) for refs in references for r in refs]))
    row["run_on_share"] = float(np.mean([g.run_on for g in gens]))
    row["hit_max_new_tokens_share"] = float(np.mean([g.hit_max for g in gens]))
    row["truncated_inputs"] = int(sum(g.truncated_input for g in gens))
    row["seconds"] = seconds
    row["dialogues_per_second"] = len(gens) / max(seconds, 1e-9)
    return row


# ----------------------------------------------------------------------------------------------------
# The eval verb


def _shard_and_gather(state, fn, items: list) -> list:
    """Under `accelerate launch`, each process generates a contiguous slice of `items`; the slices come
    back concatenated in process order, i.e. in input order. One process: fn(items)."""
    if state.num_processes == 1:
        return fn(items)
    from accelerate.utils import gather_object

    with state.split_between_processes(items) as mine:
        out = fn(list(mine))
    return gather_object(out)


def run_eval(cfg: RunConfig, adapter: str | None, compare_base: bool, out_dir: Path) -> dict | None:
    """Score the test split; returns the metrics (None on the non-main processes of a multi-GPU run)."""
    from accelerate import PartialState

    # cpu=True: on a machine without CUDA, torchrun/accelerate launch processes still form one group (gloo).
    state = PartialState(cpu=cfg.train.device == "cpu" or not torch.cuda.is_available())
    main = state.is_main_process
    check_adapter(adapter)  # before the test split is read (or downloaded)
    rows = data_mod.load_split(cfg.data, cfg.data.test_split, merge_duplicates=True)
    n = min(cfg.eval.limit or len(rows.ids), len(rows.ids))
    ids, dialogues, references = rows.ids[:n], rows.dialogues[:n], rows.references[:n]
    loaded = load_for_inference(cfg, adapter)
    runs = [("fine-tuned", True)] if adapter else [("base", False)]
    if adapter and compare_base:
        runs.append(("base", False))
    metrics = {"split": cfg.data.test_split, "source": rows.origin, "n_dialogues": n,
               "n_pairs": int(sum(len(r) for r in references)),
               "protocol": "mean over all dialogue-reference pairs; CI: bootstrap over dialogues",
               "use_stemmer": cfg.eval.use_stemmer, "rougeLsum_sentences": "split after . ! ?",
               "bootstrap_samples": cfg.eval.bootstrap_samples, "prompt_format": loaded.fmt,
               "stop_tokens": loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids),
               "generation": cfg.generation.model_dump(), "base_model": cfg.model.name, "adapter": adapter,
               "device": loaded.hardware.name, "processes": state.num_processes, "models": {}}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with progress(disable=not main) as bar:
        for name, use_adapter in runs:
            if loaded.full and not use_adapter:  # the base is another set of weights: swap it in,
                loaded.model = None  # unquantized like the fine-tune, so the two columns compare weights only
                loaded.model = modeling.load_base(cfg.model, loaded.hardware, quantize=False).eval()
            # With several processes the bar follows the main process's share (all shards are alike).
            task = bar.add_task(f"generate ({name})", total=math.ceil(n / state.num_processes), stats="")
            started = time.perf_counter()

            def advance(k, task=task, started=started):
                done = bar.tasks[task].completed + k
                rate = done * state.num_processes / (time.perf_counter() - started)
                bar.update(task, advance=k, stats=f"{rate:.1f} dialogues/s")

            def run(part, use_adapter=use_adapter):
                if use_adapter or not adapter or loaded.full:
                    return generate(loaded, part, cfg.data.instruction, cfg.generation, advance)
                with loaded.model.disable_adapter():
                    return generate(loaded, part, cfg.data.instruction, cfg.generation, advance)

            gens = _shard_and_gather(state, run, dialogues)
            seconds = time.perf_counter() - started
            if not main:
                continue
            metrics["models"][name] = score_model(adapter if use_adapter else cfg.model.name, gens, references,
                                                  cfg, seconds)
            suffix = "" if name != "base" or not adapter else "_base"
            write_jsonl_atomic(out_dir / f"predictions{suffix}.jsonl", [
                {"id": i, "dialogue": d, "references": r, "prediction": g.text, "raw_output": g.raw,
                 "new_tokens": g.new_tokens, "hit_max_new_tokens": g.hit_max, "run_on": g.run_on,
                 **(_saved_candidates(g) if cfg.eval.save_candidates and g.candidates else {})}
                for i, d, r, g in zip(ids, dialogues, references, gens)])
    if not main:
        return None
    total_truncated = sum(m["truncated_inputs"] for m in metrics["models"].values())
    if total_truncated:
        warn(f"{total_truncated} dialogues were shortened to generation.max_input_tokens "
             f"({cfg.generation.max_input_tokens})")
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _saved_candidates(g: Generated) -> dict:
    """eval.save_candidates' fields: the texts, and (where phi2sum's loop decoded) each candidate's summed
    log-probability and new-token count, for re-selection studies on the CPU (bench/mbr_pool.py)."""
    out = {"candidates": list(g.candidates), **({"evidence": list(g.evidence)} if g.evidence else {})}
    if g.candidate_logprobs and None not in g.candidate_logprobs:
        out.update(candidate_logprobs=[round(x, 4) for x in g.candidate_logprobs],
                   candidate_new_tokens=list(g.candidate_tokens))
    return out


def _fmt(entry: dict) -> str:
    ci = entry["ci95"]
    return f"{entry['mean']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def results_table(metrics: dict):
    from rich.table import Table

    models = metrics["models"]
    names = [n for n in ("base", "fine-tuned") if n in models]
    table = Table(title=f"ROUGE F1 on {metrics['split']}: {metrics['n_dialogues']} dialogues, {metrics['n_pairs']} "
                        f"dialogue-reference pairs, stemmed={metrics['use_stemmer']} (95% bootstrap CI)")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    if len(names) == 2:
        table.add_column("difference", justify="right")
    for m in METRICS:
        cells = [_fmt(models[n][m]) for n in names]
        if len(names) == 2:
            d = models["fine-tuned"][m]["mean"] - models["base"][m]["mean"]
            cells.append(f"{d:+.4f}")
        table.add_row(m, *cells)
    extra = [("mean words (refs {:.1f})".format(models[names[0]]["reference_mean_words"]), "mean_words", "{:.1f}"),
             ("ran past the summary", "run_on_share", "{:.1%}"),
             ("hit max_new_tokens", "hit_max_new_tokens_share", "{:.1%}"),
             ("dialogues/s", "dialogues_per_second", "{:.2f}")]
    for label, key, f in extra:
        cells = [f.format(models[n][key]) for n in names]
        if len(names) == 2:
            cells.append("")
        table.add_row(label, *cells)
    return table
