"""Data: every source format loads the same rows, labels cover the summary and its stop token only,
truncation cuts dialogues and never summaries, prepare caches and reports, bad input is one clear line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SLICE
from phi2sum import data
from phi2sum.cli import app
from phi2sum.config import ConfigError, DataConfig, ModelConfig
from phi2sum.modeling import load_tokenizer
from phi2sum.train import collate

runner = CliRunner()


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # Arrow files that datasets writes while reading local files stay out of the user's HF cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="package")
def plain_tok(tiny_model):
    """Phi-2's case: no pad token in the files, so load_tokenizer makes pad == EOS == the stop token."""
    return load_tokenizer(ModelConfig(name=str(tiny_model), quantization="none"))


@pytest.fixture(scope="package")
def chat_tok(tiny_chat_model):
    return load_tokenizer(ModelConfig(name=str(tiny_chat_model), quantization="none"))


def slice_rows(split: str, n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (SLICE / f"{split}.jsonl").read_text().splitlines()]
    return rows[:n] if n else rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------------
# Sources: each format gives the same dialogues and references


def _numbered(rows):
    # DialogSum's official test layout: summary1..3 columns instead of a list.
    return [{"id": r["id"], "dialogue": r["dialogue"], **{f"summary{i + 1}": s for i, s in enumerate(r["summaries"])}}
            for r in rows]


def _write_source(fmt: str, rows: list[dict], folder: Path) -> DataConfig:
    import datasets
    import pandas as pd

    folder.mkdir()
    if fmt == "jsonl":
        write_jsonl(folder / "test.jsonl", rows)
    elif fmt == "jsonl.gz":
        with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":  # one JSON array, not JSON lines
        (folder / "test.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "csv":  # no lists in CSV: the references go in summary1..3
        pd.DataFrame(_numbered(rows)).to_csv(folder / "test.csv", index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(folder / "test.parquet")
    elif fmt == "saved DatasetDict":
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "saved"))
        return DataConfig(source=str(folder / "saved"))
    elif fmt == "saved Dataset in data.files":
        datasets.Dataset.from_list(rows).save_to_disk(str(folder / "one"))
        return DataConfig(source="not/used", files={"test": str(folder / "one")})
    return DataConfig(source=str(folder))


