"""Data: load DialogSum (hub or local files), build prompts, tokenize with summary-only labels, report.

    phi2sum prepare --config configs/p100.yaml

The tokenized splits are cached under `data.cache_dir`, keyed by the data settings, the input files and
the tokenizer, so `train` reuses them and any change to the prompt or lengths prepares afresh.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runs
from .config import ConfigError, DataConfig, Phi2sumError, cache_home

# Bump when the cached format or the tokenization rules change, so old caches are not reused.
FORMAT_VERSION = 4
PLAIN_TEMPLATE = "Instruct: {instruction}\n{dialogue}\nOutput:\n"
SUFFIXES = (".jsonl.gz", ".json.gz", ".csv.gz", ".jsonl", ".json", ".csv", ".parquet")
# Dialogues this many rows or fewer bad are skipped with a warning; more is an error.
MAX_BAD_SHARE = 0.05
PERSON_TAG = re.compile(r"^#Person\d+#:", re.MULTILINE)


# ----------------------------------------------------------------------------------------------------
# Loading raw rows


def _builder_for(path: Path) -> str:
    name = path.name.lower()
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".parquet", "parquet")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return builder
    raise ConfigError(f"{path}: unsupported file type; use .jsonl, .json, .csv or .parquet (optionally .gz)")


def _check_text_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"data file {path} not found; fix data.source or data.files")
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {path} is empty; point data.files at a file with rows")
    if path.name.endswith(".parquet"):
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    line = 1
    try:
        with opener(path, "rb") as fh:
            for raw in fh:
                if b"\0" in raw:
                    raise ConfigError(f"{path} line {line}: binary data (NUL bytes); expected UTF-8 text")
                raw.decode("utf-8")
                line += 1
    except UnicodeDecodeError:
        raise ConfigError(f"{path} line {line}: not UTF-8 text; re-save the file as UTF-8") from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read ({e}); is the file complete?") from None


def _read_jsonl(path: Path, skip_bad: bool):
    """JSON lines read here rather than by datasets, so a bad line is named by its line number in the file
    (datasets counts rows of its own chunks) and can be skipped (data.skip_bad_lines)."""
    import datasets

    from .console import warn

    opener = gzip.open if path.name.endswith(".gz") else open
    rows, bad = [], []
    with opener(path, "rt", encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, why = None, f"not valid JSON ({e.msg})"
            else:
                why = "not a JSON object"
            if not isinstance(row, dict):
                if not skip_bad:
                    raise ConfigError(f"{path} line {n}: {why}; fix or delete that line, or set "
                                      "data.skip_bad_lines: true to skip such lines")
                bad.append(n)
                continue
            rows.append(row)
    if bad:
        warn(f"{path}: skipped {len(bad)} bad line(s) (data.skip_bad_lines): {', '.join(map(str, bad[:10]))}"
             + (" ..." if len(bad) > 10 else ""))
    if not rows:
        raise ConfigError(f"{path} has no rows; point data.source/files at a non-empty file")
    return datasets.Dataset.from_list(rows)


def _is_saved(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def find_split_file(cfg: DataConfig, split: str) -> Path | None:
    """Local file (or saved folder) for a split: data.files[split], or `<source>/<split>.<ext>` when
    source is a folder of files. None for a hub id or a saved `datasets` folder as source."""
    if split in cfg.files:
        return Path(cfg.files[split]).expanduser()
    src = Path(cfg.source).expanduser()
    if src.is_dir() and not _is_saved(src):
        for suffix in SUFFIXES:
            if (src / f"{split}{suffix}").is_file():
                return src / f"{split}{suffix}"
        raise ConfigError(f"no file for split '{split}' in {src}; expected {split}.jsonl[.gz], .json, .csv or "
                          ".parquet there, or set data.files")
    return None


def is_local(cfg: DataConfig) -> bool:
    return bool(cfg.files) or Path(cfg.source).expanduser().exists()


def _load_saved(path: Path, split: str):
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ConfigError(f"{path} has no split '{split}' (it has {', '.join(saved)}); fix data.*_split")
        return saved[split], f"{path}[{split}]"
    return saved, str(path)


def _first_line(e: BaseException) -> str:
    from datasets.exceptions import DatasetGenerationError

    # datasets wraps the reader's error ("JSON parse error ... in row 3") in a generic one; show the cause.
    if isinstance(e, DatasetGenerationError) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _load_table(cfg: DataConfig, split: str):
    import datasets

    datasets.disable_progress_bars()
    path = find_split_file(cfg, split)
    src = Path(cfg.source).expanduser()
    if path is None and src.is_file():
        raise ConfigError(f"data.source {src} is a file, but it takes a folder of split files or a hub id; "
                          f"name files per split instead: data.files.{split}: {src}")
    verbosity = datasets.logging.get_verbosity()
    # The readers log their own copy of a parse error; ours below is the one line the user sees.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if path is not None and path.is_dir():
            if not _is_saved(path):
                raise ConfigError(f"{path} is a folder but not one saved by datasets' save_to_disk; "
                                  f"point data.files.{split} at a file or a saved dataset")
            return _load_saved(path, split)
        if path is not None:
            _check_text_file(path)
            if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
                return _read_jsonl(path, cfg.skip_bad_lines), str(path)
            return datasets.load_dataset(_builder_for(path), data_files={"rows": str(path)}, split="rows"), str(path)
        if src.is_dir():
            if not (src / "dataset_dict.json").is_file():
                raise ConfigError(f"{src} holds a single saved dataset, not one per split; "
                                  f"set data.files.{split}: {src}")
            return _load_saved(src, split)
        return datasets.load_dataset(cfg.source, split=split), f"{cfg.source}[{split}]"
    except Phi2sumError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot read this source"
        where = path or cfg.source
        if "corresponds to no data" in str(e):  # a file holding only blank lines, `[]` or a CSV header
            raise ConfigError(f"{where} has no rows; point data.source/files at a non-empty {split} split") from None
        raise ConfigError(f"cannot load split '{split}' from {where}: {_first_line(e)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


@dataclass
class Rows:
    """One split, cleaned: parallel lists, one entry per dialogue."""

    ids: list[str]
    dialogues: list[str]
    references: list[list[str]]  # first entry is the training target
    origin: str
    skipped: int = 0


def load_split(cfg: DataConfig, split: str, merge_duplicates: bool = False) -> Rows:
    """Load and clean a split. `merge_duplicates` folds rows repeating a dialogue into one with several
    references (the hub's DialogSum test lists each dialogue three times)."""
    table, origin = _load_table(cfg, split)
    cols = set(table.column_names)
    if len(table) == 0:
        raise ConfigError(f"{origin} has no rows; point data.source/files at a non-empty {split} split")
    for need, field in ((cfg.dialogue_column, "data.dialogue_column"),):
        if need not in cols:
            raise ConfigError(f"{origin}: no column '{need}' (columns: {', '.join(sorted(cols))}); set {field}")
    numbered = sorted((c for c in cols if c.startswith(cfg.summary_column) and c[len(cfg.summary_column):].isdigit()),
                      key=lambda c: int(c[len(cfg.summary_column):]))
    ref_col = cfg.references_column if cfg.references_column in cols else None
    if ref_col is None and cfg.summary_column not in cols and not numbered:
        raise ConfigError(f"{origin}: no column '{cfg.summary_column}' (columns: {', '.join(sorted(cols))}); "
                          "set data.summary_column")
    n = cfg.max_rows.get(split, 0) or len(table)
    table = table.select(range(min(n, len(table))))
    data = table.to_dict()
    ids = data.get(cfg.id_column) or [f"{split}_{i}" for i in range(len(table))]
    summary_from = ref_col or (cfg.summary_column if cfg.summary_column in cols else "/".join(numbered))
    rows = Rows([], [], [], origin)
    index: dict[str, int] = {}
    bad: list[str] = []  # "row 7 (id train_6)", 1-based like the line numbers of a .jsonl file
    empty_dialogues = 0
    for i in range(len(table)):
        dialogue = data[cfg.dialogue_column][i]
        if ref_col:
            value = data[ref_col][i]
            refs = [value] if isinstance(value, str) else list(value or [])
        elif cfg.summary_column in cols:
            refs = [data[cfg.summary_column][i]]
        else:
            refs = [data[c][i] for c in numbered]
        refs = [r.strip() for r in refs if isinstance(r, str) and r.strip()]
        if not isinstance(dialogue, str) or not dialogue.strip() or not refs:
            empty_dialogues += not isinstance(dialogue, str) or not dialogue.strip()
            bad.append(f"row {i + 1} (id {ids[i]})")
            continue
        dialogue = dialogue.strip()
        if merge_duplicates and dialogue in index:
            known = rows.references[index[dialogue]]
            known.extend(r for r in refs if r not in known)
            continue
        index[dialogue] = len(rows.ids)
        rows.ids.append(str(ids[i]))
        rows.dialogues.append(dialogue)
        rows.references.append(refs)
    counts = ((cfg.dialogue_column, empty_dialogues), (summary_from, len(bad) - empty_dialogues))
    what = "an empty " + " or ".join(f"'{column}' ({n})" for column, n in counts if n)
    if bad and (len(bad) > MAX_BAD_SHARE * len(table) or not rows.ids):
        raise ConfigError(f"{origin}: {len(bad)} of {len(table)} rows have {what}, e.g. {', '.join(bad[:3])}; "
                          "fix the file or the column settings")
    rows.skipped = len(bad)
    if bad:
        from .console import warn
        warn(f"{origin}: skipped {len(bad)} of {len(table)} rows with {what}: {', '.join(bad[:10])}")
    return rows


# ----------------------------------------------------------------------------------------------------
# Prompts and stop tokens: one place, used by train, eval and summarize alike


def resolve_format(cfg: DataConfig, tokenizer) -> str:
    if cfg.prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if cfg.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.prompt_format is chat but the tokenizer has no chat template; use plain")
    return cfg.prompt_format


def build_prompt(tokenizer, dialogue: str, fmt: str, instruction: str) -> str:
    if fmt == "plain":
        return PLAIN_TEMPLATE.format(instruction=instruction, dialogue=dialogue)
    messages = [{"role": "user", "content": f"{instruction}\n\n{dialogue}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token(tokenizer, fmt: str) -> str:
    """The token that ends a summary: EOS for the plain format; for a chat template, the end-of-turn
    token the template writes after an assistant message (e.g. `<|im_end|>`), which is often not EOS.
    Training on the wrong one makes generation run on into invented turns."""
    if fmt == "chat":
        sentinel = "SUMMARY_SENTINEL_7f3a"
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        tail = text.split(sentinel, 1)[1].lstrip(" ")
        specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
        for tok in specials:
            if tok and tail.startswith(tok):
                return tok
    if tokenizer.eos_token is None:
        raise Phi2sumError("the tokenizer has no EOS token; cannot mark where a summary ends")
    return tokenizer.eos_token


def stop_ids(tokenizer, fmt: str) -> list[int]:
    """Token ids generation stops at: the trained stop token first, then EOS as a safety net."""
    ids = [tokenizer.convert_tokens_to_ids(stop_token(tokenizer, fmt))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_ids(tokenizer, prompt: str, fmt: str) -> list[int]:
    # Chat templates write BOS themselves; the plain format gets the tokenizer's usual specials.
    return tokenizer(prompt, add_special_tokens=(fmt == "plain"))["input_ids"]


def fit_prompt(tokenizer, dialogue: str, fmt: str, instruction: str, budget: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, with the dialogue shortened from its end to fit `budget` tokens.
    Returns (ids, truncated). The instruction and the answer cue are never cut."""
    ids = prompt_ids(tokenizer, build_prompt(tokenizer, dialogue, fmt, instruction), fmt)
    if len(ids) <= budget:
        return ids, False
    d_ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
    keep = len(d_ids) - (len(ids) - budget)
    while keep > 0:
        short = tokenizer.decode(d_ids[:keep], skip_special_tokens=True).rstrip() + " ..."
        ids = prompt_ids(tokenizer, build_prompt(tokenizer, short, fmt, instruction), fmt)
        if len(ids) <= budget:
            return ids, True
        keep -= max(1, len(ids) - budget)
    raise ConfigError(f"the prompt alone needs more than {budget} tokens; raise data.max_length")


def encode_example(tokenizer, dialogue: str, summary: str, fmt: str, instruction: str, stop_id: int,
                   max_length: int) -> tuple[list[int], int, bool]:
    """(input_ids, prompt_length, truncated). Labels are input_ids with the first prompt_length positions
    masked: the loss sees the summary and the stop token only."""
    target = tokenizer(summary, add_special_tokens=False)["input_ids"] + [stop_id]
    ids, truncated = fit_prompt(tokenizer, dialogue, fmt, instruction, max_length - len(target))
    return ids + target, len(ids), truncated


def labels_for(input_ids: list[int], prompt_length: int) -> list[int]:
    return [-100] * prompt_length + list(input_ids[prompt_length:])


# ----------------------------------------------------------------------------------------------------
# Prepare: tokenize train + validation, cache, report


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token,
                         tokenizer.pad_token, type(tokenizer).__name__]).encode())
    return h.hexdigest()[:16]


def cache_key(cfg: DataConfig, tokenizer, splits: list[str]) -> str:
    files = {}
    for split in splits:
        path = find_split_file(cfg, split) if is_local(cfg) else None
        if path is None and is_local(cfg):
            path = Path(cfg.source).expanduser()  # a saved DatasetDict folder
        if path is not None and path.exists():
            # Name, size and mtime of every file: an edited or re-saved source prepares afresh.
            found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files[split] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in found]
    settings = cfg.model_dump(exclude={"cache_dir"})
    blob = json.dumps([FORMAT_VERSION, settings, files, splits, tokenizer_fingerprint(tokenizer)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_folder(cfg: DataConfig) -> Path:
    """Where prepared data is cached: data.cache_dir, else `prepared/` in phi2sum's cache folder."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home() / "prepared"


def person_tags(dialogues: list[str]) -> bool:
    """Do most dialogues name their speakers DialogSum's way (`#Person1#:`)? `summarize` then rewrites named
    speakers (`Tom:`) into that form; a model trained on named speakers gets the names as they are."""
    return sum(bool(PERSON_TAG.search(d)) for d in dialogues) * 2 > len(dialogues)


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)} | {"max": int(arr.max())}


def tokenize_split(cfg: DataConfig, tokenizer, rows: Rows, fmt: str) -> tuple[dict, dict]:
    stop_id = tokenizer.convert_tokens_to_ids(stop_token(tokenizer, fmt))
    out = {"input_ids": [], "prompt_length": []}
    truncated = too_long_summary = 0
    prompt_lens, summary_lens = [], []
    for dialogue, refs in zip(rows.dialogues, rows.references):
        summary = refs[0]
        n_sum = len(tokenizer(summary, add_special_tokens=False)["input_ids"]) + 1
        if n_sum > cfg.max_summary_tokens:
            too_long_summary += 1
            continue
        ids, plen, cut = encode_example(tokenizer, dialogue, summary, fmt, cfg.instruction, stop_id, cfg.max_length)
        truncated += cut
        out["input_ids"].append(ids)
        out["prompt_length"].append(plen)
        prompt_lens.append(plen)
        summary_lens.append(len(ids) - plen)
    report = {
        "source": rows.origin, "rows_read": len(rows.ids) + rows.skipped, "rows_kept": len(out["input_ids"]),
        "skipped_empty": rows.skipped, "dropped_summary_too_long": too_long_summary,
        "dialogues_truncated": truncated, "prompt_tokens": _percentiles(prompt_lens),
        "summary_tokens": _percentiles(summary_lens),
        "real_tokens": int(sum(len(x) for x in out["input_ids"])),
    }
    return out, report


@dataclass
class Prepared:
    path: Path
    splits: dict  # split name -> datasets.Dataset with input_ids, prompt_length
    report: dict
    cached: bool


def prepare(cfg: DataConfig, tokenizer, progress=None) -> Prepared:
    """Tokenize the train and validation splits (cached)."""
    import datasets

    splits = [cfg.train_split, cfg.validation_split]
    fmt = resolve_format(cfg, tokenizer)
    key = cache_key(cfg, tokenizer, splits)
    final = cache_folder(cfg) / key
    if (final / "report.json").is_file():
        try:
            loaded = {s: datasets.load_from_disk(str(final / s)) for s in splits}
            return Prepared(final, loaded, json.loads((final / "report.json").read_text()), True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(final, ignore_errors=True)
    report = {"key": key, "prompt_format": fmt, "stop_token": stop_token(tokenizer, fmt), "splits": {}}
    # Built in a temp folder and renamed at the end: a crash leaves nothing half-written, and of two prepares
    # sharing the cache (two runs, two processes) the first to finish publishes and the other keeps it.
    with runs.replacing_dir(final, keep_existing=True) as tmp:
        for split in splits:
            if progress:
                progress(f"tokenizing {split}")
            rows = load_split(cfg, split)
            if split == cfg.train_split:
                report["person_tags"] = person_tags(rows.dialogues)
            columns, rep = tokenize_split(cfg, tokenizer, rows, fmt)
            if not columns["input_ids"]:
                raise ConfigError(f"{rows.origin}: no usable rows after filtering; check data.max_summary_tokens")
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / split))
            report["splits"][split] = rep
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    built = {s: datasets.load_from_disk(str(final / s)) for s in splits}
    return Prepared(final, built, report, False)
