"""Summarize people's own dialogues with a trained adapter.

    phi2sum summarize dialog.txt --adapter runs/x
    phi2sum summarize chats/ more.txt --adapter runs/x --out summaries.jsonl
    cat dialog.txt | phi2sum summarize - --adapter runs/x
    phi2sum summarize corpus.jsonl --adapter runs/x --out summaries.jsonl   (one {"dialogue": ...} per line,
                                                                            or the run's data.dialogue_column)
    accelerate launch -m phi2sum summarize corpus.jsonl --adapter runs/x --out summaries.jsonl   (one per GPU)

Speaker lines may be `Tom: hi` or DialogSum's `#Person1#: hi`. For a model trained on DialogSum's form, named
speakers are renamed #Person1#, #Person2#, ... and the names are put back into the summary; a model trained on
named speakers (the run's prepare_report.json says which) gets them as they are. Text files
may be UTF-8, or UTF-8/16/32 with a byte-order mark.

With --out, each batch's summaries are appended to the file as the batch finishes, one JSON line per dialogue
({"id", "source", "summary", "run_on"}) in the order they finish (longest dialogues first), not the input
order: the `id` (a JSON line's own "id", else file:line, or the file name) says which is which. Running the same
command again skips the ids the file already holds, so a crash or Ctrl-C loses at most the batch in flight.

Under `accelerate launch` or torchrun each process summarizes every n-th dialogue not yet written. With --out,
process R appends its batches to its own OUT.part-R (one writer per file, so no two lines interleave), and the
main process appends the parts to OUT, each id once, when every process is done; after a kill the next run does
that first, so the parts count as written. Without --out the main process prints all summaries, in input order.
The progress bar follows the main process's share, its rate that process's times the number of processes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .config import ConfigError, RunConfig
from .console import console, info, progress, warn
from .generate import fold_adapter, generate, load_for_inference, process_state
from .runs import write_text_atomic

SPEAKER = re.compile(r"^\s*([^:\n]{1,40}?)\s*:\s*(.*)$")
PERSON = re.compile(r"#Person\d+#")


BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def decode_text(blob: bytes, origin: str) -> tuple[str, str]:
    """(text, encoding): UTF-8, or UTF-8/16/32 with a byte-order mark (what Windows Notepad and many
    exporters write). Anything else is refused with what to do."""
    encoding = next((enc for bom, enc in BOMS if blob.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\0" in blob:
        raise ConfigError(f"{origin} looks binary (NUL bytes, no byte-order mark); give a UTF-8 text file")
    try:
        text = blob.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{origin}: not {encoding.upper().removesuffix('-SIG')} text (byte {e.start}); "
                          "re-save it as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{origin} is empty; give it a dialogue, one `Speaker: text` line per turn")
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding.removesuffix("-sig")


def normalize(text: str, rename: bool = True) -> tuple[str, dict[str, str]]:
    """(#PersonN# dialogue, {"#Person1#": "Tom", ...}). Text already in DialogSum form passes through, and so
    do named speakers without `rename` (a model trained on named speakers gets them as they are)."""
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    if not rename or any(PERSON.match(ln.strip()) for ln in lines):
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


@dataclass
class Item:
    id: str  # the jsonl row's "id", else the file (and line); what a rerun of --out skips when already written
    source: str
    text: str


def read_inputs(inputs: list[str], column: str = "dialogue", id_column: str = "id") -> tuple[list[Item], list[str]]:
    """The dialogues to summarize, and one problem line per input that could not be read (the others go on).
    A .jsonl file's dialogue is its `column` (the run's data.dialogue_column), else "dialogue"; its id `id_column`."""
    items: list[Item] = []
    problems: list[str] = []

    def read(path: Path, label: str) -> None:
        try:
            text, encoding = decode_text(path.read_bytes(), label)
        except ConfigError as e:
            problems.append(str(e))
            return
        except OSError as e:
            problems.append(f"{label}: cannot read ({e.strerror})")
            return
        if encoding != "utf-8":
            info(f"{label}: read as {encoding}")
        items.append(Item(label, label, text))

    for arg in inputs:
        path = Path(arg)
        if arg == "-":
            text, _ = decode_text(sys.stdin.buffer.read(), "standard input")
            items.append(Item("stdin", "stdin", text))
        elif path.is_dir():
            # Hidden files (.DS_Store, .gitkeep) have no suffix either; they are not dialogues.
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix in (".txt", ".md", ""))
            if not files:
                raise ConfigError(f"{path} holds no .txt files to summarize")
            for p in files:
                read(p, str(p))
        elif not path.is_file():
            raise ConfigError(f"{arg} not found; pass a text file, a folder, a .jsonl file or - for stdin")
        elif path.name.endswith(".jsonl"):
            items += _read_jsonl(path, column, id_column)
        else:
            read(path, str(path))
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ConfigError(f"id {item.id!r} appears twice in the inputs; give every dialogue its own id")
        seen.add(item.id)
    return items, problems


def _read_jsonl(path: Path, column: str, id_column: str) -> list[Item]:
    text, _ = decode_text(path.read_bytes(), str(path))
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        dialogue = row.get(column, row.get("dialogue")) if isinstance(row, dict) else None
        if not isinstance(dialogue, str) or not dialogue.strip():
            raise ConfigError(f"{path} line {n}: expected a JSON object with a non-empty \"{column}\" "
                              "(data.dialogue_column); fix or delete that line")
        items.append(Item(str(row.get(id_column, f"{path}:{n}")), f"{path}:{n}", dialogue))
    return items


def check_out(out: Path, inputs: list[str]) -> None:
    """Before any model loads: --out must not be an input, and its folder must take a file."""
    resolved = out.resolve()
    for arg in inputs:
        if arg != "-" and Path(arg).exists() and (Path(arg).resolve() == resolved
                                                  or resolved.is_relative_to(Path(arg).resolve())):
            raise ConfigError(f"--out {out} is one of the inputs ({arg}); write the summaries to another file")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a file, e.g. {out / 'summaries.jsonl'}")
    folder = next(p for p in out.parents if p.exists())  # "." at the latest
    if not folder.is_dir():
        raise ConfigError(f"cannot write --out {out}: {folder} is a file, not a folder; pick a file in a folder you "
                          "can write to")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write --out {out} ({e.strerror}); pick a file in a folder you can write to") from None


def _whole_lines(blob: bytes) -> list[tuple[str, str]]:
    """(id, line) for each whole JSON line of a summaries file; a line cut short by a kill is left out."""
    rows = []
    for line in blob.split(b"\n"):
        try:
            rows.append((str(json.loads(line)["id"]), line.decode("utf-8")))
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def done_ids(out: Path) -> set[str]:
    """Ids already in --out from an earlier run (a line cut short by a kill is dropped from the file)."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    blob = out.read_bytes()
    rows = _whole_lines(blob)
    whole = "".join(line + "\n" for _, line in rows)
    # A torn last line (or a whole one that lost its newline, which the next append would run into): rewrite
    # the file with the whole lines only.
    if whole.encode("utf-8") != blob:
        write_text_atomic(out, whole)
    return {i for i, _ in rows}


