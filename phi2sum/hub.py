"""Publishing: a model card and an upload of the run to the Hugging Face Hub.

    phi2sum push --adapter runs/phi2-dialogsum --repo you/phi2-dialogsum   (--dry-run DIR: stage only)

It reads the run directory `train` wrote. The upload is staged in a folder first, so what `--dry-run`
shows is exactly what a real push sends.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from . import data, modeling, runs
from .config import ConfigError, ModelConfig, Phi2sumError, RunConfig, looks_local
from .console import warn

# Top-level run files that go to the Hub (runs.SHIP). Allow-listed, so checkpoints/, best/, eval predictions,
# temp folders and whatever else a user left in the run never leave the machine.
SHIP = runs.SHIP
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


def hub_model_id(m: ModelConfig) -> str | None:
    """The base model's hub id, or None when training loaded it from a local path or a PyPI package
    (a local path in the card's metadata would point readers nowhere)."""
    if m.name.startswith("pypi:") or m.name.endswith(".gguf") or looks_local(m.name):
        return None
    return m.name


def _names_dialogsum(name: str, file: bool) -> bool:
    if not file and not looks_local(name):
        return name == DIALOGSUM
    # The data folder's own name, or a file's name and its folder's: never a folder further up (a project
    # folder called phi2-dialogsum holding the user's own chats).
    path = Path(name).expanduser().resolve()
    return "dialogsum" in (f"{path.parent.name}/{path.name}" if file else path.name).lower()


def is_dialogsum(d) -> bool:
    """Was the run trained on DialogSum: every split read from the hub dataset, or from local data named after it
    (a folder called dialogsum like the shipped slice tests/data/dialogsum, or DialogSum's own
    `dialogsum.train.jsonl`) with DialogSum's columns? Anything else is the user's own data."""
    if (d.dialogue_column, d.summary_column) != ("dialogue", "summary"):
        return False
    splits = (d.train_split, d.validation_split, d.test_split)
    return all(_names_dialogsum(d.files[s], True) if s in d.files else _names_dialogsum(d.source, False)
               for s in splits)


def card_license(cfg: RunConfig) -> str:
    """push.license, else DialogSum's CC BY-NC-SA 4.0 for a run on DialogSum, else `other` (no license named)."""
    return cfg.push.license or ("cc-by-nc-sa-4.0" if is_dialogsum(cfg.data) else "other")


def _dataset_id(d) -> str | None:
    """The dataset's hub id for the card's metadata: DialogSum's for DialogSum, the hub id of other hub data,
    none for local files (a local path points readers nowhere)."""
    if is_dialogsum(d):
        return DIALOGSUM
    return None if d.files or looks_local(d.source) else d.source


def _eval_results(metrics: dict | None, dataset: str | None, dataset_name: str):
    """model-index entries, so the Hub shows the fine-tuned model's ROUGE on the scored split."""
    from huggingface_hub import EvalResult

    model = (metrics or {}).get("models", {}).get("fine-tuned")
    if not model:
        return None
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
    return [EvalResult(task_type="summarization", task_name="Dialogue summarization", dataset_type=dataset or "custom",
                       dataset_name=dataset_name, dataset_split=metrics["split"], metric_type=k, metric_name=name,
                       metric_value=round(100 * model[k]["mean"], 2),
                       metric_config=f"F1 x 100, {'stemmed' if metrics['use_stemmer'] else 'unstemmed'}, "
                                     f"{metrics['protocol']}")
            for k, name in names.items()]


def _local_paths(cfg: RunConfig) -> list[str]:
    """Paths on the training machine that the uploaded config.yaml, summary.json and prepare_report.json name."""
    d = cfg.data
    found = [cfg.model.name] if looks_local(cfg.model.name) or cfg.model.name.endswith(".gguf") else []
    from_source = any(s not in d.files for s in (d.train_split, d.validation_split, d.test_split))
    found += ([d.source] if from_source and looks_local(d.source) else []) + list(d.files.values())
    return found + [cfg.train.output_dir] + ([d.cache_dir] if d.cache_dir else [])


# ----------------------------------------------------------------------------------------------------
# Model card


def _score(s: dict) -> str:
    ci = s.get("ci95")
    return f"{100 * s['mean']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")


