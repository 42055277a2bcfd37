"""The `phi2sum` command: one thin function per verb. Each parses options, calls the core, prints.

Errors from the core (Phi2sumError) become one red line per problem and exit code 2 (bad config or
usage) or 1 (runtime failure); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import enum
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .config import ConfigError, Phi2sumError, RunConfig, load_config, looks_local, to_yaml
from .console import console, error, info, warn

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  help="Fine-tune a small causal LM (Phi-2 by default) on dialogue summarization with "
                       "LoRA/QLoRA, evaluate it with ROUGE, use it, publish it.")

ConfigOpt = typer.Option(None, "--config", "-c", help="Run config YAML (see configs/). Defaults apply without one.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: section.field=value (repeatable), "
                                                  "e.g. --set train.learning_rate=1e-4")
DryOpt = typer.Option(False, "--dry-run", help="Print the resolved config and what would run, then exit.")
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")
AdapterOpt = typer.Option(None, "--adapter", "-a", help="Run directory from `train` (or a hub adapter id).")


class Compare(str, enum.Enum):
    base = "base"
    none = "none"


class Dtype(str, enum.Enum):
    auto = "auto"
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


def _version(value: bool):
    if value:
        from importlib.metadata import version

        print(f"phi2sum {version('phi2sum')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Fine-tune a small causal LM (Phi-2 by default) on dialogue summarization with LoRA/QLoRA, evaluate it
    with ROUGE, use it, publish it."""


