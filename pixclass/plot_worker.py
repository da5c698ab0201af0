"""Figures drawn by a helper process that has imported matplotlib before they are needed.

Why: a training run's report draws four matplotlib figures at the very end. In a fresh process
importing matplotlib and drawing them takes a visible share of a short transfer-learning run, all
on one core (bench/RESULTS.md, "Speed tricks"). So `run_training` starts this worker, its one
entry point, at the beginning of a run: the worker imports matplotlib on the core the main process
leaves idle while it imports timm, and at report time draws the figures while the main process
computes the Grad-CAM gallery.
Where matplotlib is already imported (a long-lived process, the test suite) the figures are
drawn in-process: the worker would only cost a process.

The worker is a plain Python subprocess (`plot_worker.main`) speaking pickles over its
stdin/stdout, not multiprocessing: a spawned multiprocessing child re-runs the parent's main
script (a user's script without a main guard would train again), and a forked one inherits
torch's threads. Any failure of the worker falls back to drawing in-process: a figure is never
lost to it."""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path


class _Drawn:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class InlinePlotter:
    """Draws at once, in this process. `submit(fn, *args)` calls a module-level plotting function
    and returns something whose `get()` gives its result."""

    def submit(self, fn, *args, **kwargs):
        return _Drawn(fn(*args, **kwargs))

    def close(self) -> None:
        pass


class _Pending:
    """A figure the worker is drawing; `get` waits for it, or draws it here if the worker failed."""

    def __init__(self, worker: "PlotWorker", number: int, fn, args, kwargs):
        self.worker, self.number, self.call = worker, number, (fn, args, kwargs)

    def get(self):
        try:
            ok, value = self.worker._reply(self.number)
            if ok:
                return value
        except Exception:  # the worker died: its pipe broke or closed
            pass
        fn, args, kwargs = self.call  # draw here, where a real plotting error shows as usual
        return fn(*args, **kwargs)


class PlotWorker(InlinePlotter):
    """The subprocess: it imports matplotlib as soon as it starts, then draws what it is sent."""

    def __init__(self):
        # the same pixclass as this process, however it was put on sys.path: its folder replaces
        # the working directory at the head of the worker's path (nothing in the cwd can shadow it)
        package_root = str(Path(__file__).resolve().parent.parent)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.path[0] = sys.argv[1]; from pixclass.plot_worker import main; main()",
             package_root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._sent = 0
        self._replies: dict[int, tuple[bool, object]] = {}

    def submit(self, fn, *args, **kwargs):
        try:
            pickle.dump((fn.__module__, fn.__qualname__, args, kwargs), self._proc.stdin)
            self._proc.stdin.flush()
        except Exception:  # the worker is gone
            return super().submit(fn, *args, **kwargs)
        self._sent += 1
        return _Pending(self, self._sent, fn, args, kwargs)

    def _reply(self, number: int) -> tuple[bool, object]:
        while number not in self._replies:  # replies come in the order the calls were sent
            self._replies[len(self._replies) + 1] = pickle.load(self._proc.stdout)
        return self._replies[number]

    def close(self) -> None:
        try:
            self._proc.stdin.close()  # end of input: the worker exits on its own (no need to wait for it)
        except Exception:
            self._proc.kill()


def plotter_for_run(enabled: bool = True) -> InlinePlotter:
    """A PlotWorker where it pays (matplotlib not yet imported here), else in-process drawing."""
    if enabled and "matplotlib" not in sys.modules:
        try:
            return PlotWorker()
        except Exception:  # no process can be started here
            pass
    return InlinePlotter()


def _warm_up() -> None:
    """Everything a first figure pays for: matplotlib, the Agg canvas, the font cache."""
    from . import plots
    fig = plots.new_figure(figsize=(1, 1))
    fig.subplots().set_title("warm-up")
    fig.canvas.draw()


def _serve(requests, replies) -> None:
    _warm_up()
    while True:
        try:
            module, name, args, kwargs = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = (True, getattr(importlib.import_module(module), name)(*args, **kwargs))
        except Exception as e:  # the parent draws this one itself and sees the error there
            reply = (False, repr(e))
        pickle.dump(reply, replies)
        replies.flush()


def main() -> None:
    """The worker's entry: calls from stdin, replies on a private copy of stdout (anything a
    library prints goes to stderr instead, never into the replies)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
