"""Memory planning before the first step (phi2sum/memory.py), on CPU: the GPU's memory counters are replaced by
numbers the test chooses, everything else (the model, the widest batch, forward and backward) is real."""

from __future__ import annotations

import pytest
import torch

from phi2sum import memory, modeling
from phi2sum.batches import SummaryLoss
from phi2sum.config import Phi2sumError, RunConfig


class FakeCard:
    """torch.cuda's memory counters for a card of `total` GiB whose measured peak is `peak` GiB, with `others` GiB
    held by other processes (and 0.5 GiB by this process's CUDA context)."""

    def __init__(self, monkeypatch, total: float, peak: float, others: float = 0.0):
        props = type("Props", (), {"total_memory": int(total * 2**30)})()
        free = int((total - others - 0.5) * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, int(total * 2**30)))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(peak * 2**30))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.fixture
def setup(tiny_model):
    from accelerate import Accelerator

    cfg = RunConfig.model_validate({"model": {"name": str(tiny_model), "quantization": "none"},
                                    "lora": {"r": 4, "dropout": 0.1},
                                    "data": {"max_length": 64},
                                    "train": {"device": "cpu", "batch_size": 4, "grad_accum": 2,
                                              "gradient_checkpointing": False}})
    hw = modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")
    model = modeling.add_lora(modeling.load_base(cfg.model, hw, str(tiny_model), quantize=False), cfg.lora,
                              cfg.train, False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return cfg, SummaryLoss(model), Accelerator(cpu=True), trainable


def test_a_config_that_fits_prints_its_peak_and_leaves_the_run_unchanged(setup, monkeypatch):
    cfg, loss_model, accelerator, trainable = setup
    FakeCard(monkeypatch, total=16, peak=9.0)
    rng = torch.get_rng_state()
    plan = memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)
    assert plan.fits and (plan.rows, plan.width) == (4, 64)
    assert plan.peak_gib == pytest.approx(9.0 + trainable * 8 / 2**30)  # AdamW: two fp32 moments
    assert "expected peak 9.0 GiB of the card's 16.0 GiB" in plan.describe()
    assert torch.equal(torch.get_rng_state(), rng)  # LoRA dropout drew random numbers: restored
    assert all(p.grad is None for p in loss_model.parameters())  # the probe's gradients are gone


def test_a_config_that_will_not_fit_stops_naming_what_to_lower(setup, monkeypatch):
    cfg, loss_model, accelerator, trainable = setup
    FakeCard(monkeypatch, total=16, peak=15.5)
    with pytest.raises(Phi2sumError) as err:
        memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)
    msg = str(err.value)
    assert "needs about 15.5 GiB for a micro-batch of 4 x 64 tokens" in msg and "16.0 GiB card" in msg
    assert "train.batch_size 4 -> 2 with train.grad_accum 2 -> 4" in msg
    assert "train.gradient_checkpointing: true" in msg and "data.max_length below 64" in msg


def test_running_out_of_memory_on_the_widest_batch_is_the_same_clear_stop(setup, monkeypatch):
    cfg, loss_model, accelerator, trainable = setup
    FakeCard(monkeypatch, total=16, peak=1.0)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SummaryLoss, "forward", oom)
    with pytest.raises(Phi2sumError, match="ran out of memory on a micro-batch of 4 x 64 tokens"):
        memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)


def test_memory_other_processes_hold_is_counted_and_named(setup, monkeypatch):
    """A second job on the card: the same config that fits an empty card stops, saying who holds the memory."""
    cfg, loss_model, accelerator, trainable = setup
    FakeCard(monkeypatch, total=16, peak=9.0, others=0.9)  # a context-sized remainder is not another job
    assert memory.plan(loss_model, accelerator, 0, cfg, trainable, 16).others_gib == 0
    FakeCard(monkeypatch, total=16, peak=9.0, others=7.5)  # + our 0.5 GiB context: 8.0 in use
    with pytest.raises(Phi2sumError) as err:
        memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)
    msg = str(err.value)
    assert "16.0 GiB card (8.0 GiB of it held by other processes)" in msg
    assert ": free the 8.0 GiB other processes hold on the card; or lower train.batch_size 4 -> 2" in msg


def test_packed_rows_are_measured_packed(setup, monkeypatch):
    """train.packing: every micro-batch is batch_size x data.max_length; the probe packs its rows as training does, so
    attention goes through the same block-diagonal mask (another kernel, other memory than the plain causal one)."""
    from transformers.masking_utils import find_packed_sequence_indices

    cfg, loss_model, accelerator, trainable = setup
    cfg.train.packing = True
    FakeCard(monkeypatch, total=16, peak=9.0)
    seen = []
    real_forward = SummaryLoss.forward

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        seen.append(position_ids)
        return real_forward(self, input_ids, attention_mask, labels, position_ids)

    monkeypatch.setattr(SummaryLoss, "forward", forward)
    plan = memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)
    assert plan.fits and (plan.rows, plan.width) == (4, 64)
    [positions] = seen
    assert positions.shape == (4, 64)
    assert find_packed_sequence_indices(positions).tolist() == [[k // 16 for k in range(64)]] * 4


def test_the_probe_reads_as_many_summary_tokens_as_the_data_can_put_in_a_row(setup, monkeypatch):
    """The output head runs on summary positions only, so the probe's label count is what the data allows: a
    row's longest summary, or packed, the row width times the largest summary share."""
    cfg, loss_model, accelerator, trainable = setup
    rows = [([1] * 40, 30), ([1] * 20, 4), ([1] * 10, 9)]  # summaries of 10, 16 and 1 tokens; shares .25, .8, .1
    assert memory.summary_tokens_per_row(rows, 64, packing=False) == 16
    assert memory.summary_tokens_per_row(rows, 64, packing=True) == 52  # ceil(64 * 0.8)
    assert memory.summary_tokens_per_row([([1] * 99, 0)], 64, packing=False) == 63  # never the whole row
    FakeCard(monkeypatch, total=16, peak=9.0)
    seen = []
    real_forward = SummaryLoss.forward

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        seen.append(int((labels != -100).sum()))
        return real_forward(self, input_ids, attention_mask, labels, position_ids)

    monkeypatch.setattr(SummaryLoss, "forward", forward)
    memory.plan(loss_model, accelerator, 0, cfg, trainable, 16)
    assert seen == [4 * 16]


def test_8bit_optimizers_count_two_bytes_a_weight():
    assert memory.optimizer_gib(2**30, "adamw") == 8 and memory.optimizer_gib(2**30, "paged_adamw_8bit") == 2
