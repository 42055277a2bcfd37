"""The pieces of a training step (phi2sum/batches.py, and train's learning-rate schedule), checked on their own:
each epoch's batches, the collated batch and its padding, and the loss on summary tokens (padding mask, label
smoothing, NEFTune). Where a setting only matters if train() passes it on, a short run checks that it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_causal_lm
from phi2sum import modeling
from phi2sum import train as train_mod
from phi2sum.batches import (SummaryLoss, collate, collate_packed, epoch_batches, epoch_packs, packed_micro_batches,
                              sequence_lengths)
from phi2sum.config import ConfigError, load_config
from phi2sum.train import lr_at, train

pytestmark = pytest.mark.usefixtures("one_thread")  # the short train() runs below (see conftest.ONE_THREAD)


def test_epoch_batches_cover_every_row_once_and_repeat_exactly():
    lengths = np.random.default_rng(0).integers(10, 400, size=203)
    for group in (False, True):
        batches = epoch_batches(lengths, 8, seed=3, epoch=0, group=group)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(203))
        assert [len(b) for b in batches].count(8) == 25 and sorted(len(b) for b in batches)[0] == 3
        again = epoch_batches(lengths, 8, seed=3, epoch=0, group=group)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        other = epoch_batches(lengths, 8, seed=3, epoch=1, group=group)
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other))

    # Grouping puts similar lengths together: much less padding than a random split.
    def padding(bs):
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in bs)

    assert padding(epoch_batches(lengths, 8, 3, 0, True)) < 0.5 * padding(epoch_batches(lengths, 8, 3, 0, False))


def test_lr_warms_up_then_decays():
    peak, warmup, total = 1e-3, 4, 20
    cosine = [lr_at(s, total, peak, warmup, "cosine") for s in range(total)]
    assert all(a < b for a, b in zip(cosine[:warmup + 1], cosine[1:warmup + 1]))  # rises during warm-up
    assert cosine[warmup] == pytest.approx(peak)
    assert all(a > b for a, b in zip(cosine[warmup:], cosine[warmup + 1:]))  # then falls
    assert cosine[warmup + (total - warmup) // 2] == pytest.approx(peak / 2)  # half way down at mid-point
    assert lr_at(total, total, peak, warmup, "cosine") == pytest.approx(0, abs=1e-12)
    assert lr_at(total, total, peak, warmup, "linear") == pytest.approx(0, abs=1e-12)
    assert lr_at(12, total, peak, warmup, "linear") == pytest.approx(peak / 2)
    assert lr_at(15, total, peak, warmup, "constant") == peak
    assert 0 < lr_at(0, total, peak, warmup, "cosine") < peak  # the first step never runs at lr 0


# ----------------------------------------------------------------------------------------------------
# Padding and the loss


def test_pad_to_multiple_changes_widths_not_the_loss_or_gradients(tiny_model):
    """train.pad_to_multiple_of rounds each micro-batch's width up; the extra columns are padding (masked, no
    labels), so the summed loss and every gradient match the unpadded batch."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(3)
    rows = [(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (11, 7, 9)]
    assert collate(rows, 0)["input_ids"].shape[1] == 11
    assert collate(rows, 0, 8)["input_ids"].shape[1] == 16 and collate(rows, 0, 11)["input_ids"].shape[1] == 11
    assert collate(rows, 0, 8, cap=12)["input_ids"].shape[1] == 12  # never past data.max_length...
    assert collate(rows, 0, 8, cap=10)["input_ids"].shape[1] == 11  # ...nor shorter than the longest row
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    out = []
    for multiple in (1, 16):
        model.zero_grad()
        batch = collate(rows, 0, multiple)
        assert int(batch["attention_mask"].sum()) == sum(len(ids) for ids, _ in rows)
        loss = SummaryLoss(model)(**batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_and_its_evaluations_pad_to_the_configured_multiple(make_config, monkeypatch):
    """train.pad_to_multiple_of reaches every batch the loop builds, training and validation alike."""
    widths = []
    real_collate = train_mod.collate

    def recording(*args, **kwargs):
        batch = real_collate(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(train_mod, "collate", recording)
    cfg = load_config(make_config(train={"pad_to_multiple_of": 64, "max_steps": 3, "eval_every": 3}))
    train(cfg, overwrite=True)
    assert len(widths) >= 3 * 2 + 2  # 3 steps x 2 micro-batches, then 8 validation rows in batches of 4
    assert all(w % 64 == 0 or w == cfg.data.max_length for w in widths)


@pytest.mark.parametrize("family", ["phi", "llama"])
def test_dropping_the_padding_mask_changes_neither_loss_nor_gradients(tiny_model, family):
    """train.padding_mask: false (the default) leaves the mask out of the model call. Rows are right-padded
    and attention is causal, so no real token attends to a pad: the summed loss and every gradient equal the
    masked call's, for Phi-2's family and Llama's (SmolLM2's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "phi":
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(4)
    batch = collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (13, 4, 9, 13)], 0, 8)
    assert batch["input_ids"].shape[1] == 16 and not batch["attention_mask"].all()  # padding is really there
    out = []
    for padding_mask in (True, False):
        model.zero_grad()
        loss = SummaryLoss(model, padding_mask)(**batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A left-padded row would see its pads without the mask: the same batch shifted right changes the loss,
    # so the equality above is not one the model would give whatever it was passed.
    shifted = {k: torch.roll(v, 3, dims=1) for k, v in batch.items()}
    with torch.no_grad():
        masked, unmasked = (SummaryLoss(model, flag)(**shifted) for flag in (True, False))
    assert not torch.allclose(masked, unmasked, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("setting,remote_code,want", [(None, False, False), (True, False, True), (None, True, True)])
def test_train_hands_the_padding_mask_setting_to_its_loss(make_config, monkeypatch, setting, remote_code, want):
    """The mask stays off unless asked for, or unless the model's code is the hub repo's (not known causal)."""
    seen = set()
    real_forward = train_mod.SummaryLoss.forward

    def forward(self, *args, **kwargs):
        seen.add(self.padding_mask)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    extra = {} if setting is None else {"padding_mask": setting}
    cfg = load_config(make_config(train={"max_steps": 1, "eval_every": 1, **extra}))
    cfg.model.trust_remote_code = remote_code
    train(cfg, overwrite=True)
    assert seen == {want}


def test_label_smoothing_and_neftune_change_the_training_loss_only(tiny_model):
    """train.label_smoothing: training loss is (1 - e) x CE + e x the mean -log p over the vocabulary, summed over
    summary tokens; train.neftune_alpha: training embeddings get uniform noise of size alpha / sqrt(L x d) per
    row. Validation loss (eval mode) is plain cross-entropy with both on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(2)
    batch = collate([(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (13, 7, 10)], 0)
    plain = SummaryLoss(model).train()
    with torch.no_grad():
        ce = plain(**batch)
        hidden = model.base_model(input_ids=batch["input_ids"])[0]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logp = model.get_output_embeddings()(hidden[:, :-1][keep]).float().log_softmax(-1)
        uniform = -logp.mean(-1).sum()
        smoothed = SummaryLoss(model, label_smoothing=0.1).train()
        torch.testing.assert_close(smoothed(**batch), 0.9 * ce + 0.1 * uniform, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(smoothed.eval()(**batch), ce)

        seen = []
        hook = model.base_model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("inputs_embeds")),
                                                          with_kwargs=True)
        noisy = SummaryLoss(model, neftune_alpha=5.0).train()
        torch.manual_seed(0)
        loss = noisy(**batch)
        torch.testing.assert_close(noisy.eval()(**batch), ce)
        hook.remove()
        assert seen[1] is None  # eval mode: token ids, no noise
        noise = seen[0] - model.get_input_embeddings()(batch["input_ids"])
        d = noise.shape[-1]
        for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            bound = 5.0 / (n * d) ** 0.5
            assert noise[row].abs().max() <= bound * (1 + 1e-5) and noise[row].abs().max() > 0.9 * bound
        assert not torch.isclose(loss, ce)


# ----------------------------------------------------------------------------------------------------
# Packing (train.packing)


def test_epoch_packs_fill_rows_with_whole_dialogues_and_repeat_exactly():
    lengths = np.random.default_rng(0).integers(20, 300, size=500)
    rows, width = 4, 512
    packs = epoch_packs(lengths, rows, width, seed=3, epoch=0)
    assert all(len(m) == rows for m in packs)  # one shape for every micro-batch
    assert all(lengths[r].sum() <= width for m in packs for r in m)
    seen = np.concatenate([r for m in packs for r in m])
    assert len(seen) == len(set(seen.tolist())) > 0.97 * len(lengths)  # each at most once; few wait for next epoch
    assert lengths[seen].sum() > 0.97 * len(packs) * rows * width  # rows come out nearly full
    again = epoch_packs(lengths, rows, width, seed=3, epoch=0)
    assert all(np.array_equal(a, b) for m, n in zip(packs, again) for a, b in zip(m, n))
    other = epoch_packs(lengths, rows, width, seed=3, epoch=1)
    assert not all(np.array_equal(a, b) for m, n in zip(packs, other) for a, b in zip(m, n))
    # The loop's steps per epoch count on this bound, whatever the epoch's shuffle.
    bound = packed_micro_batches(lengths, rows, width)
    assert all(len(epoch_packs(lengths, rows, width, seed, epoch)) >= bound for seed in (0, 1) for epoch in range(8))


def test_a_packed_row_restarts_positions_for_each_dialogue_and_labels_only_summaries():
    from transformers.masking_utils import find_packed_sequence_indices

    a, b, c = ([11, 12, 13, 14], 2), ([21, 22, 23], 1), ([31, 32, 33, 34, 35], 3)
    batch = collate_packed([[a, b], [c]], pad_id=0, width=9)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 0, 0], [31, 32, 33, 34, 35, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23, -100, -100],
                                        [-100, -100, -100, 34, 35, -100, -100, -100, -100]]
    assert batch["attention_mask"].sum().item() == 12  # real tokens, for the throughput count
    # transformers reads the restarts as sequences: each dialogue, and the pads after the last one.
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2],
                                                                            [0, 0, 0, 0, 0, 1, 1, 1, 1]]
    # NEFTune scales each dialogue's noise by its own length.
    assert sequence_lengths(batch["attention_mask"], batch["position_ids"]).tolist() == [
        [4, 4, 4, 4, 3, 3, 3, 0, 0], [5, 5, 5, 5, 5, 0, 0, 0, 0]]


