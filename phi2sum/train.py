"""Training: quantized base + LoRA, one readable loop, checkpoints that survive Ctrl-C, SIGTERM and SIGKILL.

    phi2sum train --config configs/p100.yaml            (one GPU or CPU)
    accelerate launch -m phi2sum train --config ...     (several GPUs, DDP)

The step, top to bottom (`train`): fetch this step's micro-batches, forward (loss on summary tokens only),
scaled backward, unscale + clip, optimizer step (skipped when the loss or gradients are not finite), learning
rate, log, validate, checkpoint. Everything a run produces lands in `train.output_dir` (runs.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, hubsync, memory, modeling, runs, trackers
from . import data as data_mod
from .batches import (SummaryLoss, collate, collate_packed, epoch_batches, epoch_packs, evaluate_loss,
                      packed_micro_batches, uses_padding_mask)
from .checkpoint import TrainState
from .config import ConfigError, Phi2sumError, RunConfig
from .console import info, progress, warn
from .runs import TrainResult


def lr_at(step: int, total: int, peak: float, warmup: int, kind: str) -> float:
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant":
        return peak
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return peak * (1.0 - progress_)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress_))


# ----------------------------------------------------------------------------------------------------
# Setup: everything the loop needs, built once


@dataclass
class Setup:
    cfg: RunConfig
    run: Path
    accelerator: object
    hw: modeling.Hardware
    precision: str
    tokenizer: object
    train_rows: list
    val_rows: list
    lengths: np.ndarray
    loss_model: nn.Module
    optimizer: object
    trainable: list
    n_trainable: int
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    base: str
    resumed_from: Path | None
    report: dict
    lock: object = None
    uploader: hubsync.Uploader | None = None  # train.hub_checkpoints, main process only
    expected_peak_gib: float | None = None  # the memory check's estimate, kept to set beside the measured peak


def setup(cfg: RunConfig, overwrite: bool, resume: bool) -> Setup:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t = cfg.train
    cuda = torch.cuda.is_available()
    problems = cfg.problems(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())
    if problems:
        raise ConfigError("\n".join(problems))
    hw = modeling.pick_hardware(t.device, t.precision)
    mixed = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(hw.dtype, "no")
    trackers.check(t.report_to)
    hub_token = hubsync.token(t) if t.hub_checkpoints else None
    # accelerate keeps one process-wide state; a second train() in the same process (a notebook, a
    # benchmark) with another precision would be refused. The distributed part of the state stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed, cpu=hw.device.type == "cpu", log_with=t.report_to or None,
                              project_dir=str(Path(t.output_dir) / trackers.FOLDER))
    main = accelerator.is_main_process
    run = Path(t.output_dir)
    resume = resume or t.resume == "auto"
    lock = None
    if main:
        runs.check_for_train(run, overwrite, resume)
        try:
            run.mkdir(parents=True, exist_ok=True)
            lock = runs.lock(run)
        except OSError as e:
            raise ConfigError(f"cannot write to train.output_dir {run} ({e.strerror}); set it to a folder "
                              "you can write to") from None
    accelerator.wait_for_everyone()
    try:
        return _build(cfg, accelerator, hw, mixed, run, resume, lock, hub_token)
    except BaseException:  # the folder is free again for the next try, in this process or another
        if lock is not None:
            lock.close()
        raise


def _build(cfg: RunConfig, accelerator, hw, mixed: str, run: Path, resume: bool, lock, hub_token) -> Setup:
    """setup() once the run folder is checked and locked: data, model, optimizer, resumed state."""
    from accelerate.utils import set_seed

    t, main, world = cfg.train, accelerator.is_main_process, accelerator.num_processes
    if resume and (run / runs.CONFIG).is_file():
        runs.check_same_setup(run / runs.CONFIG, cfg)
    set_seed(t.seed)
    with accelerator.main_process_first():  # one process converts/tokenizes, the others read its caches
        base = modeling.base_path(cfg.model)
        tokenizer = modeling.load_tokenizer(cfg.model, base)
        prepared = data_mod.prepare(cfg.data, tokenizer, progress=info if main else None)
    if main:
        info(f"data: {prepared.report['splits'][cfg.data.train_split]['rows_kept']} train rows "
             f"({'cached' if prepared.cached else 'prepared'} in {prepared.path})")
    train_ds, val_ds = prepared.splits[cfg.data.train_split], prepared.splits[cfg.data.validation_split]
    train_rows = list(zip(train_ds["input_ids"], train_ds["prompt_length"]))
    val_rows = list(zip(val_ds["input_ids"], val_ds["prompt_length"]))[: t.eval_max_rows]

    quantized = cfg.model.quantization != "none" and cfg.lora.enabled
    model = modeling.load_base(cfg.model, modeling.Hardware(accelerator.device, hw.dtype, hw.name), base,
                               quantize=quantized)
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
    optimizer = modeling.make_optimizer(trainable, t, accelerator.device.type)
    loss_model = SummaryLoss(model, uses_padding_mask(cfg), t.label_smoothing, t.neftune_alpha)
    if cfg.model.trust_remote_code and not t.padding_mask and main:
        info("model.trust_remote_code: training passes the padding mask (train.padding_mask is for known-causal models)")
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    state = TrainState(micro_per_step=t.grad_accum * world, batch_size=t.batch_size, packing=t.packing)
    if resume and hub_token:  # a fresh machine: the newest valid checkpoint comes back from the Hub
        if main:
            hubsync.pull(t, run, hub_token)
        accelerator.wait_for_everyone()
    ckpt = checkpoint.latest(run) if resume else None
    if ckpt is not None:
        state = checkpoint.load(ckpt, accelerator.unwrap_model(loss_model).model, optimizer, accelerator.scaler,
                                state)
        state.micro_per_step = checkpoint.resumed_micro_per_step(state, t, world, main)
        t = t.model_copy(update={"grad_accum": state.micro_per_step // world})  # what the run does from here on
        cfg = cfg.model_copy(update={"train": t})
    elif resume and main and (run / runs.CHECKPOINTS).exists():
        warn(f"no usable checkpoint in {run}/checkpoints; starting from step 0")
    lengths = np.array([len(ids) for ids, _ in train_rows])
    if t.packing:
        micro_batches = packed_micro_batches(lengths, t.batch_size, cfg.data.max_length)
    else:
        micro_batches = math.ceil(len(train_rows) / t.batch_size)
    steps_per_epoch = micro_batches // state.micro_per_step
    if steps_per_epoch == 0:
        what = f"packed rows of {cfg.data.max_length} tokens" if t.packing else "rows"
        raise ConfigError(f"{len(train_rows)} training rows ({int(lengths.sum())} tokens) make less than one optimizer "
                          f"step of {t.batch_size} x {state.micro_per_step // world} x {world} {what}; lower "
                          "batch_size or grad_accum")
    total_steps = t.max_steps or max(1, int(round(t.epochs * steps_per_epoch)))
    return Setup(cfg, run, accelerator, hw, mixed if mixed != "no" else "fp32", tokenizer, train_rows, val_rows,
                 lengths, loss_model, optimizer, trainable,
                 sum(p.numel() for p in trainable), state, total_steps, steps_per_epoch, base, ckpt,
                 prepared.report, lock, hubsync.Uploader(t.hub_checkpoints, hubsync.branch(t), hub_token, run,
                                                         t.keep_checkpoints) if hub_token and main else None)


def _start_writing(s: Setup, overwrite: bool, report: dict) -> None:
    """The run's first writes, once every input has loaded: only now may --overwrite delete the old run."""
    run, cfg, t = s.run, s.cfg, s.cfg.train
    if overwrite:
        runs.clear_run(run)
    if s.state.step:
        info(f"resuming from {s.resumed_from} (step {s.state.step} of {s.total_steps})")
    runs.save_config(cfg, run / runs.CONFIG)
    metrics = run / runs.METRICS
    if metrics.exists():  # drop lines logged after the checkpoint we resumed from
        keep = [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= s.state.step]
        runs.write_text_atomic(metrics, "".join(k + "\n" for k in keep))  # a kill here must not lose the log
    runs.write_text_atomic(run / "prepare_report.json", json.dumps(report, indent=2))
    quantized = cfg.model.quantization if cfg.model.quantization != "none" and cfg.lora.enabled else "no quantization"
    rows, width = t.batch_size * s.state.micro_per_step, cfg.data.max_length
    # A packed row holds several dialogues: say about how many a step takes, to compare with an unpacked config.
    per_step = (f"{rows} packed rows of {width} tokens (about {rows * width / s.lengths.mean():.0f} dialogues)"
                if t.packing else f"{rows} rows")
    info(f"model: {s.base} | {s.hw.name} {s.precision} | {quantized} | trainable {s.n_trainable / 1e6:.2f}M "
         f"| {s.total_steps} steps x {per_step}")


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, overwrite: bool = False, resume: bool = False, on_step=None) -> TrainResult:
    """`phi2sum train`. `on_step(state)`, if given, is called after every optimizer step on every process
    (benchmarks and tests hook in here)."""
    s = setup(cfg, overwrite, resume)
    try:
        return loop(s, overwrite, on_step)
    finally:  # the lock goes with the run, however it ends
        if s.lock is not None:
            s.lock.close()