FORMATS = ["jsonl", "jsonl.gz", "json", "csv", "parquet", "saved DatasetDict", "saved Dataset in data.files"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_source_format_loads_the_same_rows(tmp_path, fmt):
    rows = slice_rows("test", 12)
    cfg = _write_source(fmt, rows, tmp_path / "src")
    got = data.load_split(cfg, "test")
    assert got.ids == [r["id"] for r in rows]
    assert got.dialogues == [r["dialogue"].strip() for r in rows]
    assert got.references == [r["summaries"] for r in rows]  # all three references, in order
    assert got.skipped == 0


def test_shipped_slice_train_and_test(tmp_path):
    cfg = DataConfig(source=str(SLICE))
    train = data.load_split(cfg, "train")
    assert len(train.ids) == 400 and all(len(refs) == 1 for refs in train.references)
    test = data.load_split(cfg, "test")
    assert [len(refs) for refs in test.references] == [3] * 40
    assert len(data.load_split(cfg.model_copy(update={"max_rows": {"train": 7}}), "train").ids) == 7


def test_custom_column_names(tmp_path):
    rows = [{"fname": r["id"], "conversation": r["dialogue"], "gold": r["summary"]}
            for r in slice_rows("validation", 6)]
    cfg = DataConfig(files={"validation": str(write_jsonl(tmp_path / "v.jsonl", rows))}, dialogue_column="conversation",
                     summary_column="gold", id_column="fname", references_column=None)
    got = data.load_split(cfg, "validation")
    assert got.ids == [r["fname"] for r in rows]
    assert got.dialogues == [r["conversation"].strip() for r in rows]
    assert got.references == [[r["gold"]] for r in rows]


def test_numbered_summary_columns_become_references(tmp_path):
    rows = [{"fname": r.pop("id"), **r} for r in _numbered(slice_rows("test", 5))]
    cfg = DataConfig(files={"test": str(write_jsonl(tmp_path / "official.jsonl", rows))}, id_column="fname")
    got = data.load_split(cfg, "test")
    assert got.ids == [r["fname"] for r in rows]
    assert got.references == [[r["summary1"], r["summary2"], r["summary3"]] for r in rows]


def test_a_string_in_the_references_column_is_one_reference(tmp_path):
    rows = [{"dialogue": r["dialogue"], "summaries": r["summary"]} for r in slice_rows("validation", 3)]
    cfg = DataConfig(files={"validation": str(write_jsonl(tmp_path / "v.jsonl", rows))})
    assert data.load_split(cfg, "validation").references == [[r["summaries"]] for r in rows]


def test_repeated_dialogues_merge_into_several_references(tmp_path):
    # The hub's DialogSum test repeats each dialogue once per reference.
    source = slice_rows("test", 4)
    rows = [{"id": f"{r['id']}_{k}", "dialogue": r["dialogue"], "summary": s}
            for r in source for k, s in enumerate(r["summaries"])]
    cfg = DataConfig(files={"test": str(write_jsonl(tmp_path / "t.jsonl", rows))})
    merged = data.load_split(cfg, "test", merge_duplicates=True)
    assert merged.ids == [f"{r['id']}_0" for r in source]
    assert merged.references == [r["summaries"] for r in source]
    assert len(data.load_split(cfg, "test").ids) == 12


# ----------------------------------------------------------------------------------------------------
# Labels: the loss sees the summary and the exact stop token, nothing else


def _check_example(tok, fmt: str, dialogue: str, summary: str, ids: list[int], plen: int, instruction: str):
    stop_id = data.stop_ids(tok, fmt)[0]
    labels = data.labels_for(ids, plen)
    assert len(labels) == len(ids)
    assert labels[:plen] == [-100] * plen
    assert all(x != -100 for x in labels[plen:])
    # The first label is the first summary token, the last is the token generation stops at.
    assert labels[plen:] == tok(summary, add_special_tokens=False)["input_ids"] + [stop_id]
    assert ids[:plen] == data.prompt_ids(tok, data.build_prompt(tok, dialogue, fmt, instruction), fmt)
    # The whole sequence is what the prompt format writes for a finished answer.
    text = tok.decode(ids)
    if fmt == "plain":
        assert text == data.PLAIN_TEMPLATE.format(instruction=instruction, dialogue=dialogue) + summary + tok.eos_token
    else:
        messages = [{"role": "user", "content": f"{instruction}\n\n{dialogue}"},
                    {"role": "assistant", "content": summary}]
        assert tok.apply_chat_template(messages, tokenize=False).startswith(text)
        assert text.endswith(summary + "<|im_end|>")


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_labels_mask_the_prompt_and_end_with_the_stop_token(which, plain_tok, chat_tok):
    tok = plain_tok if which == "plain" else chat_tok
    cfg = DataConfig(source=str(SLICE), max_rows={"validation": 8})
    fmt = data.resolve_format(cfg, tok)
    assert fmt == which
    stop = data.stop_token(tok, fmt)
    stop_id = tok.convert_tokens_to_ids(stop)
    if which == "plain":
        assert stop == tok.eos_token == "<|endoftext|>"
        assert tok.pad_token_id == tok.eos_token_id == stop_id  # Phi-2's case
        assert data.stop_ids(tok, fmt) == [stop_id]
    else:
        assert stop == "<|im_end|>" and stop_id != tok.eos_token_id  # training on EOS here would be wrong
        assert data.stop_ids(tok, fmt) == [stop_id, tok.eos_token_id]

    rows = data.load_split(cfg, "validation")
    columns, report = data.tokenize_split(cfg, tok, rows, fmt)
    assert report["rows_kept"] == len(columns["input_ids"]) == 8
    examples = zip(rows.dialogues, rows.references, columns["input_ids"], columns["prompt_length"])
    for dialogue, refs, ids, plen in examples:
        _check_example(tok, fmt, dialogue, refs[0], ids, plen, cfg.instruction)


def test_collate_keeps_the_stop_token_when_pad_equals_it(plain_tok):
    tok = plain_tok
    stop_id = data.stop_ids(tok, "plain")[0]
    assert tok.pad_token_id == stop_id
    cfg = DataConfig(source=str(SLICE), max_rows={"validation": 4})
    columns, _ = data.tokenize_split(cfg, tok, data.load_split(cfg, "validation"), "plain")
    rows = list(zip(columns["input_ids"], columns["prompt_length"]))
    assert len({len(ids) for ids, _ in rows}) > 1  # some rows get padded
    batch = collate(rows, tok.pad_token_id)
    for i, (ids, plen) in enumerate(rows):
        labels = batch["labels"][i]
        assert labels[len(ids) - 1].item() == stop_id  # the stop token is trained on...
        assert (labels[len(ids):] == -100).all()  # ...padding (the same id) is not
        assert (batch["input_ids"][i, len(ids):] == tok.pad_token_id).all()
        assert labels[:plen].eq(-100).all()
        assert labels[plen:len(ids)].tolist() == ids[plen:]
        assert batch["attention_mask"][i].sum().item() == len(ids)
    assert int((batch["labels"] == stop_id).sum()) == len(rows)


# ----------------------------------------------------------------------------------------------------
# Truncation: the dialogue is shortened, the summary never; summaries too long are dropped and counted


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_long_dialogue_is_shortened_and_the_summary_kept(which, plain_tok, chat_tok):
    tok = plain_tok if which == "plain" else chat_tok
    fmt = which
    short, long_ = slice_rows("train", 2)
    long_dialogue = "\n".join(f"#Person{i % 2 + 1}#: This is turn {i} of a very long talk." for i in range(300))
    rows = data.Rows(["a", "b"], [short["dialogue"].strip(), long_dialogue],
                     [[short["summary"]], [long_["summary"]]], "memory")
    cfg = DataConfig(max_length=512, max_summary_tokens=96)
    assert len(data.prompt_ids(tok, data.build_prompt(tok, long_dialogue, fmt, cfg.instruction), fmt)) > 1000
    columns, report = data.tokenize_split(cfg, tok, rows, fmt)
    assert report["dialogues_truncated"] == 1 and report["rows_kept"] == 2
    (ids0, ids1), (plen0, plen1) = columns["input_ids"], columns["prompt_length"]
    _check_example(tok, fmt, short["dialogue"].strip(), short["summary"], ids0, plen0, cfg.instruction)
    assert len(ids1) <= cfg.max_length
    stop_id = data.stop_ids(tok, fmt)[0]
    assert ids1[plen1:] == tok(long_["summary"], add_special_tokens=False)["input_ids"] + [stop_id]
    prompt = tok.decode(ids1[:plen1])
    assert cfg.instruction in prompt  # the instruction and the answer cue survive
    assert prompt.endswith("Output:\n" if fmt == "plain" else "<|im_start|>assistant\n")
    assert "turn 0 of" in prompt and "turn 299 of" not in prompt  # cut from the end
    assert " ..." in prompt


def test_summary_too_long_is_dropped_and_counted(plain_tok):
    rows_in = slice_rows("train", 3)
    rows = data.Rows([r["id"] for r in rows_in], [r["dialogue"] for r in rows_in],
                     [[r["summary"]] for r in rows_in], "memory")
    rows.references[1] = [" ".join([rows_in[1]["summary"]] * 10)]
    # Room for the two normal summaries and their stop token, not for the long one.
    limit = max(len(plain_tok(r["summary"])["input_ids"]) + 1 for r in (rows_in[0], rows_in[2]))
    cfg = DataConfig(max_summary_tokens=limit, max_length=2048)
    columns, report = data.tokenize_split(cfg, plain_tok, rows, "plain")
    assert report["dropped_summary_too_long"] == 1 and report["rows_kept"] == 2 and report["rows_read"] == 3
    assert report["dialogues_truncated"] == 0
    assert report["summary_tokens"]["max"] == limit
    kept_prompts = [plain_tok.decode(ids[:plen]) for ids, plen in zip(columns["input_ids"], columns["prompt_length"])]
    assert rows_in[1]["dialogue"] not in "".join(kept_prompts)


# ----------------------------------------------------------------------------------------------------
# prepare: cached, keyed by config + tokenizer + files, atomic, with a report


def _prep_cfg(tmp_path: Path, **kw) -> DataConfig:
    # Lengths that fit every one of these rows in the tiny tokenizer's (long) tokens: nothing cut or dropped.
    return DataConfig(source=str(SLICE), max_rows={"train": 16, "validation": 4}, max_length=1024,
                      max_summary_tokens=192, cache_dir=str(tmp_path / "cache"), **kw)


def test_prepare_caches_and_reports(tmp_path, plain_tok):
    cfg = _prep_cfg(tmp_path)
    first = data.prepare(cfg, plain_tok)
    assert not first.cached
    assert first.path.parent == tmp_path / "cache"
    saved = json.loads((first.path / "report.json").read_text())
    assert saved == first.report
    assert saved["prompt_format"] == "plain" and saved["stop_token"] == "<|endoftext|>"
    for split, n in (("train", 16), ("validation", 4)):
        rep = saved["splits"][split]
        assert rep["rows_kept"] == n == len(first.splits[split])
        assert set(rep["prompt_tokens"]) == {"p50", "p90", "p95", "p99", "max"}
        assert rep["prompt_tokens"]["max"] == max(first.splits[split]["prompt_length"])
        assert rep["real_tokens"] == sum(len(x) for x in first.splits[split]["input_ids"])
        assert rep["skipped_empty"] == rep["dropped_summary_too_long"] == rep["dialogues_truncated"] == 0

    second = data.prepare(cfg, plain_tok)
    assert second.cached and second.path == first.path and second.report == first.report
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]


