"""The offline test world: a tiny random Phi-2-shaped model, tokenizers trained here on the shipped
DialogSum slice, and configs that point at both. No downloads, no GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "dialogsum"
# One intra-op thread for the training tests and their subprocesses: the tiny model gains nothing from
# more, on a busy 2-core machine two threads per process make each step ~10x slower, and the same thread
# count everywhere keeps float sums in the same order (resume-equals-uninterrupted compares to 1e-6).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer(chat: bool):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in (SLICE / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["dialogue"], row["summary"]]
    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Phi-2's tokenizer: EOS <|endoftext|>, no pad token. The chat variant ends turns with <|im_end|>,
    # which is not its EOS: the case where training on EOS would be wrong.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    if chat:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: Path, chat: bool = False) -> Path:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    tok = _train_tokenizer(chat)
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=2048,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = PhiForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` (runs before the module's runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Directory of a tiny random PhiForCausalLM + Phi-2-like tokenizer (plain prompt format)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """Same, with a chat template whose end-of-turn token is not EOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi-chat"), chat=True)


def tiny_config_dict(model_dir: Path, tmp: Path, **sections) -> dict:
    raw = {
        "model": {"name": str(model_dir), "quantization": "none"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"source": str(SLICE), "max_length": 384, "max_rows": {"train": 48, "validation": 8, "test": 6},
                 "cache_dir": str(tmp / "cache")},
        "train": {"output_dir": str(tmp / "run"), "device": "cpu", "batch_size": 4, "grad_accum": 2,
                  "max_steps": 6, "learning_rate": 3e-3, "warmup_steps": 1, "eval_every": 3, "save_every": 3,
                  "log_every": 1, "gradient_checkpointing": False, "eval_max_rows": 8},
        "generation": {"max_new_tokens": 12, "batch_size": 4},
        "eval": {"bootstrap_samples": 50},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """make_config(**sections) -> path of a YAML config for the tiny world, in this test's tmp_path."""

    def make(model_dir: Path | None = None, **sections) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(model_dir or tiny_model, tmp_path, **sections)))
        return path

    return make
