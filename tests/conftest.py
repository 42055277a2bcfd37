"""The offline test world: a tiny random Phi-2-shaped model, tokenizers trained here on the shipped
DialogSum slice, configs that point at both, "scripted" tiny models whose next token is fixed, and one
real training run shared by the tests that only read it. No downloads, no GPU (tests/gpu/ aside)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
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
EOS = "<|endoftext|>"
INSTRUCTION = "Summarize the following conversation."
# Prompts of very different lengths, so batches need real left padding.
DIALOGUES = ["#Person1#: Hi.\n#Person2#: Hey.",
             "#Person1#: Where is the station?\n#Person2#: Two blocks down, next to the bank. " * 6,
             "#Person1#: Coffee?\n#Person2#: Tea, please.",
             "#Person1#: I lost my keys again, could you help me look for them?\n#Person2#: Sure. " * 3,
             "#Person1#: Done?\n#Person2#: Yes."]
# "Tom is late." then the stop token, as BPE tokens of the test tokenizer.
TOM_IS_LATE = ("Ċ", "T", "om", "Ġis", "Ġl", "ate", ".")


def pytest_collection_modifyitems(config, items):
    """tests/gpu/ needs a CUDA GPU: skipped (not failed) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------------
# Tiny models and tokenizers


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


def build_tiny_model(out: Path, chat: bool = False, hidden_size: int = 48) -> Path:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    tok = _train_tokenizer(chat)
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=2048,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = PhiForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_causal_lm(family: str, window: int = 8):
    """A tiny random causal LM of Phi-2's family, Llama's (SmolLM2, grouped-query) or Gemma 3's (a sliding-window
    layer of `window` tokens, then a full one), vocabulary 64, no dropout."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PhiConfig,
                              PhiForCausalLM)

    torch.manual_seed(0)
    if family == "phi":
        return PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, partial_rotary_factor=0.4, resid_pdrop=0.0,
                                        embd_pdrop=0.0))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128))


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` (runs before the module's runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory) -> Path:
    """Directory of a tiny random PhiForCausalLM + Phi-2-like tokenizer (plain prompt format)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi"))


@pytest.fixture(scope="package")
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
        "generation": {"max_new_tokens": 12, "batch_size": 4, "device": "cpu"},
        "eval": {"bootstrap_samples": 50},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(tmp: Path, model_dir: Path, **sections) -> Path:
    """tmp/config.yaml for the tiny world (its run goes to tmp/run, its cache to tmp/cache)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(model_dir, tmp, **sections)))
    return path


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """make_config(**sections) -> path of a YAML config for the tiny world, in this test's tmp_path."""

    def make(model_dir: Path | None = None, **sections) -> Path:
        return write_config(tmp_path, model_dir or tiny_model, **sections)

    return make


@pytest.fixture(scope="package")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """One real 6-step CPU training run (the tiny config as it is), shared by every test that only reads a
    finished run: eval, summarize, push, merge. Tests that write into a run take `run_copy`."""
    import torch

    from phi2sum.config import load_config
    from phi2sum.train import train

    tmp = tmp_path_factory.mktemp("trained")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training tests do (ONE_THREAD)
    try:
        result = train(load_config(write_config(tmp, tiny_model)))
    finally:
        torch.set_num_threads(before)
    assert result.stopped == "finished" and result.steps == 6
    return tmp / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared run, for tests that change it or write into it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------
# Models for generation: random ones, and scripted ones whose output is known token by token


def cpu():
    import torch

    from phi2sum import modeling

    return modeling.Hardware(torch.device("cpu"), torch.float32, "cpu")