def loop(s: Setup, overwrite: bool = False, on_step=None) -> TrainResult:
    """The training loop over a set-up run, from its current step to the end (or a stop); `overwrite`: clear
    the old run's files first."""
    accelerator, state, t, run = s.accelerator, s.state, s.cfg.train, s.run
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    done = runs.finished_result(run, state.step, s.total_steps) if s.resumed_from is not None else None
    if done is not None:
        if main:
            info(f"{run} is already finished ({done.stopped}, {state.step} of {s.total_steps} steps); "
                 "nothing to resume, nothing changed")
        return done
    if device.type == "cuda" and t.memory_check:  # before the first write: a config that cannot fit changes nothing
        summary = memory.summary_tokens_per_row(s.train_rows, s.cfg.data.max_length, t.packing)
        planned = memory.plan(s.loss_model, accelerator, s.tokenizer.pad_token_id, s.cfg, s.n_trainable, summary)
        s.expected_peak_gib = planned.peak_gib
        if main:
            info(planned.describe())
    if main:
        _start_writing(s, overwrite, s.report)
    trackers.start(accelerator, s.cfg, run, state.step)

    def log(row: dict) -> None:
        if main:
            with open(run / runs.METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            accelerator.log(trackers.scalars(row), step=row["step"])

    # One padding rule for training and validation batches; packed training rows are data.max_length wide.
    batch_of = functools.partial(collate, pad_id=s.tokenizer.pad_token_id, multiple=t.pad_to_multiple_of,
                                 cap=s.cfg.data.max_length)
    width = s.cfg.data.max_length

    def micro_batch(b) -> dict:
        if t.packing:
            return collate_packed([[s.train_rows[i] for i in row] for row in b], s.tokenizer.pad_token_id, width)
        return batch_of([s.train_rows[i] for i in b])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bad_streak, stopped, last_loss = 0, "finished", None
    batches, batches_epoch = None, None
    s.loss_model.train()
    bar = progress() if main else None
    started = time.perf_counter() - state.seconds
    window_tokens, window_start = 0, time.perf_counter()
    with checkpoint.StopRequests() as stop, (bar or contextlib.nullcontext()):
        task = bar.add_task("train", total=s.total_steps, completed=state.step, stats="") if bar else None
        while state.step < s.total_steps:
            epoch, within = divmod(state.step, s.steps_per_epoch)
            if epoch != batches_epoch:  # the order is a function of the epoch: build it once per epoch
                batches = (epoch_packs(s.lengths, t.batch_size, width, t.seed, epoch) if t.packing else
                           epoch_batches(s.lengths, t.batch_size, t.seed, epoch, t.group_by_length))
                batches_epoch = epoch
            group = batches[within * state.micro_per_step : (within + 1) * state.micro_per_step]
            micro = [micro_batch(b) for b in group[accelerator.process_index :: world]]
            loss = forward_backward(s, micro)
            lr = lr_at(state.step, s.total_steps, t.learning_rate, t.warmup_steps, t.scheduler)
            for g in s.optimizer.param_groups:
                g["lr"] = lr
            grad_norm = accelerator.clip_grad_norm_(s.trainable, t.max_grad_norm)
            loss_value, norm_value = torch.stack([loss, grad_norm.float()]).tolist()  # one host sync per step
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite or accelerator.scaler is not None:  # fp16: the scaler skips a non-finite update, lowers its scale
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            state.step += 1  # a skipped update still moves on: the next step takes the next batches
            if finite:
                bad_streak, last_loss = 0, loss_value
            else:
                log({"kind": "skipped", "step": state.step, "loss": loss_value, "grad_norm": norm_value})
                bad_streak = skipped(s, loss_value, norm_value, bad_streak)
            real = sum(int(m["attention_mask"].sum()) for m in micro)
            real = int(accelerator.reduce(torch.tensor(real, device=device), "sum").item()) if world > 1 else real
            state.real_tokens += real
            window_tokens += real
            if finite and (state.step % t.log_every == 0 or state.step == s.total_steps):
                now = time.perf_counter()
                tps, window_tokens, window_start = window_tokens / max(now - window_start, 1e-9), 0, now
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                log({"kind": "train", "step": state.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                     "tokens_per_second": tps, "peak_memory_gib": mem})
                if bar:
                    bar.update(task, stats=f"loss {loss_value:.3f} lr {lr:.2e} {tps:,.0f} tok/s"
                               + (f" {mem:.1f} GiB" if mem else ""))
            if bar:
                bar.update(task, completed=state.step)
            if (t.eval_every and state.step % t.eval_every == 0) or state.step == s.total_steps:
                if validate(s, batch_of, log, bar) and t.early_stopping_patience \
                        and state.bad_evals >= t.early_stopping_patience:
                    stopped = "early_stopping"
            state.seconds = time.perf_counter() - started
            if on_step is not None:
                on_step(state)
            requested = stop.requested
            if world > 1:  # all processes must agree to stop at the same step
                flag = accelerator.reduce(torch.tensor(int(bool(requested)), device=device), "sum").item()
                requested = requested or ("signal" if flag else None)
            last = state.step == s.total_steps  # checkpointed too: a --resume of the finished run has nothing to do
            if state.step % t.save_every == 0 or last or requested or stopped != "finished":
                save_checkpoint(s)
            if requested:
                stopped = "interrupted"
            if stopped != "finished":
                break
    return finish(s, stopped, last_loss, time.perf_counter() - started)


def forward_backward(s: Setup, micro: list[dict]) -> torch.Tensor:
    """Loss and gradients of one optimizer step's micro-batches; returns the step's mean loss (on the device).
    The loss is normalised by the step's summary tokens over all micro-batches and processes, so the gradient
    is the same whatever the batch split (DDP averages, hence the * world)."""
    accelerator, device, world = s.accelerator, s.accelerator.device, s.accelerator.num_processes
    local_tokens = torch.tensor(sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro), device=device)
    global_tokens = accelerator.reduce(local_tokens.clone(), "sum").clamp(min=1)
    step_loss = torch.zeros((), device=device)
    for j, m in enumerate(micro):
        m = {k: v.to(device, non_blocking=True) for k, v in m.items()}
        sync = j == len(micro) - 1
        try:
            with (contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(s.loss_model)), \
                    accelerator.autocast():
                loss = s.loss_model(**m) * world / global_tokens
            accelerator.backward(loss)
        except torch.OutOfMemoryError:
            rows, width = m["input_ids"].shape
            raise Phi2sumError(
                f"out of GPU memory at step {s.state.step + 1} (a micro-batch of {rows} rows x {width} tokens): "
                f"lower train.batch_size (raise train.grad_accum to keep the global batch), lower "
                f"data.max_length, or set train.gradient_checkpointing: true. Last checkpoint: "
                f"{checkpoint.latest(s.run) or 'none'}") from None
        step_loss += loss.detach()
    return accelerator.reduce(step_loss, "sum") / world