def _results(metrics: dict | None, data_name: str = "DialogSum") -> str:
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
            f"{data_name} `{metrics['split']}` split: {metrics['n_dialogues']} dialogues, {metrics['n_pairs']} "
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
    # Speakers in the form training saw: DialogSum's #Person1#, or names (a run on the user's own chats).
    example = ("#Person1#: Are you coming tonight?\n#Person2#: Yes, I'll be there at eight."
               if report.get("person_tags", True) else "Anna: Are you coming tonight?\nBen: Yes, I'll be there at eight.")
    full = runs.is_full_model(run_dir)
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
             f"dialogue = {_py_str(example)}",
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


def model_card(run_dir: Path, cfg: RunConfig, repo_id: str | None, eval_metrics: Path | None = None) -> str:
    """README.md for the Hub: YAML metadata, then results (from `eval_metrics`, a metrics.json of
    `phi2sum eval`), training settings, usage and attribution."""
    from huggingface_hub import ModelCard, ModelCardData

    base = hub_model_id(cfg.model)
    full = runs.is_full_model(run_dir)
    dialogsum = is_dialogsum(cfg.data)
    dataset = _dataset_id(cfg.data)
    data_name = "DialogSum" if dialogsum else (dataset or "custom data")
    license_id = card_license(cfg)
    metrics = _read_json(eval_metrics) if eval_metrics else None
    title = repo_id.split("/")[1] if repo_id else run_dir.name
    meta = ModelCardData(base_model=base, library_name="transformers" if full else "peft", license=license_id,
                         language=["en"], datasets=[dataset] if dataset else None, metrics=["rouge"],
                         pipeline_tag="text-generation", model_name=title,
                         eval_results=_eval_results(metrics, dataset, data_name),
                         tags=(["full-fine-tune"] if full else ["peft", "lora"]) + ["summarization", "phi2sum"]
                         + (["dialogsum"] if dialogsum else []))
    what = ("A full fine-tune of" if full else "A LoRA adapter that turns") + f" `{cfg.model.name}`"
    if dialogsum:
        data_section = ("Trained on DialogSum (Chen et al., 2021, *DialogSum: A Real-Life Scenario Dialogue "
                        "Summarization Dataset*, Findings of ACL-IJCNLP 2021; https://github.com/cylnlp/dialogsum), "
                        f"released under CC BY-NC-SA 4.0. This {'model' if full else 'adapter'} is shared under "
                        f"`{license_id}`; the base model keeps its own license.\n\n```bibtex\n{CITATION}\n```\n")
    else:
        source = f"the hub dataset `{dataset}`" if dataset else "the uploader's own data (local files), not DialogSum"
        shared = (f"shared under `{license_id}`" if cfg.push.license else
                  "shared without a named license (`other`: the uploader set no push.license)")
        data_section = (f"Trained on {source}: dialogue column `{cfg.data.dialogue_column}`, summary column "
                        f"`{cfg.data.summary_column}`. This {'model' if full else 'adapter'} is {shared}; check that "
                        "the data's license allows it. The base model keeps its own license.\n")
    local = ", ".join(f"`{p}`" for p in dict.fromkeys(_local_paths(cfg)))
    body = (f"# {title}\n\n{what} into a dialogue summarizer, fine-tuned on {data_name} with phi2sum "
            f"({'all weights' if full else 'LoRA/QLoRA'}, loss on summary tokens only).\n\n"
            f"## Results\n\n{_results(metrics, data_name)}\n"
            f"## Training\n\n{_training(cfg, _read_json(run_dir / 'summary.json'))}\n"
            "`config.yaml` holds the full resolved config, `metrics.jsonl` the loss log, `loss.png` the curves. "
            f"These paths in `config.yaml`, `summary.json` and `prepare_report.json` are local to the machine that "
            f"trained: {local}.\n\n"
            f"## Usage\n\n{_usage(cfg, run_dir, repo_id, base)}\n"
            f"## Data and license\n\n{data_section}")
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}").content


# ----------------------------------------------------------------------------------------------------
# Staging: the exact folder a push uploads