def scripted_lm(model_dir: Path, script: dict[str, list[str]], bias: dict[str, float] | None = None,
                new_tokens: tuple[str, ...] = (), fmt: str = "plain"):
    """A real PhiForCausalLM rewired so its next token depends only on the current one.

    Attention and MLP outputs are zeroed, so the last hidden state is the normed embedding of the current
    token; the scripted tokens get orthogonal embeddings and lm_head maps each to its successor(s) with a
    logit of 30 (all else 0, plus `bias`). Two successors tie, so sampling picks either. Every prompt ends
    with the template's last token ("\\n" after `Output:`), so the script starts there."""
    import torch
    from transformers import AutoTokenizer, PhiForCausalLM

    from phi2sum import data as data_mod
    from phi2sum import modeling
    from phi2sum.generate import Loaded

    tok = modeling.fix_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    tok.add_tokens(list(new_tokens))
    model = PhiForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    used = sorted(set(script) | {y for ys in script.values() for y in ys} | set(bias or {}))
    ids = {t: tok.convert_tokens_to_ids(t) for t in used}
    assert tok.unk_token_id not in [ids[t] for t in used if t != tok.unk_token], "a scripted token is not in the vocab"
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.dense, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        a = torch.randn(model.config.hidden_size, len(used), generator=torch.Generator().manual_seed(0))
        basis, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal, zero-mean: LayerNorm keeps them orthogonal
        emb, norm, head = model.model.embed_tokens.weight, model.model.final_layernorm, model.lm_head
        for k, t in enumerate(used):
            emb[ids[t]] = 5 * basis[:, k]
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        head.weight.zero_()
        head.bias.zero_()
        for x, successors in script.items():
            h = norm(emb[ids[x]])
            for y in successors:
                head.weight[ids[y]] += 30.0 * h / h.dot(h)
        for t, b in (bias or {}).items():
            head.bias[ids[t]] = b
    model.eval()
    return Loaded(model, tok, fmt, data_mod.stop_ids(tok, fmt), None, cpu())


def chain(*tokens: str) -> dict[str, list[str]]:
    return {a: [b] for a, b in zip(tokens, tokens[1:])}


@pytest.fixture(scope="package")
def random_lm(tiny_model, tmp_path_factory):
    """The tiny random model loaded for inference as eval loads it (read-only: `replace` it to vary)."""
    from phi2sum.config import RunConfig
    from phi2sum.generate import load_for_inference

    cfg = RunConfig.model_validate(tiny_config_dict(tiny_model, tmp_path_factory.mktemp("cfg")))
    return load_for_inference(cfg, None)


@pytest.fixture(scope="package")
def random_chat_lm(tiny_chat_model, tmp_path_factory):
    from phi2sum.config import RunConfig
    from phi2sum.generate import load_for_inference

    cfg = RunConfig.model_validate(tiny_config_dict(tiny_chat_model, tmp_path_factory.mktemp("cfg")))
    return load_for_inference(cfg, None)


@pytest.fixture(scope="package")
def gqa_lm(tiny_model):
    """A tiny Llama with grouped-query attention (SmolLM2's architecture), random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from phi2sum import data as data_mod
    from phi2sum import modeling
    from phi2sum.generate import Loaded

    tok = modeling.fix_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                         max_position_embeddings=2048, tie_word_embeddings=True,
                                         initializer_range=0.3)).eval()
    return Loaded(model, tok, "plain", data_mod.stop_ids(tok, "plain"), None, cpu())


@pytest.fixture(scope="module")
def exact_fp32():
    """TF32 off for a GPU test module: fp32 comparisons against transformers then show logic errors, not rounding."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def padded_batch(loaded, gen, dialogues=DIALOGUES):
    """DIALOGUES as the left-padded (input_ids, attention_mask) batch generation builds."""
    import torch

    from phi2sum import data as data_mod

    prompts = [data_mod.fit_prompt(loaded.tokenizer, d, loaded.fmt, INSTRUCTION, gen.max_input_tokens)[0]
               for d in dialogues]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# Small readers


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def unwrapped(output: str) -> str:
    """Console output with rich's line wrapping undone (long paths wrap at the terminal width)."""
    return " ".join(output.split())


def tensors(path: Path) -> dict:
    """The tensors of a safetensors file (an adapter, a checkpoint's trainable weights)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def sigkill_when(child, ready, log: Path, timeout: float = 120, poll: float = 0.01, victim=None) -> None:
    """Wait until `ready()` while the child process lives, then SIGKILL it; kill it anyway on the way out.
    With `victim`, a function giving the pid of one of the child's own processes (a worker of torchrun), that
    process is killed instead and the child left to fail on its own; such a child must be started with
    start_new_session=True, so that the way out can kill its whole group."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the child never got there: {log.read_text()[-2000:]}"
            time.sleep(poll)
        if victim is None:
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
        else:
            os.kill(victim(), signal.SIGKILL)
            assert child.wait(timeout=120) != 0, log.read_text()
    finally:
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # the launcher and whatever it started
        if child.poll() is None:
            child.kill()
            child.wait()


def free_port() -> int:
    with socket.socket() as s:  # torchrun's static rendezvous needs a real port number (0 hangs)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command that runs `phi2sum ARGS` in `nproc` processes, as users launch it (accelerate launch sets the
    same environment)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "phi2sum", *args]


def torchrun_worker(launcher, rank: int) -> int:
    """The pid of the launched process of that rank (Linux: the launcher's children and their environment)."""
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"torchrun has no process of rank {rank}")