def skipped(s: Setup, loss: float, grad_norm: float, streak: int) -> int:
    """Count a step whose update was skipped; returns the run of bad steps, and stops the run at
    train.max_bad_steps. An fp16 overflow (finite loss, the scaler above 1) is the scaler's routine, not a bad step."""
    s.state.skipped_steps += 1
    scaler = s.accelerator.scaler
    if scaler is not None and math.isfinite(loss) and scaler.get_scale() >= 1.0:
        return streak
    streak += 1
    if s.accelerator.is_main_process:
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        warn(f"step {s.state.step}: {what} is {value}; update skipped ({streak}/{s.cfg.train.max_bad_steps} in a row)")
    if streak >= s.cfg.train.max_bad_steps:
        raise _diverged(s, streak, math.isfinite(loss))
    return streak


def _diverged(s: Setup, streak: int, loss_finite: bool) -> Phi2sumError:
    last = checkpoint.latest(s.run) if s.accelerator.is_main_process else None
    what = "the gradients were NaN/inf (the loss looked finite)" if loss_finite else "the loss was NaN/inf"
    return Phi2sumError(
        f"{what} for {streak} steps in a row (up to step {s.state.step}); training stopped. Last good checkpoint: "
        f"{last or 'none'}. Lower train.learning_rate"
        + (f", set train.precision: {'bf16' if s.precision == 'fp16' else 'fp32'} (an overflow in {s.precision}?)"
           if s.precision != "fp32" else "") + ", or try model.attn_implementation: eager")


