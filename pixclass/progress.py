"""Progress bars and messages on stderr (stdout stays free for --json output)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: long paths stay on one line (greppable logs); markup off for messages with user paths
console = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning on stderr, for code that has no Reporter at hand; never silenced."""
    console.print(Text("warning: ", style="yellow") + Text(message))


class Reporter:
    """Where long work reports to. `quiet` silences bars and info lines, never warnings."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message, markup=False)

    def warn(self, message: str) -> None:
        warn(message)

    @contextmanager
    def bar(self, description: str, total: int, stats: bool = False):
        """A progress bar with ETA; `stats` adds a free-text field updated with `update(..., stats=...)`."""
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        if stats:
            columns.append(TextColumn("{task.fields[stats]}"))
        with Progress(*columns, console=console, disable=self.quiet, transient=False) as progress:
            task = progress.add_task(description, total=total, stats="")
            yield _Bar(progress, task)


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, stats: str | None = None) -> None:
        fields = {"stats": stats} if stats is not None else {}
        self._progress.update(self._task, advance=n, **fields)