def part_file(out: Path, rank: int) -> Path:
    """Where process `rank` of a run of several writes its summaries: each file has one writer, so lines of two
    processes never interleave (appends to one shared file are not atomic on NFS, nor once a write is split)."""
    return out.with_name(f"{out.name}.part-{rank}")


def merge_parts(out: Path) -> set[str]:
    """Append the part files of a run of several processes to --out, each id once (a torn line dropped), delete
    them, and return the ids --out then holds. The main process calls it at the end of such a run, and at the
    start of every run for what a killed one left; a kill in here leaves the parts, and the next call skips
    the ids already appended."""
    done = done_ids(out)
    parts = [p for p in sorted(out.parent.glob(glob.escape(out.name) + ".part-*"))
             if p.name.rpartition("-")[2].isdigit()]  # out.part-0, out.part-1, ...: what part_file names
    if not parts:
        return done
    with open(out, "a", encoding="utf-8") as sink:
        for part in parts:
            new = []
            for i, line in _whole_lines(part.read_bytes()):
                if i not in done:
                    done.add(i)
                    new.append(line + "\n")
            sink.write("".join(new))
        sink.flush()
        os.fsync(sink.fileno())
    for part in parts:
        part.unlink()
    return done


def _trained_on_person_tags(adapter: str | None) -> bool:
    """Whether the adapter's training dialogues used DialogSum's `#Person1#:` speakers (what its run's
    prepare_report.json says; DialogSum's form when nothing says otherwise)."""
    report = Path(adapter) / "prepare_report.json" if adapter else None
    if report is None or not report.is_file():
        return True
    try:
        return bool(json.loads(report.read_text(encoding="utf-8")).get("person_tags", True))
    except (OSError, ValueError, AttributeError):
        return True


