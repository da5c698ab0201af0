"""Progress bars and messages on stderr (stdout stays free for --json output), and a run's log:
its messages kept in its folder with the time each was said."""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: long paths stay on one line (greppable logs); markup off for messages with user paths
console = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning on stderr, for code that has no Reporter at hand; never silenced."""
    console.print(Text("warning: ", style="yellow") + Text(message))


class Reporter:
    """Where long work reports to. `quiet` silences bars and info lines on the terminal, never
    warnings. Once `keep_log` names a file, every info and warning line also goes there (quiet or
    not), after the ones said before it (a run's first lines come before its folder exists); bars
    do not."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._log = None
        self._said: deque[str] = deque(maxlen=200)  # what keep_log writes first

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message, markup=False)
        self._record(message)  # quiet or not: the log is what the terminal did not keep

    def warn(self, message: str) -> None:
        warn(message)
        self._record(f"warning: {message}")

    def log(self, message: str) -> None:
        """Into the log only (for what the terminal already shows another way, such as the error
        that ends a run)."""
        self._record(message)

    def keep_log(self, path: Path) -> None:
        """Append this reporter's lines to `path` from now on (a resumed run continues its log)."""
        self.close_log()
        try:
            self._log = open(path, "a", encoding="utf-8")
        except OSError:  # the run's own writes report an unwritable folder; the log never stops a run
            return
        self._write("".join(self._said))
        self._said.clear()

    def close_log(self) -> None:
        if self._log is not None:
            with suppress(OSError):
                self._log.close()
            self._log = None

    def _record(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"
        if self._log is None:
            self._said.append(stamped)
        else:
            self._write(stamped)

    def _write(self, text: str) -> None:
        try:  # flushed per line: a run killed mid-way keeps everything it said
            self._log.write(text)
            self._log.flush()
        except OSError:  # a full disk: the run says so itself (its checkpoints fail); the log goes quiet
            self.close_log()

    @contextmanager
    def bar(self, description: str, total: int, stats: bool = False):
        """A progress bar with ETA; `stats` adds a free-text field updated with `update(..., stats=...)`.
        Where stderr is no terminal (a log file, a pipe, nohup, CI) rich would draw it once, at
        the end: a line every PLAIN_EVERY_S seconds says how far the work is instead."""
        if not self.quiet and not console.is_terminal:
            plain = _PlainBar(description, total)
            yield plain
            plain.say()
            return
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


# seconds between two progress lines where stderr is no terminal: often enough to see that a long
# epoch moves, rarely enough that a log of a whole run stays readable
PLAIN_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class _PlainBar:
    """A progress bar as lines of text: done/total, elapsed, eta and the stats, every
    PLAIN_EVERY_S seconds and once at the end."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, total
        self.done, self.stats = 0, ""
        self.started = self.last = time.monotonic()

    def advance(self, n: int = 1, stats: str | None = None) -> None:
        self.done += n
        if stats is not None:
            self.stats = stats
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S and self.done < self.total:
            self.say(now)

    def say(self, now: float | None = None) -> None:
        self.last = time.monotonic() if now is None else now
        elapsed = self.last - self.started
        left = elapsed / self.done * max(self.total - self.done, 0) if self.done else None
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = f" eta {_duration(left)}" if left is not None and self.done < self.total else ""
        console.print(f"{self.description} {self.done}/{self.total}{share} {_duration(elapsed)}{eta}"
                      f"{' ' + self.stats if self.stats else ''}", markup=False)
