"""`pixclass predict --out FILE` at scale: output written as it comes (CSV, JSONL), a killed run
continued with --resume into what one uninterrupted run writes, and the same output from one
process, two torchrun processes and two torchrun "nodes" on this machine."""

from __future__ import annotations

import csv
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import draw_shape, run_cli


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png"))


def test_csv_and_jsonl_have_one_record_per_file_with_the_top_class_first(trained_run, shapes_session, tmp_path):
    model = trained_run["model_dir"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG cut short")
    proc = run_cli("predict", model, shapes_session, broken, "--out", tmp_path / "p.csv", "-k", "2", "-b", "16")
    assert proc.returncode == 0, proc.stderr
    assert "backend: " in proc.stderr and "1 unreadable file(s)" in proc.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "answer", "score", "error"]
    assert [r["path"] for r in rows] == _files_in(shapes_session) + [str(broken)]  # input order, each once
    stdout = json.loads(run_cli("predict", model, shapes_session, "--json", "-k", "2").stdout)
    for row, shown in zip(rows, stdout):
        assert row["path"] == shown["path"] and row["class"] == shown["top_k"][0]["class"]
        assert float(row["probability"]) == pytest.approx(shown["top_k"][0]["probability"], abs=1e-6)
        assert float(row["probability"]) >= float(row["probability_2"]) and row["error"] == ""
        assert row["answer"] == shown["answer"] and float(row["score"]) == pytest.approx(shown["score"], abs=1e-6)
    assert rows[-1]["class"] == "" and rows[-1]["error"]  # the unreadable file: a row that says why
    correct = sum(r["class"] == Path(r["path"]).parent.name for r in rows[:-1])
    assert correct / (len(rows) - 1) > 0.8  # a trained model's answers, not placeholders

    proc = run_cli("predict", model, shapes_session, broken, "--out", tmp_path / "p.jsonl", "-k", "2")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [r["path"] for r in rows]
    assert [r["top_k"][0]["class"] for r in records[:-1]] == [r["class"] for r in rows[:-1]]
    assert "top_k" not in records[-1] and records[-1]["error"] == rows[-1]["error"]


def test_parquet_has_the_csv_columns(trained_run, shapes_session, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # optional: without it, a one-line error (test below)
    model = trained_run["model_dir"]
    assert run_cli("predict", model, shapes_session, "--out", tmp_path / "p.csv", "-k", "2").returncode == 0
    proc = run_cli("predict", model, shapes_session, "--out", tmp_path / "p.parquet", "-k", "2", "-b", "16")
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["path"] for r in table] == [r["path"] for r in rows]
    assert [(r["class"], r["class_2"]) for r in table] == [(r["class"], r["class_2"]) for r in rows]
    assert [round(r["probability"], 6) for r in table] == [float(r["probability"]) for r in rows]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """600 files (links to 30 drawn 256-pixel images, in 6 folders): enough work to kill a run midway."""
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(0)
    sources = []
    for i in range(30):
        kind = ("circle", "square", "triangle")[i % 3]
        sources.append(root / f"source_{i:02d}.png")
        draw_shape(kind, rng, 256).save(sources[-1])
    for i in range(600):
        folder = root / "links" / f"part{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:04d}.png").symlink_to(sources[i % 30])
    return root / "links"


def _predict_cmd(model, images, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pixclass", "predict", str(model), str(images), "--out", str(out), "-b", "4", *extra]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_a_killed_run_resumed_writes_what_an_uninterrupted_run_writes(trained_run, many_images, tmp_path):
    model = trained_run["model_dir"]
    whole = tmp_path / "whole.csv"
    assert subprocess.run(_predict_cmd(model, many_images, whole), capture_output=True).returncode == 0
    assert _lines(whole) == 601

    out = tmp_path / "killed.csv"
    proc = subprocess.Popen(_predict_cmd(model, many_images, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while _lines(out) < 40 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 40 <= _lines(out) < 601
    with out.open("a") as f:  # the kill cut a write short: half a line, no newline
        f.write(str(many_images / "part0" / "img_9999.png") + ",circ")

    done = subprocess.run(_predict_cmd(model, many_images, out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming: " in done.stderr
    assert out.read_text() == whole.read_text()  # every file once, in the same order, with the same values

    again = subprocess.run(_predict_cmd(model, many_images, out, "--resume"), capture_output=True, text=True)
    assert again.returncode == 0 and "0 file(s) predicted" in again.stderr and out.read_text() == whole.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "pixclass"]


def test_torchrun_processes_and_nodes_write_what_one_process_writes(trained_run, shapes_session, tmp_path):
    model = trained_run["model_dir"]
    predict = ["predict", str(model), str(shapes_session), "-b", "8", "-k", "2", "--out"]
    single = tmp_path / "single.jsonl"
    assert run_cli(*predict, single).returncode == 0
    assert _lines(single) == len(_files_in(shapes_session))

    two = tmp_path / "two.jsonl"
    proc = subprocess.run([*_torchrun("--nproc-per-node", "2", "--master-port", str(_free_port())), *predict, str(two)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_text() == single.read_text()
    shares = [int(n) for n in re.findall(r"rank \d/2: (\d+) file\(s\) predicted", proc.stderr)]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == _lines(single)  # both ranks did a part
    assert not list(tmp_path.glob("two.jsonl.part-*"))  # the parts were merged and removed

    nodes = tmp_path / "nodes.jsonl"
    port = _free_port()
    launches = [subprocess.Popen([*_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}"),
                                  *predict, str(nodes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    shares = []
    for launch in launches:
        _, err = launch.communicate(timeout=600)
        assert launch.returncode == 0, err[-3000:]
        shares += [int(n) for n in re.findall(r"rank \d/2: (\d+) file\(s\) predicted", err)]
    assert len(shares) == 2 and min(shares) > 0
    assert nodes.read_text() == single.read_text()


def test_output_mistakes_are_one_line(trained_run, shapes_session, tmp_path):
    model = trained_run["model_dir"]
    cases = [(["--out", tmp_path / "p.txt"], "--out must end in .csv, .jsonl, .parquet"),
             (["--resume"], "--resume continues an output file"),
             (["--out", tmp_path / "p.csv", "--json"], "--format and --json print to stdout"),
             (["--backend", "tensorflow"], "--backend must be one of")]
    try:
        import pyarrow  # noqa: F401
        cases.append((["--out", tmp_path / "p.parquet", "--resume"], "--resume needs a .csv or .jsonl --out"))
    except ImportError:
        cases.append((["--out", tmp_path / "p.parquet"], "--out FILE.parquet needs the pyarrow package"))
    for args, message in cases:
        proc = run_cli("predict", model, shapes_session, *args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, \
            proc.stderr