def run(cfg: RunConfig, adapter: str | None, inputs: list[str],
        out: Path | None) -> tuple[list[dict], list[str]] | None:
    """Summaries (printed, or streamed to --out as each batch finishes) and the inputs that failed; None on the
    other processes of a run under accelerate launch / torchrun (the main one reports for all)."""
    if "-" in inputs and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("standard input (-) cannot be split over several processes; save it to a file and pass "
                          "that, or run one process")
    from accelerate.utils import broadcast_object_list, gather_object

    # The timeout: the gather at the end waits for the slowest share, on a big corpus longer than the default
    # 10-30 min.
    state = process_state(cfg.generation, timeout=timedelta(days=1))
    main, processes = state.is_main_process, state.num_processes
    if out is not None:
        check_out(out, inputs)
    with contextlib.nullcontext() if main else console.capture():  # every process reads them; one says so
        items, problems = read_inputs(inputs, cfg.data.dialogue_column, cfg.data.id_column)
    # Only the main process touches --out before the work starts; the others wait here for the ids it holds.
    [skip] = broadcast_object_list([merge_parts(out) if out is not None and main else set()])
    todo = [it for it in items if it.id not in skip]
    if skip and main:
        info(f"{out} already holds {len(items) - len(todo)} of these summaries; summarizing the other {len(todo)}")
    if not adapter and main:
        warn("no --adapter: the base model summarizes as it is (a base model often continues the dialogue instead)")
    results: list[dict] = []
    if not todo:
        return (results, problems) if main else None
    # Every process takes every n-th pending dialogue: the same split on each, and alike shares even for a corpus
    # sorted by length.
    mine = todo[state.process_index :: processes]
    rename = _trained_on_person_tags(adapter)
    normalized = [normalize(it.text, rename) for it in mine]
    loaded = load_for_inference(cfg, adapter)
    fold_adapter(loaded)
    sink = None
    if out is not None:
        sink = open(out if processes == 1 else part_file(out, state.process_index), "a", encoding="utf-8")

    with progress(disable=not main) as bar:
        # With several processes the bar follows the main process's share (the shares are alike).
        task = bar.add_task("summarize", total=len(mine), stats="")
        started = time.perf_counter()

        def finished(batch):
            rows = []
            for i, g in batch:
                it, (_, names) = mine[i], normalized[i]
                if g.truncated_input:
                    warn(f"{it.source} is longer than generation.max_input_tokens "
                         f"({cfg.generation.max_input_tokens}); its end was cut before summarizing")
                rows.append({"id": it.id, "source": it.source, "summary": restore_names(g.text, names),
                             "run_on": g.run_on})
            if sink is not None:  # one write and flush per batch: a kill loses at most the batch in flight
                sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                sink.flush()
                os.fsync(sink.fileno())
            results.extend(rows)
            rate = len(results) * processes / (time.perf_counter() - started)
            bar.update(task, advance=len(batch), stats=f"{rate:.1f} dialogues/s")

        try:
            generate(loaded, [d for d, _ in normalized], cfg.data.instruction, cfg.generation, finished)
        finally:
            if sink is not None:
                sink.close()
    results = gather_object(results)  # waits for every process to finish its share
    if not main:
        return None
    if out is not None and processes > 1:
        merge_parts(out)
    order = {it.id: k for k, it in enumerate(todo)}
    return sorted(results, key=lambda r: order[r["id"]]), problems
