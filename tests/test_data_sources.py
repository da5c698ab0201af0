"""Datasets other than class folders: a CSV of labels, and standard datasets by name
("torchvision:cifar10") from a copy given with --archive, or a clear error when offline."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import make_shapes, run_cli
from pixclass.data.scan import scan_dataset
from pixclass.errors import DatasetError, UserError


def _write_csv(path: Path, rows, header="path,label"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _csv_of_folder(folder: Path, csv_path: Path) -> Path:
    """A label CSV listing a class-folder tree's images, relative to the CSV, in shuffled order."""
    rows = [(os.path.relpath(p, csv_path.parent), p.parent.name) for p in sorted(folder.rglob("*.png"))]
    rows = rows[1::2] + rows[::2]  # not in the folder scan's order: the scan must not depend on it
    return _write_csv(csv_path, rows)


def _triples(scanned):
    return [(s.path.resolve(), s.label, s.split) for s in scanned.samples]


def test_a_label_csv_scans_like_the_class_folders_it_lists(tmp_path):
    folder = make_shapes(tmp_path / "shapes", per_class=12)
    (tmp_path / "labels").mkdir()
    csv_path = _csv_of_folder(folder, tmp_path / "labels" / "all.csv")  # paths go up: ../shapes/...
    from_csv, from_folders = scan_dataset(csv_path, seed=3), scan_dataset(folder, seed=3)
    assert from_csv.classes == from_folders.classes
    assert _triples(from_csv) == _triples(from_folders)  # same split, same order
    assert from_csv.layout == "label-csv"


def test_a_split_column_is_kept_and_val_is_carved_from_train_when_absent(tmp_path):
    folder = make_shapes(tmp_path / "s", per_class=10)
    files = sorted(folder.rglob("*.png"))
    rows = [(p.relative_to(tmp_path), p.parent.name, "test" if i % 5 == 0 else "train") for i, p in enumerate(files)]
    scanned = scan_dataset(_write_csv(tmp_path / "l.csv", rows, "path,label,split"), fractions=(0.8, 0.2, 0.0))
    by_path = {s.path.resolve(): s.split for s in scanned.samples}
    for p, _, split in rows:
        got = by_path[(tmp_path / p).resolve()]
        assert got == "test" if split == "test" else got in ("train", "val")
    assert sum(s.split == "val" for s in scanned.samples) > 0


@pytest.mark.parametrize("body, message", [
    ("file,klass\na.png,x\n", "must name the columns"),
    ("path,label\nmissing.png,x\n", "not found"),
    ("path,label\na.png,x\na.png,y\n", "two labels"),
    ("path,label,split\na.png,x,train\nb.png,y,\n", "some rows name a split"),
    ("path,label,split\na.png,x,holdout\n", "unknown split"),
    ("path,label\na.png,\n", "empty path or label"),
])
def test_a_bad_label_csv_is_one_clear_error(tmp_path, body, message):
    make_shapes(tmp_path / "s", per_class=2)
    (tmp_path / "a.png").write_bytes((tmp_path / "s" / "circle" / "circle_000.png").read_bytes())
    (tmp_path / "b.png").write_bytes((tmp_path / "s" / "square" / "square_000.png").read_bytes())
    (tmp_path / "l.csv").write_text(body)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(tmp_path / "l.csv")


def test_a_label_csv_trains_to_the_same_validation_accuracy_as_its_folders(tmp_path):
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training

    folder = make_shapes(tmp_path / "shapes", per_class=20)
    csv_path = _csv_of_folder(folder, tmp_path / "shapes.csv")
    results = []
    for data in (folder, csv_path):
        cfg = RunConfig(data=DataConfig(path=str(data), image_size=32), model=ModelConfig(name="classic-cnn"),
                        augment=AugmentConfig(policy="none"), train=TrainConfig(epochs=3, batch_size=16, seed=0))
        results.append(run_training(cfg, out=tmp_path / f"run-{data.name}", reporter=Reporter(quiet=True)))
    history = [[{k: v for k, v in row.items() if "loss" in k or "acc" in k}  # not the timings
                for row in csv.DictReader(open(Path(r["run_dir"]) / "metrics.csv"))] for r in results]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert history[0] == history[1]
    # evaluate reads the CSV too: the held-out test split of the run's manifest
    done = run_cli("evaluate", Path(results[1]["model_dir"]), csv_path, "--json", "-q")
    assert done.returncode == 0, done.stderr
    evaluated = json.loads(done.stdout)
    assert evaluated["n"] == results[1]["metrics"]["n"] and evaluated["accuracy"] == results[1]["metrics"]["accuracy"]