def _ours(name: str) -> bool:
    """Could `stage` have written this file? (Decides whether a --dry-run folder may be replaced.)"""
    return name in ("README.md", "eval/metrics.json") or ("/" not in name and any(fnmatch(name, p) for p in SHIP))


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def stage(run_dir: Path, cfg: RunConfig, repo_id: str | None, dest: Path,
          eval_dir: Path | None = None) -> list[tuple[str, int]]:
    """Copy what goes to the Hub from the run into the empty folder `dest`, write the model card over
    the README peft saved, and list the result as (name, bytes). Eval scores come from `eval_dir`
    (default: where `phi2sum eval` writes for this run); none found is said, not silently skipped."""
    for f in sorted(run_dir.iterdir()):
        if f.is_file() and _ours(f.name) and f.name != "README.md":
            shutil.copy2(f, dest / f.name)
    metrics = runs.eval_dir(run_dir, cfg, eval_dir) / "metrics.json"
    if metrics.is_file():
        (dest / "eval").mkdir()
        shutil.copy2(metrics, dest / "eval" / "metrics.json")
    else:
        warn(f"no eval scores at {metrics}: the model card will have no ROUGE table. Run `phi2sum eval` first, "
             "or pass --eval-dir with the folder it wrote")
    if not cfg.push.license and not is_dialogsum(cfg.data):
        warn("the model card names no license: the run did not train on DialogSum and push.license is unset; set it "
             "to your data's and model's terms, e.g. --set push.license=mit")
    (dest / "README.md").write_text(model_card(run_dir, cfg, repo_id, metrics), encoding="utf-8")
    return _listing(dest)


def _stage_dry_run(run_dir: Path, cfg: RunConfig, repo_id: str | None, folder: Path,
                   eval_dir: Path | None) -> list[tuple[str, int]]:
    if folder.exists():
        # Replace only an earlier staging folder: anything else in it is someone's data.
        stray = [n for n, _ in _listing(folder) if not _ours(n)] if folder.is_dir() else [folder.name]
        if stray:
            raise ConfigError(f"--dry-run folder {folder} already holds other files ({', '.join(stray[:3])}); "
                              "pass an empty or new folder")
    with runs.replacing_dir(folder) as tmp:
        files = stage(run_dir, cfg, repo_id, tmp, eval_dir)
    return files


# ----------------------------------------------------------------------------------------------------
# Push


def hub_reason(e: Exception, secret: str | None, endpoint: str | None = None) -> str:
    """One line for a failed Hub call (push, checkpoint upload or download), the token masked should any library
    ever echo it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set, so nothing can be sent to the Hub; unset it and try again"
    elif status in (401, 403):
        text = (f"HTTP {status}: the Hub refused this token: use a token with write access (`hf auth login`) and a "
                "repo under your user or an organization you can write to")
    elif status is not None:
        text = f"HTTP {status}: {detail}"
    elif isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(("httpx", "requests")):
        where = f" at {endpoint}" if endpoint else ""
        text = f"cannot reach the Hugging Face Hub{where} ({type(e).__name__}); check your network and try again"
    else:
        text = f"{type(e).__name__}: {detail}"
    return text.replace(secret, "***") if secret else text


def push(run_dir: Path, cfg: RunConfig, repo_id: str | None, private: bool, revision: str | None,
         commit_message: str, dry_run_dir: Path | None, eval_dir: Path | None = None) -> dict:
    """Upload adapter, tokenizer, config, metrics and a model card to `repo_id` (created if missing).
    With `dry_run_dir`, only build that folder: no token, no network."""
    run_dir = Path(run_dir)
    runs.require_trained(run_dir, full_ok=True)
    runs.check_adapter_config(run_dir)
    if repo_id is not None and not REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"repo id {repo_id!r} is not of the form user/name (letters, digits, - _ .); "
                          "e.g. --repo you/phi2-dialogsum")
    if dry_run_dir is not None:
        return {"files": _stage_dry_run(run_dir, cfg, repo_id, Path(dry_run_dir), eval_dir),
                "folder": str(dry_run_dir)}
    if repo_id is None:
        raise ConfigError("no repo to push to: pass --repo user/name or set push.repo_id in the config")
    from huggingface_hub import HfApi, get_token

    token = get_token()  # HF_TOKEN, else the one `hf auth login` saved
    if not token:
        raise Phi2sumError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)  # endpoint from HF_ENDPOINT, like every huggingface_hub call
    with tempfile.TemporaryDirectory(prefix="phi2sum-push-") as tmp:
        files = stage(run_dir, cfg, repo_id, Path(tmp), eval_dir)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
        except Exception as e:
            raise Phi2sumError(f"push to {repo_id} failed: {hub_reason(e, token, api.endpoint)}") from None
    return {"url": str(url) + (f"/tree/{revision}" if revision else ""), "files": files}