def test_cache_key_follows_prompt_lengths_tokenizer_and_files(tmp_path, plain_tok, chat_tok):
    cfg = _prep_cfg(tmp_path)
    key = data.cache_key(cfg, plain_tok, ["train", "validation"])
    assert key == data.cache_key(cfg.model_copy(), plain_tok, ["train", "validation"])
    assert key == data.cache_key(cfg.model_copy(update={"cache_dir": "/elsewhere"}), plain_tok, ["train", "validation"])
    changed = [cfg.model_copy(update={"instruction": "Sum it up."}), cfg.model_copy(update={"max_length": 256}),
               cfg.model_copy(update={"max_summary_tokens": 64}), cfg.model_copy(update={"max_rows": {"train": 8}})]
    keys = {key} | {data.cache_key(c, plain_tok, ["train", "validation"]) for c in changed}
    keys.add(data.cache_key(cfg, chat_tok, ["train", "validation"]))
    assert len(keys) == 6
    first = data.prepare(cfg, plain_tok)
    again = data.prepare(cfg.model_copy(update={"instruction": "Sum it up."}), plain_tok)
    assert not again.cached and again.path != first.path
    assert data.prepare(cfg.model_copy(update={"max_length": 256}), plain_tok).cached is False


def test_cache_key_follows_the_source_files(tmp_path, plain_tok):
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "train.jsonl", slice_rows("train", 8))
    write_jsonl(src / "validation.jsonl", slice_rows("validation", 4))
    cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "cache"))
    key = data.cache_key(cfg, plain_tok, ["train", "validation"])
    write_jsonl(src / "train.jsonl", slice_rows("train", 9))
    assert data.cache_key(cfg, plain_tok, ["train", "validation"]) != key

    saved = tmp_path / "saved"
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(slice_rows(s, 4)) for s in ("train", "validation")})
    dd.save_to_disk(str(saved))
    cfg = DataConfig(source=str(saved), cache_dir=str(tmp_path / "cache"))
    key = data.cache_key(cfg, plain_tok, ["train", "validation"])
    datasets.DatasetDict({s: datasets.Dataset.from_list(slice_rows(s, 5)) for s in ("train", "validation")}
                         ).save_to_disk(str(saved))
    assert data.cache_key(cfg, plain_tok, ["train", "validation"]) != key