# --- standard datasets by name -------------------------------------------------------------------

def _cifar10_archive(path: Path, per_batch: int = 12) -> Path:
    """A small archive in the layout of torchvision's cifar-10-python.tar.gz (pickled batches)."""
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folder = path.parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, n):
        labels = [i % 10 for i in range(n)]
        data = np.stack([np.full((3, 32, 32), 20 * y, np.uint8) + rng.integers(0, 30, (3, 32, 32), dtype=np.uint8)
                         for y in labels]).reshape(n, -1)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", per_batch)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return path


def _offline_env(cache: Path) -> dict:
    proxy = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    return {**os.environ, "PIXCLASS_CACHE_DIR": str(cache), "http_proxy": proxy, "https_proxy": proxy,
            "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}


def _cli(env, *args):
    import subprocess
    return subprocess.run([sys.executable, "-m", "pixclass", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_named_dataset_offline_without_an_archive_is_one_line_and_exit_2(tmp_path):
    done = _cli(_offline_env(tmp_path / "cache"), "train", "torchvision:cifar10", "--out", tmp_path / "run")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    # the attempt is announced ("downloading ..."), then one error line and no traceback
    assert len(errors) == 1 and "--archive" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert lines[-1] == errors[0]
    assert not (tmp_path / "run").exists()


def test_unknown_names_and_a_stray_archive_are_one_line(tmp_path):
    env = _offline_env(tmp_path / "cache")
    done = _cli(env, "train", "torchvision:imagenet-22k")
    assert done.returncode == 2 and "known: torchvision:cifar10" in done.stderr, done.stderr
    folder = make_shapes(tmp_path / "s", per_class=3)
    done = _cli(env, "train", folder, "--archive", tmp_path / "x.tar.gz")
    assert done.returncode == 2 and "--archive is for a standard dataset" in done.stderr, done.stderr


def test_cifar10_by_name_trains_from_an_archive_in_torchvisions_format(tmp_path):
    archive = _cifar10_archive(tmp_path / "src" / "cifar-10-python.tar.gz")
    cache = tmp_path / "cache"
    done = _cli(_offline_env(cache), "train", "torchvision:cifar10", "--archive", archive, "--model", "classic-cnn",
                "--image-size", "32", "--epochs", "1", "--out", tmp_path / "run", "-q", "--json")
    assert done.returncode == 0, done.stderr
    assert "not the official" in done.stderr  # a copy of our own making: read without torchvision's checksums
    folder = cache / "datasets" / "cifar10"
    assert sorted(p.name for p in (folder / "train").iterdir())[:2] == ["airplane", "automobile"]
    assert len(list((folder / "train").rglob("*.png"))) == 60 and len(list((folder / "test").rglob("*.png"))) == 12
    # a second run finds the copy in the cache: no archive, no network needed
    again = _cli(_offline_env(cache), "audit", "torchvision:cifar10", "--json", "-q", "--out", tmp_path / "audit")
    assert again.returncode == 0, again.stderr
    assert '"layout": "split-folders"' in again.stdout


def test_the_mnist_family_reads_a_folder_of_idx_files(tmp_path, monkeypatch):
    from pixclass.data import named

    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "fmnist"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    folder = named.ensure("torchvision:fashion-mnist", src)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    assert "T-shirt-top" in classes and len(classes) == 10  # "/" cannot be in a folder name
    assert len(list((folder / "test").rglob("*.png"))) == 10
    with pytest.raises(UserError, match="cannot unpack|does not hold"):
        named.ensure("torchvision:mnist", src / "train-images-idx3-ubyte.gz")
