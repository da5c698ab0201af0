"""Command-line usage errors and Ctrl-C: one `error:` line and exit 2, or `interrupted` and 130;
never a traceback (issue 16, case 8)."""

import signal
import subprocess
import sys

import pytest

from pixclass.cli import main

from conftest import make_shapes, run_cli

USAGE_ERRORS = {
    "not a number": (["train", "data", "--epochs", "abc"], "Invalid value for '--epochs'"),
    "unknown option": (["train", "data", "--epoch", "3"], "No such option: --epoch"),
    "unknown command": (["trian", "data"], "No such command 'trian'"),
    "missing argument": (["evaluate"], "Missing argument 'model'"),
    "top-k below 1": (["predict", "model", "a.png", "--top-k", "0"], "Invalid value for '--top-k'"),
    "port not a number": (["serve", "model", "--port", "notaport"], "Invalid value for '--port'"),
    "port out of range": (["serve", "model", "--port", "70000"], "Invalid value for '--port'"),
}


def _one_error_line(stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0] and "--help" in lines[0]


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=list(USAGE_ERRORS))
def test_usage_error_is_one_line_and_exit_code_2(case, capsys):
    args, message = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, message)
    assert captured.out == ""


@pytest.mark.parametrize("case", ["not a number", "unknown command", "port not a number"])
def test_usage_error_from_the_installed_command(case):
    args, message = USAGE_ERRORS[case]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _one_error_line(proc.stderr, message)


def test_no_arguments_shows_the_help_not_a_traceback():
    proc = run_cli()
    assert proc.returncode == 2  # click's code for "no command given"
    assert "train" in proc.stdout and "evaluate" in proc.stdout and "Traceback" not in proc.stderr


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--help"])
    assert exit_.value.code == 0 and "--top-k" in capsys.readouterr().out


def test_ctrl_c_during_training_prints_interrupted_and_exits_130(tmp_path):
    data = make_shapes(tmp_path / "data", per_class=6)
    # a test runner started in the background ignores SIGINT, and a child inherits an ignored
    # signal: with a handler here for the moment of the start, the child gets the default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pixclass", "train", str(data), "--model", "classic-cnn",
                                 "--image-size", "32", "--epochs", "1000", "--out", str(tmp_path / "run")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for line in proc.stderr:  # wait until training is under way
            if line.startswith("epoch 1 "):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
