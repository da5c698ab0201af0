"""Progress where stderr is no terminal (a log file, nohup, CI): lines of text while the work runs,
not one bar drawn at the end."""

import pixclass.progress as progress


def test_a_bar_written_to_a_file_says_how_far_it_is_while_it_runs(capsys, monkeypatch):
    clock = iter(range(0, 1000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.Reporter().bar("epoch 1/2", 400, stats=True) as bar:
        for step in range(4):
            bar.advance(100, f"loss {1 / (step + 1):.2f}")
    lines = capsys.readouterr().err.splitlines()
    # 30 s apart at least: after the 2nd and 4th 100 images (40 and 80 s), then the end
    assert lines[0].startswith("epoch 1/2 200/400 (50%) 0:00:40 eta 0:00:40 loss 0.50")
    assert lines[-1] == "epoch 1/2 400/400 (100%) 0:01:40 loss 0.25"
    assert len(lines) == 2


def test_a_quiet_reporter_says_nothing(capsys):
    with progress.Reporter(quiet=True).bar("features", 10) as bar:
        bar.advance(10)
    assert capsys.readouterr().err == ""
