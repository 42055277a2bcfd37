"""Training: quantized base + LoRA, one readable loop, checkpoints that survive Ctrl-C, SIGTERM and SIGKILL.

    phi2sum train --config configs/p100.yaml            (one GPU or CPU)
    accelerate launch -m phi2sum train --config ...     (several GPUs, DDP)

The step, top to bottom: fetch this step's micro-batches, forward (loss on summary tokens only),
scaled backward, unscale + clip, optimizer step (skipped on inf/NaN), learning rate, log, eval,
checkpoint. Everything a run produces lands in `train.output_dir`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from . import data as data_mod
from . import modeling
from .config import ConfigError, Phi2sumError, RunConfig, check_hardware, save_config, write_text_atomic
from .console import info, progress, warn

CKPT_PREFIX = "step-"


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    total_steps: int
    real_tokens: int
    seconds: float
    tokens_per_second: float
    train_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    final_eval_loss: float | None
    peak_memory_gib: float | None
    peak_reserved_gib: float | None
    device: str
    precision: str
    world_size: int
    stopped: str  # finished | early_stopping | interrupted


# ----------------------------------------------------------------------------------------------------
# Loss on summary tokens only


class SummaryLoss(nn.Module):
    """Sum of cross-entropy over label positions. Only the hidden states of summary tokens go through
    the output head: with ~10x more prompt than summary tokens this skips most of the vocab-sized
    logits (51,200 x seq for Phi-2), the largest activation of the step."""

    def __init__(self, model, padding_mask: bool = False, label_smoothing: float = 0.0, neftune_alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.padding_mask = padding_mask
        self.label_smoothing = label_smoothing
        self.neftune_alpha = neftune_alpha

    def forward(self, input_ids, attention_mask, labels):
        causal_lm = modeling.unwrap_peft(self.model)
        # collate pads on the right, so under a causal mask no real token sees a pad: the padding mask
        # changes nothing the loss reads (train.padding_mask), and without one SDPA takes its causal kernels.
        mask = attention_mask if self.padding_mask else None
        inputs = {"input_ids": input_ids}
        if self.training and self.neftune_alpha > 0:
            embeds = causal_lm.get_input_embeddings()(input_ids)
            # Noise per row scaled by its own length (pads excluded), as the NEFTune paper's L.
            scale = self.neftune_alpha / (attention_mask.sum(1) * embeds.shape[-1]).clamp(min=1).sqrt()
            noise = torch.empty_like(embeds).uniform_(-1, 1) * scale[:, None, None].to(embeds.dtype)
            inputs = {"inputs_embeds": embeds + noise}
        hidden = causal_lm.base_model(**inputs, attention_mask=mask, use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum",
                                           label_smoothing=self.label_smoothing if self.training else 0.0)


def uses_padding_mask(cfg: RunConfig) -> bool:
    """train.padding_mask, except that remote model code always gets the mask: it may not be purely causal
    (prefix-LM styles) or may read positions from the mask."""
    return cfg.train.padding_mask or cfg.model.trust_remote_code


def collate(rows: list[tuple[list[int], int]], pad_id: int, multiple: int = 1, cap: int | None = None) -> dict:
    # Right padding: positions count from 0 at the first real token, as in generation. Rounding the width up
    # to `multiple` stops at `cap` (data.max_length), so padding never reaches positions a row could not.
    longest = max(len(ids) for ids, _ in rows)
    width = -(-longest // multiple) * multiple
    if cap is not None:
        width = max(longest, min(width, cap))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, plen) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: bool) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): resuming rebuilds the same order.
    Length grouping sorts within windows of 64 batches, then shuffles the batches, so similar lengths
    share a batch without ordering the epoch by length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group:
        window = batch_size * 64
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.array_split(order, max(1, math.ceil(len(order) / window)))])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def lr_at(step: int, total: int, peak: float, warmup: int, kind: str) -> float:
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant":
        return peak
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return peak * (1.0 - progress_)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress_))


def make_optimizer(params, t, device_type: str):
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                 fused=device_type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder, checksummed, renamed; read back only when the manifest agrees


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: Path, step: int, model, optimizer, scaler, extra: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}-{os.getpid()}"
    for torn in root.glob(f".tmp-{CKPT_PREFIX}*"):  # left by a killed run (only one process writes here)
        shutil.rmtree(torn, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps(extra | {"step": step}))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {f: _sha256(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as e:  # a full disk, most often: torch.save says so only as "unexpected pos" (RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise Phi2sumError(f"could not write checkpoint {final} ({type(e).__name__}: {cause}); is the disk full? "
                           "The older checkpoints are intact: free some space, then continue with --resume") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Newer checkpoints than this one are ones resume skipped as corrupt: never keep them instead of this one.
    newer = [p for p in root.glob(f"{CKPT_PREFIX}*") if p.name > final.name]
    for old in newer + sorted(p for p in root.glob(f"{CKPT_PREFIX}*") if p.name <= final.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def valid_checkpoint(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return all(_sha256(path / f) == digest for f, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(run: Path) -> Path | None:
    for path in sorted((run / "checkpoints").glob(f"{CKPT_PREFIX}*"), reverse=True):
        if valid_checkpoint(path):
            return path
        warn(f"checkpoint {path} is incomplete or corrupted (checksum mismatch); skipping it")
    return None


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))
    blob = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    rng = blob["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Run directory


def check_run_dir(run: Path, overwrite: bool, resume: bool) -> None:
    if not run.exists() or not any(run.iterdir()):
        return
    if overwrite:
        if not ((run / "config.yaml").is_file() or (run / "checkpoints").is_dir()):
            raise ConfigError(f"{run} is not a phi2sum run folder; --overwrite deletes only runs. "
                              "Set train.output_dir to a new or empty folder")
        shutil.rmtree(run)
        return
    if resume:
        return
    raise ConfigError(f"{run} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                      "or set train.output_dir to a new folder")


def _same_setup(saved: Path, cfg: RunConfig) -> None:
    import yaml

    old = yaml.safe_load(saved.read_text())
    try:  # a run saved before a setting existed lacks it: compare with its default filled in
        old = RunConfig.model_validate(old).model_dump(mode="json")
    except ValidationError:  # not a valid config now (a setting since removed): compare as written
        pass
    new = cfg.model_dump(mode="json")
    for section in ("model", "lora", "data"):
        if old.get(section) != new[section]:
            raise ConfigError(f"--resume: the {section} settings differ from the run in {saved.parent}; "
                              "resume with the same config, or start a new output_dir")


def _resumed_micro_per_step(state: dict, t, world: int, main: bool) -> int:
    """A resumed run keeps its global batch whatever the process count now: the data position is the
    step number, so rows per step must not change. grad_accum is adapted where it divides."""
    saved = state.get("micro_per_step", t.grad_accum * world)  # checkpoints from before this field: as now
    if state.get("batch_size", t.batch_size) != t.batch_size:
        raise ConfigError(f"--resume: the run used train.batch_size={state['batch_size']}; resume with that value")
    if saved == t.grad_accum * world:
        return saved
    if saved % world:
        raise ConfigError(f"--resume: the run took {saved} micro-batches per step (grad_accum x processes); "
                          f"{world} processes cannot split that evenly; resume with a process count that divides {saved}")
    if main:
        info(f"resuming keeps the run's {saved} micro-batches of {t.batch_size} rows per step: with {world} "
             f"process(es), train.grad_accum {t.grad_accum} -> {saved // world}")
    return saved


def plot_losses(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per summary token")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The loop


class _Stop:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate_loss(loss_model, rows, batch_size, batch_of, device, accelerator) -> float:
    """Mean summary-token loss over `rows`; `batch_of` pads a list of rows into a batch, as training does."""
    loss_model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in batch_of(mine[i : i + batch_size]).items()}
            with accelerator.autocast():
                total += loss_model(**batch).float()
            count += (batch["labels"][:, 1:] != -100).sum()
    loss_model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


def train(cfg: RunConfig, overwrite: bool = False, resume: bool = False) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    t = cfg.train
    hw = modeling.pick_hardware(t)
    problems = check_hardware(cfg, torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if problems:
        raise ConfigError("\n".join(problems))
    mixed = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(hw.dtype, "no")
    # accelerate keeps one process-wide state; a second train() in the same process (a notebook, a
    # benchmark) with another precision would be refused. The distributed part of the state stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed, cpu=hw.device.type == "cpu")
    main = accelerator.is_main_process
    world = accelerator.num_processes
    run = Path(t.output_dir)
    resume = resume or t.resume == "auto"
    if main:
        check_run_dir(run, overwrite, resume)
        run.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if resume and (run / "config.yaml").is_file():
        _same_setup(run / "config.yaml", cfg)

    set_seed(t.seed)
    with accelerator.main_process_first():  # one process converts/tokenizes, the others read its caches
        path = modeling.base_path(cfg.model)
        tokenizer = modeling.load_tokenizer(cfg.model, path)
        prepared = data_mod.prepare(cfg.data, tokenizer, progress=info if main else None)
    if main:
        info(f"data: {prepared.report['splits'][cfg.data.train_split]['rows_kept']} train rows "
             f"({'cached' if prepared.cached else 'prepared'} in {prepared.path})")
    train_ds = prepared.splits[cfg.data.train_split]
    train_rows = list(zip(train_ds["input_ids"], train_ds["prompt_length"]))
    val_ds = prepared.splits[cfg.data.validation_split]
    val_rows = list(zip(val_ds["input_ids"], val_ds["prompt_length"]))[: t.eval_max_rows]
    lengths = np.array([len(ids) for ids, _ in train_rows])

    quantized = cfg.model.quantization != "none" and cfg.lora.enabled
    hw_model = modeling.Hardware(accelerator.device, hw.dtype, hw.name)
    model = modeling.load_base(cfg.model, hw_model, path, quantize=quantized)
    model = modeling.add_lora(model, cfg.lora, t, quantized)
    if mixed != "no":
        modeling.keep_lora_inputs_in_compute_dtype(model)
        modeling.norms_in_compute_dtype(model)
    if t.compile:
        # Inductor's GPU kernels are Triton's, which needs compute capability 7.0+ (not a P100).
        if accelerator.device.type == "cuda" and torch.cuda.get_device_capability(accelerator.device) >= (7, 0):
            compiled = modeling.compile_body(model)
            if main:
                info(f"torch.compile: {compiled} (the first step and the first evaluation compile)")
        elif main:
            warn(f"train.compile needs a CUDA GPU of compute capability 7.0 or newer; running uncompiled on {hw.name}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = make_optimizer(trainable, t, accelerator.device.type)
    loss_model = SummaryLoss(model, uses_padding_mask(cfg), cfg.train.label_smoothing, cfg.train.neftune_alpha)
    if cfg.model.trust_remote_code and not t.padding_mask and main:
        info("model.trust_remote_code: training passes the padding mask (train.padding_mask is for known-causal models)")
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    scaler = accelerator.scaler

    micro_per_step = t.grad_accum * world  # micro-batches in one optimizer step, over all processes
    state = {"best_eval_loss": None, "best_step": None, "bad_evals": 0, "real_tokens": 0, "seconds": 0.0,
             "micro_per_step": micro_per_step, "batch_size": t.batch_size}
    step = 0
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            state = load_checkpoint(ckpt, accelerator.unwrap_model(loss_model).model, optimizer, scaler)
            step = state.pop("step")
            micro_per_step = _resumed_micro_per_step(state, t, world, main)
            t = t.model_copy(update={"grad_accum": micro_per_step // world})  # what the run does from here on
            cfg = cfg.model_copy(update={"train": t})
            state.update(micro_per_step=micro_per_step, batch_size=t.batch_size)  # older checkpoints lack them
        elif main and (run / "checkpoints").exists():
            warn(f"no usable checkpoint in {run}/checkpoints; starting from step 0")
    batches_per_epoch = math.ceil(len(train_rows) / t.batch_size)
    steps_per_epoch = batches_per_epoch // micro_per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_rows)} training rows make less than one optimizer step of "
                          f"{t.batch_size} x {micro_per_step // world} x {world} rows; lower batch_size or grad_accum")
    total_steps = t.max_steps or max(1, int(round(t.epochs * steps_per_epoch)))
    if main and step:
        info(f"resuming from {ckpt} (step {step} of {total_steps})")
    if main:
        save_config(cfg, run / "config.yaml")
        metrics = run / "metrics.jsonl"
        if metrics.exists():  # drop lines logged after the checkpoint we resumed from
            keep = [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
            write_text_atomic(metrics, "".join(k + "\n" for k in keep))  # a kill here must not lose the log
        write_text_atomic(run / "prepare_report.json", json.dumps(prepared.report, indent=2))
        info(f"model: {path} | {hw.name} {mixed if mixed != 'no' else 'fp32'} | "
             f"{cfg.model.quantization if quantized else 'no quantization'} | trainable {n_trainable / 1e6:.2f}M "
             f"| {total_steps} steps x {t.batch_size * micro_per_step} rows")

    def log(row: dict) -> None:
        if main:
            with open(run / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(run, step, accelerator.unwrap_model(loss_model).model, optimizer, scaler,
                            dict(state), t.keep_checkpoints)
        accelerator.wait_for_everyone()

    def save_adapter(dest: Path) -> None:
        if not main:
            return
        tmp = dest.parent / f".tmp-{dest.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(loss_model).model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    # One padding rule for training and validation batches.
    batch_of = functools.partial(collate, pad_id=tokenizer.pad_token_id, multiple=t.pad_to_multiple_of,
                                 cap=cfg.data.max_length)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bad_steps = 0
    batches_epoch = None
    stopped = "finished"
    last_loss = None
    loss_model.train()
    bar = progress() if main else None
    started = time.perf_counter() - state["seconds"]
    window_tokens, window_start = 0, time.perf_counter()
    with _Stop() as stop, (bar or _Null()):
        task = bar.add_task("train", total=total_steps, completed=step, stats="") if bar else None
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != batches_epoch:  # the order is a function of the epoch: build it once per epoch
                batches = epoch_batches(lengths, t.batch_size, t.seed, epoch, t.group_by_length)
                batches_epoch = epoch
            group = batches[within * micro_per_step : (within + 1) * micro_per_step]
            mine = group[accelerator.process_index :: world]
            micro = [batch_of([train_rows[i] for i in b]) for b in mine]
            # Normalise by the step's summary tokens over all micro-batches and processes, so the
            # gradient is the same whatever the batch split (DDP averages, hence the * world).
            local_tokens = torch.tensor(sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro), device=device)
            global_tokens = accelerator.reduce(local_tokens.clone(), "sum").clamp(min=1)
            step_loss = torch.zeros((), device=device)
            for j, m in enumerate(micro):
                m = {k: v.to(device, non_blocking=True) for k, v in m.items()}
                sync = j == len(micro) - 1
                try:
                    with (_Null() if sync or world == 1 else accelerator.no_sync(loss_model)), accelerator.autocast():
                        loss = loss_model(**m) * world / global_tokens
                    accelerator.backward(loss)
                except torch.OutOfMemoryError:
                    rows, width = m["input_ids"].shape
                    raise Phi2sumError(
                        f"out of GPU memory at step {step + 1} (a micro-batch of {rows} rows x {width} tokens): "
                        f"lower train.batch_size (raise train.grad_accum to keep the global batch), lower "
                        f"data.max_length, or set train.gradient_checkpointing: true. Last checkpoint: "
                        f"{latest_checkpoint(run) or 'none'}") from None
                step_loss += loss.detach()
            step_loss = accelerator.reduce(step_loss, "sum") / world
            loss_value = step_loss.item()  # one host sync per optimizer step
            lr = lr_at(step, total_steps, t.learning_rate, t.warmup_steps, t.scheduler)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                warn(f"step {step + 1}: loss is {loss_value}; skipping the update ({bad_steps}/{t.max_bad_steps})") if main else None
                if bad_steps >= t.max_bad_steps:
                    last = latest_checkpoint(run) if main else None
                    raise Phi2sumError(
                        f"loss was NaN/inf for {bad_steps} steps in a row (step {step + 1}); training stopped. "
                        f"Last good checkpoint: {last or 'none'}. Lower train.learning_rate, or use bf16/fp32")
                continue
            bad_steps = 0
            grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_value
            real = sum(int(m["attention_mask"].sum()) for m in micro)
            real = int(accelerator.reduce(torch.tensor(real, device=device), "sum").item()) if world > 1 else real
            state["real_tokens"] += real
            window_tokens += real
            if step % t.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                log({"kind": "train", "step": step, "loss": loss_value, "lr": lr,
                     "grad_norm": float(grad_norm) if grad_norm is not None else None,
                     "tokens_per_second": tps, "peak_memory_gib": mem})
                if bar:
                    bar.update(task, stats=f"loss {loss_value:.3f} lr {lr:.2e} {tps:,.0f} tok/s"
                               + (f" {mem:.1f} GiB" if mem else ""))
            if bar:
                bar.update(task, completed=step)
            if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
                eval_loss = evaluate_loss(loss_model, val_rows, t.batch_size, batch_of, device, accelerator)
                log({"kind": "eval", "step": step, "eval_loss": eval_loss})
                if main:
                    bar.console.print(f"step {step}: validation loss {eval_loss:.4f}")
                best = state["best_eval_loss"]
                if best is None or eval_loss < best:
                    state.update(best_eval_loss=eval_loss, best_step=step, bad_evals=0)
                    if t.keep_best:
                        save_adapter(run / "best")
                else:
                    state["bad_evals"] += 1
                state["final_eval_loss"] = eval_loss
                if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                    stopped = "early_stopping"
            state["seconds"] = time.perf_counter() - started
            requested = stop.requested
            if world > 1:  # all processes must agree to stop at the same step
                flag = accelerator.reduce(torch.tensor(int(bool(requested)), device=device), "sum").item()
                requested = requested or ("signal" if flag else None)
            if step % t.save_every == 0 or requested or stopped != "finished":
                checkpoint()
            if requested:
                stopped = "interrupted"
                break
            if stopped != "finished":
                break

    seconds = time.perf_counter() - started
    result = TrainResult(
        run_dir=str(run), steps=step, total_steps=total_steps, real_tokens=state["real_tokens"], seconds=seconds,
        tokens_per_second=state["real_tokens"] / max(seconds, 1e-9), train_loss=last_loss,
        best_eval_loss=state["best_eval_loss"], best_step=state["best_step"],
        final_eval_loss=state.get("final_eval_loss"),
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        device=hw.name, precision=mixed if mixed != "no" else "fp32", world_size=world, stopped=stopped)
    if main:
        if stopped != "interrupted":
            use_best = t.keep_best and (run / "best").is_dir()
            if use_best:
                for f in (run / "best").iterdir():
                    shutil.copy2(f, run / f".tmp-{f.name}")
                    os.replace(run / f".tmp-{f.name}", run / f.name)
            else:
                save_adapter(run / "last")
                for f in (run / "last").iterdir():
                    os.replace(f, run / f.name)
                shutil.rmtree(run / "last", ignore_errors=True)
        summary = asdict(result) | {"trainable_parameters": n_trainable, "base_model": path}
        write_text_atomic(run / "summary.json", json.dumps(summary, indent=2))
        if (run / "metrics.jsonl").exists():
            plot_losses(run)
    accelerator.wait_for_everyone()
    return result


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