def validate(s: Setup, batch_of, log, bar) -> bool:
    """Validation loss, keep-best; returns True when it did not improve on the best so far."""
    state, t = s.state, s.cfg.train
    eval_loss = evaluate_loss(s.loss_model, s.val_rows, t.batch_size, batch_of, s.accelerator.device, s.accelerator)
    log({"kind": "eval", "step": state.step, "eval_loss": eval_loss})
    if bar:
        bar.console.print(f"step {state.step}: validation loss {eval_loss:.4f}")
    state.final_eval_loss = eval_loss
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.bad_evals = eval_loss, state.step, 0
        if t.keep_best:
            save_adapter(s, s.run / "best")
        return False
    state.bad_evals += 1
    return True


def save_checkpoint(s: Setup) -> None:
    s.accelerator.wait_for_everyone()
    if s.accelerator.is_main_process:
        saved = checkpoint.save(s.run, s.state, s.accelerator.unwrap_model(s.loss_model).model, s.optimizer,
                                s.accelerator.scaler, s.cfg.train.keep_checkpoints)
        if s.uploader is not None:
            s.uploader.submit(saved)  # returns at once; the upload runs in the background
    s.accelerator.wait_for_everyone()


def save_adapter(s: Setup, dest: Path) -> None:
    if s.accelerator.is_main_process:
        try:
            with runs.replacing_dir(dest) as tmp:
                s.accelerator.unwrap_model(s.loss_model).model.save_pretrained(str(tmp))
                s.tokenizer.save_pretrained(str(tmp))
        except Phi2sumError:
            raise
        except Exception as e:  # a full disk, most often (safetensors says so in its own error type)
            raise runs.write_error(e, f"the adapter to {dest}", "What was there is left as it was", dest.parent,
                                   sum(p.numel() * p.element_size() for p in s.trainable)) from e