def test_a_damaged_cache_is_rebuilt(tmp_path, plain_tok):
    cfg = _prep_cfg(tmp_path)
    first = data.prepare(cfg, plain_tok)
    for f in (first.path / "train").glob("*.arrow"):
        f.unlink()
    again = data.prepare(cfg, plain_tok)
    assert not again.cached and len(again.splits["train"]) == 16


def test_a_crash_mid_prepare_leaves_nothing_behind(tmp_path, plain_tok, monkeypatch):
    real = data.tokenize_split

    def fail_on_validation(cfg, tokenizer, rows, fmt):
        if "validation" in rows.origin:
            raise RuntimeError("disk full")
        return real(cfg, tokenizer, rows, fmt)

    monkeypatch.setattr(data, "tokenize_split", fail_on_validation)
    cfg = _prep_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        data.prepare(cfg, plain_tok)
    assert list((tmp_path / "cache").iterdir()) == []  # hidden temp folders included

    monkeypatch.setattr(data, "tokenize_split", real)
    assert not data.prepare(cfg, plain_tok).cached


def test_cli_prepare_prints_the_table_and_writes_the_report(make_config, tmp_path):
    path = make_config(data={"max_rows": {"train": 16, "validation": 4}, "max_length": 1024, "max_summary_tokens": 192})
    result = runner.invoke(app, ["prepare", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "error:" not in result.output
    for text in ("prepared data", "train", "validation", "rows kept", "16", "report.json"):
        assert text in result.output
    reports = list((tmp_path / "cache").glob("*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["splits"]["train"]["rows_kept"] == 16 and report["splits"]["validation"]["rows_kept"] == 4
    assert report["splits"]["train"]["prompt_tokens"]["p50"] > 0

    again = runner.invoke(app, ["prepare", "--config", str(path)])
    assert again.exit_code == 0 and "reused cache" in again.output


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, row or column; a few bad rows are skipped with a warning


def _bad(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A broken train file and what the error must say about it."""
    rows = slice_rows("train", 40)
    path = folder / "train.jsonl"
    if kind == "missing file":
        return folder / "nope.jsonl", ["nope.jsonl", "not found"]
    if kind == "empty file":
        path.write_bytes(b"")
        return path, ["is empty"]
    if kind == "blank lines only":
        path.write_text("\n\n  \n")
        return path, ["has no rows"]
    if kind == "CSV header only":
        path = folder / "train.csv"
        path.write_text("dialogue,summary\n")
        return path, ["has no rows"]
    if kind == "no dialogue column":
        write_jsonl(path, [{"id": r["id"], "text": r["dialogue"], "summary": r["summary"]} for r in rows])
        return path, ["no column 'dialogue'", "columns: id, summary, text", "data.dialogue_column"]
    if kind == "no summary column":
        write_jsonl(path, [{"dialogue": r["dialogue"], "abstract": r["summary"]} for r in rows])
        return path, ["no column 'summary'", "columns: abstract, dialogue", "data.summary_column"]
    if kind == "non-UTF-8":
        lines = [json.dumps(r).encode() for r in rows[:5]]
        lines[2] = lines[2].replace(b"#Person1#", b"#Person1\xe9#", 1)
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path, ["line 3", "not UTF-8"]
    if kind == "binary file":
        path.write_bytes(bytes(range(256)) * 4)
        return path, ["line 1", "binary data"]
    if kind == "not gzip":
        path = folder / "train.jsonl.gz"
        write_jsonl(path, rows)
        return path, ["cannot read"]
    if kind == "broken JSON line":  # named by its line in the file, with the way out
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-20] + "\n")
        return path, ["line 2: not valid JSON", "data.skip_bad_lines"]
    if kind == "a JSON line that is not an object":
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(["a", "list"]) + "\n")
        return path, ["line 2: not a JSON object"]
    if kind == "broken parquet":
        path = folder / "train.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
        return path, ["cannot load split 'train'"]
    if kind == "all dialogues empty":
        write_jsonl(path, [dict(r, dialogue="  ") for r in rows])
        return path, ["40 of 40 rows", "empty 'dialogue' (40)", "row 1 (id train_0)"]
    if kind == "many summaries empty":
        write_jsonl(path, [dict(r, summary="") if i % 2 else r for i, r in enumerate(rows)])
        return path, ["20 of 40 rows", "'summary' (20)", "row 2 (id train_1)"]
    raise AssertionError(kind)


BAD = ["missing file", "empty file", "blank lines only", "CSV header only", "no dialogue column", "no summary column",
       "non-UTF-8", "binary file", "not gzip", "broken JSON line", "a JSON line that is not an object",
       "broken parquet", "all dialogues empty", "many summaries empty"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_clear_error(tmp_path, plain_tok, kind):
    path, needles = _bad(kind, tmp_path)
    cfg = DataConfig(source=str(SLICE), files={"train": str(path)}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        data.load_split(cfg, "train")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message
    with pytest.raises(ConfigError):
        data.prepare(cfg, plain_tok)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("kind", ["missing file", "empty file", "no dialogue column", "non-UTF-8", "binary file",
                                  "broken JSON line", "all dialogues empty"])
def test_cli_bad_input_exits_2_with_one_line(make_config, tmp_path, kind):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    path, needles = _bad(kind, bad_dir)
    result = runner.invoke(app, ["prepare", "--config", str(make_config(data={"files": {"train": str(path)}}))])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and str(path) in lines[0], result.output
    for needle in needles:
        assert needle in lines[0]
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_split_file_in_a_source_folder(tmp_path):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "train.jsonl", slice_rows("train", 3))
    with pytest.raises(ConfigError, match=r"no file for split 'validation' in .*src.*data\.files"):
        data.load_split(DataConfig(source=str(tmp_path / "src")), "validation")


def test_missing_split_in_a_saved_dataset(tmp_path):
    import datasets

    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(slice_rows("train", 3))})
    saved.save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"no split 'validation' \(it has train\)"):
        data.load_split(DataConfig(source=str(tmp_path / "s")), "validation")


@pytest.mark.parametrize("column", ["dialogue", "summary"])
def test_a_few_empty_rows_are_skipped_with_a_warning(tmp_path, plain_tok, capsys, column):
    rows = slice_rows("train")
    rows[5][column] = "" if column == "summary" else "   "
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(source=str(SLICE), files={"train": str(path)}, max_rows={"validation": 4},
                     cache_dir=str(tmp_path / "cache"))
    got = data.load_split(cfg, "train")
    assert got.skipped == 1 and len(got.ids) == 399 and "train_5" not in got.ids
    err = capsys.readouterr().err
    assert "warning:" in err and "skipped 1 of 400 rows" in err and "row 6 (id train_5)" in err
    assert f"'{column}' (1)" in err
    report = data.prepare(cfg, plain_tok).report["splits"]["train"]
    assert report["skipped_empty"] == 1 and report["rows_read"] == 400
    assert report["rows_kept"] + report["dropped_summary_too_long"] == 399


def test_cli_warns_about_a_few_empty_rows(make_config, tmp_path):
    rows = slice_rows("train")
    rows[3]["dialogue"] = ""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = make_config(data={"files": {"train": str(path)}, "max_rows": {"validation": 4}})
    result = runner.invoke(app, ["prepare", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "skipped 1 of 400 rows" in result.output
    assert "error:" not in result.output and "Traceback" not in result.output


def test_bad_json_lines_can_be_skipped_and_are_named(tmp_path, capsys):
    """data.skip_bad_lines: a few broken lines in a large export are skipped with a warning naming them (their
    line numbers in the file, blank lines counted), instead of stopping at the first."""
    rows = slice_rows("train", 10)
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-15]  # cut short
    lines[6] = "[1, 2]"  # not an object
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    cfg = DataConfig(files={"train": str(path)}, skip_bad_lines=True)
    got = data.load_split(cfg, "train")
    assert got.ids == [r["id"] for i, r in enumerate(rows) if i not in (2, 6)]
    assert f"{path}: skipped 2 bad line(s) (data.skip_bad_lines): 3, 8" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ConfigError, match="line 3: not valid JSON"):
        data.load_split(cfg.model_copy(update={"skip_bad_lines": False}), "train")


def test_a_file_as_data_source_says_to_name_it_per_split(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", slice_rows("train", 3))
    with pytest.raises(ConfigError, match=r"is a file, but it takes a folder .* data\.files\.train: "):
        data.load_split(DataConfig(source=str(path)), "train")
