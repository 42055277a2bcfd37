"""One rich console for the whole tool, and the few ways we talk to people through it."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Wide enough for our tables when output goes to a file or CI log (rich assumes 80 columns there).
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    # Text.assemble: user-supplied text (paths, column names) must never be parsed as rich markup.
    console.print(Text.assemble(("warning: ", "yellow"), msg), soft_wrap=True)


def error(msg: str) -> None:
    for line in msg.splitlines() or [""]:
        console.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


def progress(disable: bool = False) -> Progress:
    """The bar for long work; disable=True keeps its bookkeeping but draws nothing (other processes)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False, disable=disable)