def finish(s: Setup, stopped: str, last_loss: float | None, seconds: float) -> TrainResult:
    """Put the shipped adapter at the top of the run (best or last), write summary.json and the loss plot."""
    run, state, device = s.run, s.state, s.accelerator.device
    cuda = device.type == "cuda"
    result = TrainResult(
        run_dir=str(run), steps=state.step, total_steps=s.total_steps, real_tokens=state.real_tokens,
        seconds=seconds, tokens_per_second=state.real_tokens / max(seconds, 1e-9), train_loss=last_loss,
        best_eval_loss=state.best_eval_loss, best_step=state.best_step, final_eval_loss=state.final_eval_loss,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        device=s.hw.name, precision=s.precision, world_size=s.accelerator.num_processes, stopped=stopped,
        skipped_steps=state.skipped_steps, expected_peak_gib=s.expected_peak_gib)
    if s.accelerator.is_main_process:
        if stopped != "interrupted":
            source = run / "best" if s.cfg.train.keep_best and (run / "best").is_dir() else None
            if source is None:
                save_adapter(s, run / "last")
                source = run / "last"
            for f in source.iterdir():
                runs.copy_atomic(f, run / f.name)
            if source.name == "last":
                shutil.rmtree(source, ignore_errors=True)
        summary = asdict(result) | {"trainable_parameters": s.n_trainable, "base_model": s.base}
        runs.write_text_atomic(run / runs.SUMMARY, json.dumps(summary, indent=2))
        if (run / runs.METRICS).exists():
            runs.plot_losses(run)
    s.accelerator.wait_for_everyone()
    trackers.finish(s.accelerator)
    if s.uploader is not None:
        s.uploader.close()  # the last checkpoint reaches the Hub before train() returns (bounded wait)
    return result
