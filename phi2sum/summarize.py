"""Summarize people's own dialogues with a trained adapter.

    phi2sum summarize dialog.txt --adapter runs/x
    phi2sum summarize chats/ more.txt --adapter runs/x --out summaries.jsonl
    cat dialog.txt | phi2sum summarize - --adapter runs/x
    phi2sum summarize dialogues.jsonl --adapter runs/x      (one {"dialogue": ...} per line)

Speaker lines may be `Tom: hi` or DialogSum's `#Person1#: hi`. Named speakers are renamed #Person1#,
#Person2#, ... (the form the model was trained on) and the names are put back into the summary.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from . import evaluate
from .config import ConfigError, RunConfig, write_jsonl_atomic
from .console import warn

SPEAKER = re.compile(r"^\s*([^:\n]{1,40}?)\s*:\s*(.*)$")
PERSON = re.compile(r"#Person\d+#")


def _decode(blob: bytes, origin: str) -> str:
    if not blob.strip():
        raise ConfigError(f"{origin} is empty; give it a dialogue, one `Speaker: text` line per turn")
    if b"\0" in blob:
        raise ConfigError(f"{origin} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{origin}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def normalize(text: str) -> tuple[str, dict[str, str]]:
    """(#PersonN# dialogue, {"#Person1#": "Tom", ...}). Text already in DialogSum form passes through."""
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    if any(PERSON.match(ln.strip()) for ln in lines):
        return "\n".join(lines), {}
    names: dict[str, str] = {}
    turns: list[str] = []
    for ln in lines:
        m = SPEAKER.match(ln)
        if m and m.group(2):
            tag = names.setdefault(m.group(1), f"#Person{len(names) + 1}#")
            turns.append(f"{tag}: {m.group(2).strip()}")
        elif turns:  # a continuation of the previous turn
            turns[-1] += " " + ln.strip()
        else:
            turns.append(ln.strip())
    return "\n".join(turns), {tag: name for name, tag in names.items()}


def restore_names(summary: str, names: dict[str, str]) -> str:
    return PERSON.sub(lambda m: names.get(m.group(0), m.group(0)), summary) if names else summary


def read_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """[(source label, dialogue text)] from files, folders, .jsonl files and stdin."""
    items: list[tuple[str, str]] = []
    for arg in inputs:
        if arg == "-":
            items.append(("stdin", _decode(sys.stdin.buffer.read(), "standard input")))
            continue
        path = Path(arg)
        if path.is_dir():
            # Hidden files (.DS_Store, .gitkeep) have no suffix either; they are not dialogues.
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix in (".txt", ".md", ""))
            if not files:
                raise ConfigError(f"{path} holds no .txt files to summarize")
            items += [(str(p), _decode(p.read_bytes(), str(p))) for p in files]
        elif not path.is_file():
            raise ConfigError(f"{arg} not found; pass a text file, a folder, a .jsonl file or - for stdin")
        elif path.name.endswith(".jsonl"):
            text = _decode(path.read_bytes(), str(path))
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    dialogue = row["dialogue"] if isinstance(row, dict) else None
                except (json.JSONDecodeError, KeyError):
                    dialogue = None
                if not isinstance(dialogue, str) or not dialogue.strip():
                    raise ConfigError(f"{path} line {n}: expected a JSON object with a non-empty \"dialogue\"")
                items.append((f"{path}:{n}", dialogue))
        else:
            items.append((str(path), _decode(path.read_bytes(), str(path))))
    return items


def run(cfg: RunConfig, adapter: str | None, inputs: list[str], out: Path | None) -> list[dict]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would summarize and write everything
        raise ConfigError("summarize runs in one process; start it without accelerate launch / torchrun")
    items = read_inputs(inputs)
    normalized = [normalize(text) for _, text in items]
    loaded = evaluate.load_for_inference(cfg, adapter)
    gens = evaluate.generate(loaded, [d for d, _ in normalized], cfg.data.instruction, cfg.generation)
    results = []
    for (source, _), (_, names), g in zip(items, normalized, gens):
        if g.truncated_input:
            warn(f"{source} is longer than generation.max_input_tokens ({cfg.generation.max_input_tokens}); "
                 "its end was cut before summarizing")
        results.append({"source": source, "summary": restore_names(g.text, names)})
    if out is not None:
        write_jsonl_atomic(out, results)
    return results
