"""Memory planning: before the first training step on a GPU, say what the run will need at its peak and stop
with the setting to lower if that does not fit, instead of running out of memory at step N.

The peak is measured, not guessed: one forward and backward pass of the widest micro-batch the config allows
(train.batch_size rows of data.max_length tokens; with train.packing every micro-batch is that, its rows packed)
on the real model, plus the optimizer state the first update allocates (AdamW: two fp32 moments per trainable
weight; 8-bit AdamW: two bytes). Random state is restored after it and the gradients are dropped, so the run
itself is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import Phi2sumError

OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}  # per trainable weight
HEADROOM = 0.95  # the allocator's fragmentation and the CUDA context take the rest
OTHERS_MIN_GIB = 2.0  # less than this in use outside our allocator is our own CUDA context and libraries


@dataclass
class Plan:
    measured_gib: float  # peak allocated over a forward and backward of the widest micro-batch
    optimizer_gib: float
    card_gib: float
    rows: int
    width: int
    others_gib: float = 0.0  # held by other processes on the card when the run started

    @property
    def peak_gib(self) -> float:
        return self.measured_gib + self.optimizer_gib

    @property
    def fits(self) -> bool:
        return self.peak_gib <= HEADROOM * self.card_gib - self.others_gib

    def card(self) -> str:
        shared = f", {self.others_gib:.1f} GiB of it held by other processes" if self.others_gib else ""
        return f"the card's {self.card_gib:.1f} GiB{shared}"

    def describe(self) -> str:
        return (f"expected peak {self.peak_gib:.1f} GiB of {self.card()} (a micro-batch of "
                f"{self.rows} x {self.width} tokens, the widest the config allows, measured: {self.measured_gib:.1f} "
                f"GiB; optimizer state {self.optimizer_gib:.1f} GiB)")


def advice(plan: Plan, t, gradient_checkpointing: bool) -> str:
    """What to lower, in the order that costs the least."""
    fixes = [f"free the {plan.others_gib:.1f} GiB other processes hold on the card"] if plan.others_gib else []
    if t.batch_size > 1:
        fixes.append(f"lower train.batch_size {t.batch_size} -> {max(1, t.batch_size // 2)} with train.grad_accum "
                     f"{t.grad_accum} -> {t.grad_accum * 2} (same global batch)")
    if not gradient_checkpointing:
        fixes.append("set train.gradient_checkpointing: true")
    fixes.append(f"lower data.max_length below {plan.width}")
    return "; or ".join(fixes)


def optimizer_gib(trainable: int, optimizer: str) -> float:
    return trainable * OPTIMIZER_BYTES[optimizer] / 2**30


def summary_tokens_per_row(rows: list[tuple[list[int], int]], width: int, packing: bool) -> int:
    """The most summary tokens one micro-batch row can hold, from the training rows ((ids, prompt length)): a row's
    longest summary, or packed, the row width times the largest summary share of any dialogue. The loss runs
    the output head on exactly these positions, so with a large vocabulary (Gemma's 262,144) they set much of
    the peak: assuming half of every row (a 1,024-token row's 512) doubled Gemma 3 270M's expected peak."""
    lengths = [(len(ids), len(ids) - plen) for ids, plen in rows if len(ids) > plen]
    if not lengths:
        return 1
    if packing:
        return max(1, min(width - 1, math.ceil(width * max(s / n for n, s in lengths))))
    return max(1, min(width - 1, max(s for _, s in lengths)))


def plan(loss_model, accelerator, pad_id: int, cfg, trainable: int, summary_tokens: int) -> Plan:
    """Measure the widest micro-batch on the GPU (see the module docstring), with `summary_tokens` label positions
    per row (summary_tokens_per_row). Raises Phi2sumError, naming the setting to lower, when it runs out of memory
    or the expected peak does not fit."""
    t, device = cfg.train, accelerator.device
    rows, width = t.batch_size, cfg.data.max_length
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)  # memory does not depend on the ids
    labels = ids.clone()
    labels[:, : width - summary_tokens] = -100  # the loss reads only the summary tokens, as in training
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if t.packing:  # packed rows: the attention goes through the block-diagonal mask, as in training
        batch["position_ids"] = torch.arange(width, device=device).remainder(max(1, width // 4)).expand(rows, -1)
    card = torch.cuda.get_device_properties(device).total_memory / 2**30
    # Another job on the same card (a second training, a notebook's kernel) leaves this run less than the card:
    # what is in use beyond this process's own allocator and context.
    free, total = torch.cuda.mem_get_info(device)
    others = (total - free - torch.cuda.memory_reserved(device)) / 2**30
    # Several processes: NCCL's buffers are this run's own memory outside the allocator; not counted.
    others = others if others >= OTHERS_MIN_GIB and accelerator.num_processes == 1 else 0.0
    torch.cuda.reset_peak_memory_stats(device)
    oom = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            with accelerator.autocast():
                loss = loss_model(**batch)
            loss.backward()
        except torch.OutOfMemoryError:
            oom = True
    measured = torch.cuda.max_memory_allocated(device) / 2**30
    for p in loss_model.parameters():
        p.grad = None
    del batch, ids, labels
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    result = Plan(measured if not oom else card, optimizer_gib(trainable, t.optimizer), card, rows, width, others)
    if oom or not result.fits:
        shared = f" ({others:.1f} GiB of it held by other processes)" if others else ""
        what = ("ran out of memory on" if oom else f"needs about {result.peak_gib:.1f} GiB for") + \
            f" a micro-batch of {rows} x {width} tokens, the widest the config allows, on a {card:.1f} GiB card{shared}"
        raise Phi2sumError(f"this config {what}: {advice(result, t, t.gradient_checkpointing)}")
    return result