@pytest.mark.parametrize("family", ["phi", "llama", "gemma3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_dialogues_unpacked(family, attention):
    """train.packing: the same dialogues packed two or three to a row give the summed loss and every gradient of
    the padded batch, through PEFT's wrapper, for Phi-2's family, Llama's (SmolLM2) and Gemma 3's, whose
    sliding-window layers (window 8, dialogues up to 30 tokens) must keep their window inside a packed dialogue too.
    Tolerance: fp32, and the two compute the same sums in other shapes and orders (padded rows and SDPA's causal
    kernel, packed rows and a block-diagonal mask), so they agree to rounding, about 1e-6 relative; the bounds are the
    padding tests' (1e-5 on the loss, 1e-4 relative on gradients), while attention across dialogues moves the loss by
    1e-3 or more (checked last, so the equality is not one any input would pass)."""
    from phi2sum.config import LoraSettings, TrainConfig

    lora = LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = modeling.add_lora(tiny_causal_lm(family), lora, TrainConfig(gradient_checkpointing=False), quantized=False)
    model.base_model.model.set_attn_implementation(attention)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter a say in the forward pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(4)
    d = [(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (30, 13, 22, 17, 7, 25, 9)]
    packed = collate_packed([[d[0], d[1]], [d[2], d[3], d[4]], [d[5], d[6]]], 0, 48)
    out = []
    for batch in (collate(d, 0), packed):
        model.zero_grad()
        loss = SummaryLoss(model).train()(**batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the same rows with positions that never restart: one sequence per row, attention across
        across = SummaryLoss(model)(**{**packed, "position_ids": torch.arange(48).expand(3, -1)})
        assert not torch.allclose(across, out[1][0], rtol=1e-4, atol=1e-4)
        if family == "gemma3":  # and the window matters: without it the padded loss is another
            model.base_model.model.config.sliding_window = 64
            assert not torch.allclose(SummaryLoss(model)(**collate(d, 0)), out[0][0], rtol=1e-4, atol=1e-4)


def test_train_packs_rows_counts_real_tokens_and_says_dialogues_per_step(make_config, monkeypatch, capsys):
    """With train.packing every training micro-batch is batch_size x data.max_length, each dialogue is trained on at
    most once per epoch, the position ids reach the model, the throughput count is the real (non-pad) tokens, and
    the run says about how many dialogues a step holds. Validation batches stay padded."""
    batches, positions = [], []
    real_collate_packed, real_forward = train_mod.collate_packed, train_mod.SummaryLoss.forward

    def recording(*args, **kwargs):
        batches.append(real_collate_packed(*args, **kwargs))
        return batches[-1]

    def forward(self, *args, position_ids=None, **kwargs):
        positions.append(position_ids is not None)
        return real_forward(self, *args, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(train_mod, "collate_packed", recording)
    monkeypatch.setattr(train_mod.SummaryLoss, "forward", forward)
    cfg = load_config(make_config(data={"max_length": 1024},
                                  train={"packing": True, "batch_size": 2, "max_steps": 3, "eval_every": 3}))
    result = train(cfg, overwrite=True)
    assert len(batches) == 3 * 2 and all(b["input_ids"].shape == (2, 1024) for b in batches)
    assert positions == [True] * 6 + [False] * 4  # 3 steps x 2 micro-batches, then 8 validation rows, 2 a batch
    dialogues = []
    for b in batches:
        for ids, pos, real in zip(b["input_ids"], b["position_ids"], b["attention_mask"]):
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # the dialogues, then only pads
            starts = (pos[:n] == 0).nonzero().flatten().tolist() + [n]
            dialogues += [tuple(ids[a:z].tolist()) for a, z in zip(starts, starts[1:])]
    assert len(dialogues) == len(set(dialogues)) > 2 * len(batches)  # each once, more than two to a row
    assert result.real_tokens == sum(len(d) for d in dialogues)
    said = " ".join(capsys.readouterr().err.split())
    assert "3 steps x 4 packed rows of 1024 tokens (about 11 dialogues)" in said, said


def test_too_little_data_for_one_packed_step_says_so(make_config):
    cfg = load_config(make_config(data={"max_length": 1024}, train={"packing": True, "batch_size": 16}))
    with pytest.raises(ConfigError, match=r"47 training rows \(\d+ tokens\) make less than one optimizer step of "
                                          r"16 x 2 x 1 packed rows of 1024 tokens; lower batch_size or grad_accum"):
        train(cfg, overwrite=True)


def test_unpacked_batches_pass_no_position_ids_to_models_that_take_none():
    """Some remote-code models' forward has no position_ids (nor **kwargs): unpacked training must not pass one."""
    from torch import nn

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)

        def forward(self, input_ids, attention_mask=None, use_cache=None):  # no position_ids
            return (self.embed(input_ids),)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model, self.head = Inner(), nn.Linear(8, 16)

        def get_output_embeddings(self):
            return self.head

    batch = collate([([1, 2, 3, 4], 2), ([5, 6, 7], 1)], pad_id=0)
    loss = SummaryLoss(Outer())(**batch)
    assert torch.isfinite(loss) and loss > 0
