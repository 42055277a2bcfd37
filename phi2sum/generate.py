"""Generation for eval and summarize: the model for inference, batches planned by length and token budget,
a batch that runs out of GPU memory halved, and each dialogue's summary cut at its stop token.

Greedy decoding and sampling on a GPU go through decoding.py's CUDA-graph loop; beams and everything else through
transformers' `generate`. With generation.mbr_candidates the candidates are chosen among by mbr.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import data as data_mod
from . import modeling, runs
from .config import GenerationConfig, Phi2sumError, RunConfig
from .console import warn
from .decoding import decode_candidates, graph_decoding_applies
from .mbr import mbr_pick

# A line starting with a speaker tag, or a new prompt, means the model kept going past its summary.
RUN_ON = re.compile(r"(^|\n)\s*(#?Person\s?\d#?\s*:|#\w+#\s*:|Instruct:|Output:|<\|im_start\|>|User:|Assistant:)")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    fmt: str
    stop_ids: list
    adapter: str | None
    hardware: modeling.Hardware
    full: bool = False  # the run is a full fine-tune: no adapter to switch off for the base pass
    dequantized: bool = False  # a 4-bit base was dequantized for generation (generation.dequantize)


def process_state(gen: GenerationConfig, **kwargs):
    """accelerate's process group for eval and summarize (one process without a launcher). cpu=True on a
    machine without CUDA, or with generation.device cpu: torchrun/accelerate launch processes still form one
    group (gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=gen.device == "cpu" or not torch.cuda.is_available(), **kwargs)


def load_for_inference(cfg: RunConfig, adapter: str | None) -> Loaded:
    """Base model (+ adapter). On CUDA the base is quantized as configured and computes in bf16 (fp16
    without bf16), a 4-bit one then dequantized (generation.dequantize); on CPU it runs unquantized in fp32."""
    runs.check_adapter(adapter)
    runs.check_adapter_config(adapter)
    hw = modeling.pick_hardware(cfg.generation.device, cfg.generation.precision)
    path = modeling.base_path(cfg.model)
    # The run saved the tokenizer it trained with (chat template, added tokens): prefer it to the base's.
    own = adapter and Path(adapter, "tokenizer_config.json").is_file()
    tokenizer = modeling.load_tokenizer(cfg.model, adapter if own else path)
    quantize = hw.device.type == "cuda" and cfg.model.quantization != "none"
    full = bool(adapter) and runs.is_full_model(Path(adapter))
    if full:  # the run holds the whole model, trained unquantized (train never quantizes a full fine-tune)
        model = modeling.load_base(cfg.model, hw, adapter, quantize=False)
    else:
        model = modeling.load_base(cfg.model, hw, path, quantize=quantize)
    dequantized = False
    if cfg.generation.dequantize:
        # Here, before the adapter loads, rather than at fold time: PEFT then wraps plain layers, which fold_adapter
        # folds into as into an unquantized base, and eval's base pass (adapter off, before the fold) already runs
        # on the same dequantized weights.
        dequantized = modeling.dequantize_4bit(model)
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
    return Loaded(model, tokenizer, fmt, data_mod.stop_ids(tokenizer, fmt), adapter, hw, full, dequantized)


def fold_adapter(loaded: Loaded) -> bool:
    """Fold the LoRA weights into an unquantized base for generation: the same model up to rounding in the
    compute dtype, with no adapter matmuls left at each decoding step. Cannot be undone exactly (bf16/fp16
    rounding), so a pass with the adapter switched off must run before it. A 4-bit base arrives dequantized
    (load_for_inference) and folds too; an 8-bit base, or a 4-bit one kept 4-bit (generation.dequantize: false,
    or too little GPU memory), keeps the adapter beside it (its weights cannot absorb it). Returns whether it
    folded."""
    base = modeling.unwrap_peft(loaded.model)
    quantized = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    if not loaded.adapter or loaded.full or quantized or not hasattr(loaded.model, "merge_adapter"):
        return False
    loaded.model.merge_adapter()
    return True


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
            # The evidence's log-probabilities are never read: not computed (a vocabulary-wide softmax per token).
            evidence = _generate_padded(loaded, [prompts[i][0] for i in idx], evidence_config(gen), logprobs=False) \
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
        if on_batch:  # each batch as it finishes: progress, or summarize's output written as it goes
            on_batch([(i, results[i]) for i in idx])
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


def _generate_padded(loaded: Loaded, prompts: list[list[int]], gen: GenerationConfig,
                     logprobs: bool = True) -> list[list[tuple[list[int], float | None]]]:
    """For each prompt, its sequence (or with MBR its candidates), each as (new tokens, log-probability): the
    log-probability (decode_static's sum) where phi2sum's loop decoded MBR candidates and `logprobs` asks for it,
    else None."""
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
    if device.type == "cuda" and graph_decoding_applies(loaded, gen, total=width + gen.max_new_tokens):
        # The device context: under `accelerate launch` each process's streams and graph belong to its GPU.
        with torch.inference_mode(), torch.cuda.device(device):
            return decode_candidates(loaded, input_ids, attention, gen, graph=True, logprobs=logprobs)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    new = [(tokens, None) for tokens in out[:, width:].cpu().tolist()]
    per = kwargs["num_return_sequences"]  # generate returns each prompt's sequences together
    return [new[k : k + per] for k in range(0, len(new), per)]
