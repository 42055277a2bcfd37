"""train.packing on a real GPU: SDPA's CUDA kernels take the block-diagonal mask transformers builds from restarting
position ids, and the sliding window of Gemma 3's layers stays inside each packed dialogue, on the GPU machine's own
transformers and torch. fp32 with TF32 off, so rounding cannot hide a mask error: the packed loss and gradients
equal the padded ones. Skipped without a CUDA GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_causal_lm
from phi2sum import modeling
from phi2sum.batches import SummaryLoss, collate, collate_packed
from phi2sum.config import LoraSettings, TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("family", ["phi", "llama", "gemma3"])
def test_packed_rows_train_as_their_dialogues_unpacked_on_the_gpu(family):
    lora = LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = modeling.add_lora(tiny_causal_lm(family).to(CUDA), lora, TrainConfig(gradient_checkpointing=False), False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(4)
    d = [(torch.randint(3, 60, (n,), generator=gen).tolist(), n // 2) for n in (30, 13, 22, 17, 7, 25, 9)]
    out = []
    for batch in (collate(d, 0), collate_packed([[d[0], d[1]], [d[2], d[3], d[4]], [d[5], d[6]]], 0, 48)):
        model.zero_grad()
        loss = SummaryLoss(model).train()(**{k: v.to(CUDA) for k, v in batch.items()})
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
