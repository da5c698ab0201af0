"""A run folder belongs to one run: runs started together never share one, a folder the user names
is never overwritten, a bad --out fails before any data is read, a failed --resume leaves the run
as it was, and a full disk stops the run with one line and its last good checkpoint."""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_shapes

from pixclass.cli import main
from pixclass.errors import UserError
from pixclass.runs import claim_folder, claim_new_folder

TINY = ("--model", "seed-cnn", "--image-size", "32", "--augment", "none", "--batch-size", "8", "--threads", "1")


def _cli(capsys, *args) -> tuple[int, str]:
    """`pixclass ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _seed_of(run: Path) -> int:
    config = json.loads((run / "model" / "pixclass.json").read_text())["config"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == config["train"]["seed"]
    return config["train"]["seed"]


# -- case 1: runs started together -------------------------------------------------------------

def _race(claims: list) -> list:
    """Call every claim from its own thread, all released at the same instant; each result or UserError."""
    start, results = threading.Barrier(len(claims)), [None] * len(claims)

    def one(i):
        start.wait()
        try:
            results[i] = claims[i]()
        except UserError as e:
            results[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(claims))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_claims_get_distinct_default_folders_and_one_named_folder(tmp_path):
    by_default = _race([lambda: claim_new_folder("shapes", tmp_path / "runs", claim="config.yaml").path] * 8)
    assert sorted(p.name for p in by_default) == sorted(["shapes"] + [f"shapes-{i}" for i in range(2, 9)])
    assert all((p / "config.yaml").is_file() for p in by_default)

    named = _race([lambda: claim_folder(tmp_path / "mine")] * 8)
    assert len([r for r in named if not isinstance(r, UserError)]) == 1
    assert all("already holds a run" in str(r) for r in named if isinstance(r, UserError))

    # default naming and an --out naming that same folder, at once: one owner, the rest elsewhere or refused
    mixed = _race([lambda: claim_new_folder("both", tmp_path / "r", claim="config.yaml").path] * 4
                  + [lambda: claim_folder(tmp_path / "r" / "both").path] * 4)
    owners = [p for p in mixed if not isinstance(p, UserError)]
    assert len(owners) == len(set(owners)) and owners.count(tmp_path / "r" / "both") == 1
    assert all(isinstance(p, Path) for p in mixed[:4])


def test_trainings_started_together_never_share_a_folder(tmp_path):
    """Two runs with the default output and a third with --out naming that same folder, started
    together (the race between two identical --out is test_racing_claims_...'s, in threads)."""
    data = make_shapes(tmp_path / "shapes", per_class=6)

    def start(seed, *out):
        return subprocess.Popen([sys.executable, "-m", "pixclass", "train", str(data), *TINY, "--epochs", "1",
                                 "--seed", str(seed), "-q", "--json", *map(str, out)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = {1: start(1), 2: start(2), 3: start(3, "--out", Path("runs") / "shapes")}
    done = {}
    for seed, p in procs.items():
        out, err = p.communicate(timeout=300)
        done[seed] = (p.returncode, out, err)

    finished = {seed: Path(json.loads(out)["run_dir"]) for seed, (rc, out, _) in done.items() if rc == 0}
    assert 1 in finished and 2 in finished, done  # default naming always finds a folder
    assert len(set(finished.values())) == len(finished)
    for seed, folder in finished.items():
        assert _seed_of(tmp_path / folder) == seed  # each folder holds its own run's model
    if 3 not in finished:  # it lost the race for runs/shapes: refused, not merged into another run
        rc, _, err = done[3]
        assert rc == 2 and "the run folder runs/shapes already holds a run" in _one_error_line(err)
    assert sorted(f.name for f in finished.values()) == ["shapes", "shapes-2", "shapes-3"][:len(finished)]


def test_a_folder_holding_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    data = make_shapes(tmp_path / "shapes", per_class=6)
    run = tmp_path / "run"
    assert _cli(capsys, "train", data, *TINY, "--epochs", "1", "-q", "--out", run)[0] == 0
    before = _checksums(run)
    code, err = _cli(capsys, "train", data, *TINY, "--epochs", "1", "-q", "--out", run, "--seed", "7")
    assert code == 2 and f"--manifest {run / 'manifest.csv'}" in _one_error_line(err)
    assert _checksums(run) == before

    (tmp_path / "empty").mkdir()  # an empty folder (a mount point, mktemp -d) is fine
    assert claim_folder(tmp_path / "empty").path == tmp_path / "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    code, err = _cli(capsys, "train", data, *TINY, "--epochs", "1", "-q", "--out", tmp_path / "mine")
    assert code == 2 and "is not empty" in _one_error_line(err)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# -- case 9: --out problems, before any data is read --------------------------------------------

def test_unusable_out_is_one_line_before_the_data_is_read(tmp_path, capsys):
    missing_data = tmp_path / "no-such-data"  # reading it would fail: the --out error must come first
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = _cli(capsys, "train", missing_data, *TINY, "--out", a_file)
    assert code == 2
    assert _one_error_line(err) == f"error: the run folder {a_file} is a file; give --out a new or empty folder"
    code, err = _cli(capsys, "train", missing_data, *TINY, "--out", a_file / "run")  # fails for root too
    assert code == 2
    assert _one_error_line(err) == f"error: cannot create the run folder {a_file / 'run'}: {a_file} is a file"
    assert a_file.read_text() == "x"

    # a failure before training gives the folder back: the same --out works once the data is fixed
    code, err = _cli(capsys, "train", missing_data, *TINY, "--out", tmp_path / "later")
    assert code == 2 and "no-such-data" in _one_error_line(err) and not (tmp_path / "later").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(capsys, "train", tmp_path / "no-such-data", *TINY, "--out", locked / "run")
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"cannot create the run folder {locked / 'run'}: Permission denied" in _one_error_line(err)


# -- case 2: a --resume that does not fit the run -----------------------------------------------

def test_resume_on_other_classes_or_another_model_leaves_the_run_as_it_was(tmp_path, capsys):
    data = make_shapes(tmp_path / "shapes", per_class=6)
    run = tmp_path / "run"
    assert _cli(capsys, "train", data, *TINY, "--epochs", "1", "-q", "--out", run)[0] == 0
    before = _checksums(run)

    two = make_shapes(tmp_path / "two", per_class=6, classes=("circle", "square"))
    renamed = make_shapes(tmp_path / "renamed", per_class=6, classes=("circle", "square", "star"))
    for other, theirs in ((two, "[circle, square]"), (renamed, "[circle, square, star]")):
        code, err = _cli(capsys, "train", other, "--resume", run, "--epochs", "2", "-q")
        line = _one_error_line(err)
        assert code == 2 and "[circle, square, triangle]" in line and theirs in line, line
        assert _checksums(run) == before

    code, err = _cli(capsys, "train", "--resume", run, "--model", "resnet18", "--epochs", "2", "-q")
    assert code == 2 and "resume without changing the model" in _one_error_line(err)
    assert _checksums(run) == before

    code, err = _cli(capsys, "train", "--resume", run, "--epochs", "2", "-q")  # the run still continues
    assert code == 0, err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    meta = json.loads((run / "model" / "pixclass.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]


# -- case 4: a full disk ------------------------------------------------------------------------

class _FullDisk:
    """`open` for pixclass.atomic_write (every file replaced whole) on a disk with room for `files` more files: the next
    file's writes fail with ENOSPC after `room` bytes, as a real full disk's do (torch then reports
    its own RuntimeError about stream positions)."""

    def __init__(self, files: int, room: int = 4096):
        self.files, self.room = files, room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 (handed back open, as open() does)
        if "w" not in mode:
            return f
        self.files -= 1
        return f if self.files >= 0 else _FillingFile(f, self.room)


class _FillingFile:
    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _checkpoint_every_step(data: Path, config: Path, epochs: int) -> Path:
    train = {"epochs": epochs, "batch_size": 8, "checkpoint_interval": 0, "threads": 1}
    config.write_text(yaml.safe_dump({"data": {"path": str(data), "image_size": 32}, "model": {"name": "seed-cnn"},
                                      "augment": {"policy": "none"}, "train": train}))
    return config


def test_full_disk_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from pixclass import atomic_write
    data = make_shapes(tmp_path / "shapes", per_class=6)
    config = _checkpoint_every_step(data, tmp_path / "c.yaml", epochs=3)
    run = tmp_path / "run"
    # room for four more files (the first steps' checkpoints), then the disk is full
    monkeypatch.setattr(atomic_write, "open", _FullDisk(files=4), raising=False)
    code, err = _cli(capsys, "train", "--config", config, "--out", run, "-q")
    monkeypatch.undo()
    line = _one_error_line(err)
    assert code == 2 and "no space left on device while writing" in line, line
    assert line.endswith(f"continue it with: pixclass train --resume {run}")
    assert not [p for p in run.rglob("*.tmp")]  # nothing half-written is left filling the disk
    assert not (run / "model").exists()
    assert "no space left on device" in (run / "failed.txt").read_text()  # the folder says the run stopped
    stopped = (run / "train.log").read_text().splitlines()[-1]
    assert "stopped: " in stopped and "space" in stopped.lower(), stopped  # and so does its log
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] >= 1 and all(torch.isfinite(v).all() for v in last["model"].values())

    code, err = _cli(capsys, "train", "--resume", run, "-q")  # once there is room again
    assert code == 0, err
    assert (run / "model" / "model.safetensors").is_file() and not (run / "failed.txt").exists()


def test_saving_a_model_on_a_full_disk_keeps_the_previous_one(trained_run, tmp_path, monkeypatch):
    from pixclass import artifact, atomic_write
    folder = tmp_path / "model"
    shutil.copytree(trained_run["model_dir"], folder)
    before = _checksums(folder)
    art = artifact.load(folder)
    monkeypatch.setattr(atomic_write, "open", _FullDisk(files=0), raising=False)
    with pytest.raises(atomic_write.FileWriteError) as error:
        artifact.save(art, folder)
    monkeypatch.undo()
    assert str(error.value).startswith("no space left on device while writing") and "\n" not in str(error.value)
    assert _checksums(folder) == before  # no temporary file left, the model as it was
    artifact.load(folder)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                                capture_output=True).returncode == 0


def test_a_real_full_disk_when_a_tmpfs_can_be_mounted(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "7m"):  # room for one best.pt and last.pt of this network (2.7 MB each), not a third
        pytest.skip("mounting a tmpfs needs root and a system that allows it")
    try:
        data = make_shapes(tmp_path / "shapes", per_class=6)
        config = _checkpoint_every_step(data, tmp_path / "c.yaml", epochs=2)
        code, err = _cli(capsys, "train", "--config", config, "--out", disk / "run", "-q")
        assert code == 2 and "no space left on device while writing" in _one_error_line(err)
        assert not list((disk / "run").rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        code, err = _cli(capsys, "train", "--resume", disk / "run", "-q")
        assert code == 0, err
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_the_run_log_keeps_every_message_and_a_resume_appends(tmp_path, capsys):
    data = make_shapes(tmp_path / "shapes", per_class=6)
    run = tmp_path / "run"
    code, err = _cli(capsys, "train", data, *TINY, "--epochs", "1", "--out", run)
    assert code == 0, err
    first = (run / "train.log").read_text()
    said = [line.split(" ", 2)[2] for line in first.splitlines()]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in first.splitlines())
    # the run's own lines as the terminal showed them (not the bars, not the CLI's closing lines)
    shown = [line for line in err.splitlines() if line.startswith(("data:", "model ", "epoch 1 ", "calibration:"))]
    assert len(shown) == 4 and [s for s in said if s in shown] == shown, (shown, said)
    # and the closing figure, the model and the whole run's time, as its last line
    summary = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert re.fullmatch(rf"finished in \d+\.\ds: {summary['split']} accuracy {summary['accuracy']:.4f} "
                        rf"\({summary['n']} images\); model {re.escape(str(run / 'model'))}", said[-1]), said[-1]

    code, err = _cli(capsys, "train", "--resume", run, "--epochs", "2", "-q")  # quiet: the log still keeps it
    assert code == 0, err
    after = (run / "train.log").read_text()
    assert after.startswith(first)
    added = after[len(first):]
    assert "resumed from" in added and "\nepoch 1 " not in added and " epoch 2 " in added, added
