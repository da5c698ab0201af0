"""The report's figure worker: figures drawn in another process, and never lost when it fails."""

import os

import numpy as np
import pytest

from pixclass import plots
from pixclass.plot_worker import InlinePlotter, PlotWorker, plotter_for_run


@pytest.fixture
def worker():
    w = PlotWorker()
    yield w
    w.close()


def test_worker_draws_in_its_own_process(worker, tmp_path):
    pid = worker.submit(os.getpid)
    figure = worker.submit(plots.confusion_matrix, np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "cm.png")
    assert pid.get() != os.getpid()
    assert figure.get() == tmp_path / "cm.png"
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dead_worker_costs_no_figure(worker, tmp_path):
    worker._proc.kill()
    worker._proc.wait()
    pending = worker.submit(plots.reliability_diagram, [{"low": 0.0, "high": 1.0, "accuracy": 0.5}], 0.1,
                            tmp_path / "rel.png")
    assert pending.get() == tmp_path / "rel.png" and (tmp_path / "rel.png").is_file()
    assert worker.submit(os.getpid).get() == os.getpid()  # drawn here instead


def test_a_plotting_error_shows_in_the_caller(worker, tmp_path):
    args = ([["not a count"]], ["a"], tmp_path / "bad.png")
    with pytest.raises(Exception) as inline:
        plots.confusion_matrix(*args)
    with pytest.raises(inline.type, match=str(inline.value)[:20]):
        worker.submit(plots.confusion_matrix, *args).get()


def test_no_worker_once_matplotlib_is_loaded():
    import matplotlib  # noqa: F401  (already imported by the tests above; a worker would only cost a process)
    assert type(plotter_for_run()) is InlinePlotter