def _run(debug: bool, fn, *args, **kwargs):
    """Call the core; turn its errors into one line per problem and the right exit code."""
    try:
        return fn(*args, **kwargs)
    except Phi2sumError as e:
        if debug:
            raise
        # A config or usage error comes from what every process of a launch reads alike: one of them says it.
        if e.exit_code != ConfigError.exit_code or int(os.environ.get("RANK", "0")) == 0:
            error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        error("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # anything else is our bug or the environment's: still one line, exit 1
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        error(f"{type(e).__name__}: {first} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None


def _config(config: Optional[Path], overrides: Optional[list[str]], debug: bool,
            adapter: Optional[str | Path] = None) -> RunConfig:
    """Verbs that read a run take the run's saved config as the base, unless --config names another;
    for a bare adapter (no run config), the base model comes from its adapter_config.json."""
    overrides = list(overrides or [])
    if adapter is not None and config is None:
        if (Path(adapter) / "config.yaml").is_file():
            from .runs import saved_config

            raw = _run(debug, saved_config, Path(adapter))
            return _run(debug, load_config, Path(adapter) / "config.yaml", overrides, raw)
        if not any(o.startswith("model.name=") for o in overrides):
            from .modeling import read_adapter_base

            base = read_adapter_base(str(adapter))
            if base:
                overrides.insert(0, f"model.name={base}")
            elif not looks_local(str(adapter)) and str(adapter).count("/") == 1:  # a hub id we could not read
                error(f"cannot read {adapter}'s adapter_config.json from the Hub (offline, or no such repo), so its "
                      "base model is unknown; download the adapter into a folder and pass that, or name the base "
                      "with --set model.name=...")
                raise typer.Exit(2)
    return _run(debug, load_config, config, overrides)


def _dry_run(cfg: RunConfig, what: str) -> None:
    print(to_yaml(cfg), end="")
    info(f"[bold]dry run:[/bold] would {what}")


@app.command()
def prepare(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, dry_run: bool = DryOpt,
            debug: bool = DebugOpt):
    """Load the data, build prompts, tokenize with summary-only labels, cache it and print a report."""
    cfg = _config(config, set_, debug)
    from . import data

    if dry_run:
        d = cfg.data
        source = " and ".join(dict.fromkeys(d.files.get(s, d.source) for s in (d.train_split, d.validation_split)))
        return _dry_run(cfg, f"tokenize {d.train_split}/{d.validation_split} of {source} "
                             f"with the tokenizer of {cfg.model.name} into {data.cache_folder(cfg.data)}")
    from . import modeling

    def go():
        tok = modeling.load_tokenizer(cfg.model)
        with console.status("preparing data"):
            return data.prepare(cfg.data, tok)

    prepared = _run(debug, go)
    report = prepared.report
    table = Table(title=f"prepared data ({'reused cache' if prepared.cached else 'new'}: {prepared.path})")
    for col in ("split", "rows kept", "skipped empty", "summary too long", "truncated",
                "prompt tok p50/p95/max", "summary tok p50/p95/max", "tokens"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, r in report["splits"].items():
        p, s = r["prompt_tokens"], r["summary_tokens"]
        table.add_row(split, f"{r['rows_kept']:,}", str(r["skipped_empty"]), str(r["dropped_summary_too_long"]),
                      str(r["dialogues_truncated"]), f"{p['p50']}/{p['p95']}/{p['max']}",
                      f"{s['p50']}/{s['p95']}/{s['max']}", f"{r['real_tokens']:,}")
    console.print(table)
    info(f"prompt format: {report['prompt_format']}, summaries end with {report['stop_token']!r}; "
         f"report: {prepared.path / 'report.json'}")


@app.command()
def train(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, dry_run: bool = DryOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue the run in train.output_dir from its "
                                                              "newest valid checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run in output_dir first."),
          debug: bool = DebugOpt):
    """Train a LoRA adapter (QLoRA on CUDA) and write the run directory."""
    cfg = _config(config, set_, debug)
    if dry_run:
        what = (f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}" if cfg.lora.enabled
                else "full fine-tune of every weight")
        return _dry_run(cfg, f"train {cfg.model.name} ({cfg.model.quantization}, {what}) into {cfg.train.output_dir}")
    from . import train as train_mod

    result = _run(debug, train_mod.train, cfg, overwrite=overwrite, resume=resume)
    if result.stopped == "interrupted":
        error(f"interrupted at step {result.steps}; checkpoint saved. Continue with: {_resume_command(config, set_)}")
        raise typer.Exit(130)
    table = Table(title=f"run {result.run_dir}")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [("steps", f"{result.steps}/{result.total_steps} ({result.stopped})"),
            ("train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
            ("best validation loss", f"{result.best_eval_loss:.4f} (step {result.best_step})"
             if result.best_eval_loss is not None else "-"),
            ("real tokens", f"{result.real_tokens:,}"), ("tokens/s", f"{result.tokens_per_second:,.0f}"),
            ("time", f"{result.seconds:,.1f} s"),
            ("peak memory", f"{result.peak_memory_gib:.2f} GiB (reserved {result.peak_reserved_gib:.2f})"
             if result.peak_memory_gib is not None else "n/a (CPU)"),
            ("device", f"{result.device}, {result.precision}, {result.world_size} process(es)")]
    if result.skipped_steps:
        rows.append(("skipped updates", f"{result.skipped_steps} (non-finite loss or gradients; see metrics.jsonl)"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _resume_command(config: Optional[Path], overrides: Optional[list[str]]) -> str:
    """The command that continues this run: its --config and every --set the user gave, plus --resume."""
    launcher = ["accelerate", "launch", "-m", "phi2sum"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["phi2sum"]
    args = (["--config", str(config)] if config else []) + [a for o in overrides or [] for a in ("--set", o)]
    return shlex.join([*launcher, "train", *args, "--resume"])


@app.command("eval")
def eval_(config: Optional[Path] = ConfigOpt, adapter: Optional[str] = AdapterOpt, set_: Optional[list[str]] = SetOpt,
          compare: Compare = typer.Option(Compare.base, "--compare", help="Also score the base model (the adapter "
                                          "switched off), or nothing else."),
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N test dialogues "
                                              "(1 or more; omit for all)."),
          out: Optional[Path] = typer.Option(None, "--out", help="Folder for predictions and metrics "
                                             "(default <run>/eval)."),
          dry_run: bool = DryOpt, debug: bool = DebugOpt):
    """ROUGE on the test split: fine-tuned vs base, one table, predictions and metrics saved."""
    run_dir = Path(adapter) if adapter and Path(adapter).is_dir() else None
    overrides = list(set_ or []) + ([f"eval.limit={limit}"] if limit is not None else [])
    cfg = _config(config, overrides, debug, adapter)
    compare = compare.value
    from . import runs

    target = runs.eval_dir(run_dir, cfg, out)
    if dry_run:
        return _dry_run(cfg, f"generate summaries for {cfg.eval.limit or 'all'} {cfg.data.test_split} dialogues with "
                             f"{adapter or cfg.model.name}{' and the base' if adapter and compare == 'base' else ''}, "
                             f"score ROUGE, write {target}")
    from . import evaluate

    result = _run(debug, evaluate.run_eval, cfg, adapter, compare == "base", target)
    if result is not None:  # under `accelerate launch`, only the main process reports
        console.print(evaluate.results_table(result))
        info(f"predictions and metrics: {target}")


@app.command()
def summarize(inputs: list[str] = typer.Argument(..., help="Dialogue text files, folders of .txt files, a "
                                                 ".jsonl file (one {\"dialogue\": ...} per line, or the run's "
                                                 "data.dialogue_column), or - for stdin."),
              adapter: Optional[str] = AdapterOpt, config: Optional[Path] = ConfigOpt,
              set_: Optional[list[str]] = SetOpt,
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write summaries here (JSON lines) "
                                                 "instead of printing them."),
              dry_run: bool = DryOpt, debug: bool = DebugOpt):
    """Summarize your own dialogues (`Tom: hi` lines or DialogSum's `#Person1#:` form)."""
    cfg = _config(config, set_, debug, adapter)
    if dry_run:
        return _dry_run(cfg, f"summarize {', '.join(inputs)} with {adapter or cfg.model.name}")
    from . import summarize as summ

    result = _run(debug, summ.run, cfg, adapter, inputs, out)
    if result is None:  # under `accelerate launch`, only the main process reports
        return
    results, problems = result
    run_on = [r for r in results if r["run_on"]]
    if out is None:
        for r in results:
            console.print(f"[bold]{escape(r['source'])}[/bold]" + (" [yellow](ran on past its summary)[/yellow]"
                                                                   if r["run_on"] else ""))
            print(r["summary"], flush=True)
    else:
        info(f"wrote {len(results)} summaries to {out}")
    if run_on:
        warn(f"{len(run_on)} output(s) ran on past the summary (the model went on with the dialogue), marked "
             "above or with \"run_on\": true; an adapter trained with `phi2sum train` stops at its summary")
    for p in problems:
        error(p)
    if problems:
        error(f"{len(problems)} input(s) could not be summarized (named above); the others were")
        raise typer.Exit(1)


@app.command()
def push(adapter: Path = typer.Option(..., "--adapter", "-a", help="Run directory from `train`."),
         repo: Optional[str] = typer.Option(None, "--repo", help="Hub repo id, user/name (default: push.repo_id)."),
         private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility when creating the repo."),
         revision: Optional[str] = typer.Option(None, "--revision", "--branch", help="Branch to push to."),
         commit_message: str = typer.Option("Upload phi2sum adapter", "--commit-message", "-m"),
         config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
         dry_run_dir: Optional[Path] = typer.Option(None, "--dry-run", help="Build the folder that would be "
                                                    "uploaded in this directory and list it; no network."),
         eval_dir: Optional[Path] = typer.Option(None, "--eval-dir", help="Folder `phi2sum eval` wrote (default: "
                                                 "where eval writes for this run)."),
         debug: bool = DebugOpt):
    """Upload the adapter, tokenizer, config, metrics and a model card to the Hugging Face Hub."""
    cfg = _config(config, set_, debug, adapter)
    repo = repo or cfg.push.repo_id
    from . import hub

    result = _run(debug, hub.push, adapter, cfg, repo, private=cfg.push.private if private is None else private,
                  revision=revision, commit_message=commit_message, dry_run_dir=dry_run_dir, eval_dir=eval_dir)
    if dry_run_dir is not None:
        table = Table(title=f"would upload to {repo or '<repo>'} (staged in {dry_run_dir})")
        table.add_column("file")
        table.add_column("bytes", justify="right")
        for name, size in result["files"]:
            table.add_row(name, f"{size:,}")
        console.print(table)
    else:
        info(f"pushed to {result['url']}")


@app.command()
def merge(adapter: Path = typer.Option(..., "--adapter", "-a", help="Run directory from `train`."),
          out: Path = typer.Option(..., "--out", "-o", help="Folder for the standalone merged model."),
          dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="auto: bf16 where supported, else fp16; fp32 on "
                                      "CPU."),
          config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, debug: bool = DebugOpt):
    """Merge the adapter into an unquantized base and save a model plain transformers can load."""
    cfg = _config(config, set_, debug, adapter)
    from . import modeling

    path = _run(debug, modeling.merge, adapter, cfg, out, dtype.value)
    info(f"merged model saved to {path}")


config_app = typer.Typer(no_args_is_help=True, help="Inspect the run configuration.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, debug: bool = DebugOpt):
    """Every config field with its value (the defaults, or --config/--set resolved) and what it does."""
    cfg = _config(config, set_, debug)
    table = Table(title=f"phi2sum config ({config or 'defaults'})", show_lines=False)
    for col in ("field", "value", "what it does"):
        table.add_column(col, overflow="fold")
    for section in type(cfg).model_fields:
        part = getattr(cfg, section)
        for name, field in type(part).model_fields.items():
            doc = " ".join((field.description or "").split())
            table.add_row(f"{section}.{name}", escape(repr(getattr(part, name))), escape(doc))
    console.print(table)


def main():
    # Keep library chatter (progress bars of datasets/transformers, advisory warnings) off our output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own tqdm bars (GGUF loading); ours are rich's
    import warnings

    # Deprecation notices from inside transformers/peft/torch are for their developers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    try:
        _run_app()
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, a process that exits with its process group still up can abort at
    interpreter exit, in the group's own threads ("terminate called without an active exception", exit -6) after
    its work is done; leaving the group first ends it cleanly. Only where torch is loaded already."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_app() -> None:
    try:
        # standalone_mode=False returns the exit code of typer.Exit instead of raising it.
        code = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors: one line, exit 2
        import click

        # Newer typer raises usage errors from its own bundled click (typer.TyperException), older
        # typer from click itself: both are a user's typo, never a traceback.
        usage = (click.ClickException,) + ((typer.TyperException,) if hasattr(typer, "TyperException") else ())
        if isinstance(e, usage) and hasattr(e, "format_message"):
            error(e.format_message())
            sys.exit(e.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
