"""Training batches and their loss: each epoch's order (length-grouped, a pure function of seed and epoch, so a
resumed run sees the same batches), right-padded collation or rows of packed dialogues (train.packing), and
cross-entropy on the summary tokens only.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch
from torch import nn

from . import modeling
from .config import RunConfig


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

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        causal_lm = modeling.unwrap_peft(self.model)
        # collate pads on the right, so under a causal mask no real token sees a pad: the padding mask
        # changes nothing the loss reads (train.padding_mask), and without one SDPA takes its causal kernels.
        # Packed rows (position_ids given) never get it: a 2D mask would turn off transformers' packed-sequence
        # detection, which builds the block-diagonal causal mask from the restarting position ids.
        mask = attention_mask if self.padding_mask and position_ids is None else None
        window = modeling.sliding_window(causal_lm) if mask is not None else None
        if window:
            # Under a sliding window, a pad query a full window past its row's last real token sees no key at all.
            # SDPA's cuDNN backend (bf16, H100/H200) turns such fully masked rows into NaN gradients while the loss
            # stays finite. Let those pads see themselves: no real token can reach them (they lie after
            # it and over a window away), so the loss and its gradients are unchanged.
            last = attention_mask.sum(1, keepdim=True) - 1
            far = torch.arange(mask.shape[1], device=mask.device) >= last + window
            mask = mask.masked_fill(far, 1)
        inputs = {"input_ids": input_ids}
        if self.training and self.neftune_alpha > 0:
            embeds = causal_lm.get_input_embeddings()(input_ids)
            # Noise per sequence scaled by its own length (pads excluded), as the NEFTune paper's L.
            lengths = sequence_lengths(attention_mask, position_ids)
            scale = self.neftune_alpha / (lengths * embeds.shape[-1]).clamp(min=1).sqrt()
            noise = torch.empty_like(embeds).uniform_(-1, 1) * scale[..., None].to(embeds.dtype)
            inputs = {"inputs_embeds": embeds + noise}
        if position_ids is not None:  # only when packed: some remote-code models take no position_ids at all
            inputs["position_ids"] = position_ids
        hidden = causal_lm.base_model(**inputs, attention_mask=mask, use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum",
                                           label_smoothing=self.label_smoothing if self.training else 0.0)


def sequence_lengths(attention_mask, position_ids=None):
    """Real tokens of the sequence each token belongs to: (rows, 1) for padded rows, (rows, width) for packed ones,
    where a sequence starts wherever its position id is 0 (the pads after the last dialogue count 0)."""
    if position_ids is None:
        return attention_mask.sum(1, keepdim=True)
    sequence = (position_ids == 0).long().cumsum(1) - 1
    per_sequence = torch.zeros_like(attention_mask).scatter_add_(1, sequence, attention_mask)
    return per_sequence.gather(1, sequence)


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
    # A padded row is a packed row of one dialogue; its position ids are left to the model (0 .. width - 1, the
    # same for its real tokens), so padded batches keep SDPA's causal kernels and the optional padding mask.
    batch = collate_packed([[row] for row in rows], pad_id, width)
    del batch["position_ids"]
    return batch


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


def collate_packed(rows: list[list[tuple[list[int], int]]], pad_id: int, width: int) -> dict:
    """train.packing's micro-batch: each row holds whole dialogues end to end, then pads, `width` wide. Position ids
    restart at 0 for each dialogue and for the pads after the last one; with no attention mask, transformers reads
    those restarts as sequence boundaries and keeps attention inside each dialogue (the pads form one more sequence,
    seen by no real token). A dialogue starts with prompt tokens, never labels, so the last token of the one before
    it predicts nothing. attention_mask marks real tokens, for counting; the model never sees it."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ids, plen in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            position_ids[r, start:end] = torch.arange(len(ids))
            attention[r, start:end] = 1
            labels[r, start + plen : end] = torch.tensor(ids[plen:])
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "position_ids": position_ids}


def epoch_packs(lengths: np.ndarray, rows: int, width: int, seed: int, epoch: int) -> list[list[np.ndarray]]:
    """train.packing's micro-batches of one epoch, a pure function of (seed, epoch) as epoch_batches: each is
    `rows` rows (arrays of dialogue indices) of at most `width` tokens. The epoch's dialogues, longest first (ties in
    a shuffled order), each go into the fullest row they still fit (best-fit decreasing: rows come out nearly full),
    then the rows are shuffled and cut into micro-batches; rows left over past the last whole micro-batch wait for
    another epoch's shuffle."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    packed: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), ascending
    for i in order:
        k = bisect.bisect_left(free, (int(lengths[i]), -1))
        if k == len(free):
            packed.append([])
            left, row = width, len(packed) - 1
        else:
            left, row = free.pop(k)
        packed[row].append(int(i))
        bisect.insort(free, (left - int(lengths[i]), row))
    shuffled = [np.array(packed[j]) for j in rng.permutation(len(packed))]
    return [shuffled[k : k + rows] for k in range(0, len(shuffled) - rows + 1, rows)]


def packed_micro_batches(lengths: np.ndarray, rows: int, width: int) -> int:
    """Whole micro-batches every epoch's packing holds at least: no packing fits the tokens in fewer rows."""
    return math.ceil(int(lengths.sum()) / width) // rows


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
