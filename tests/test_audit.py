"""The dataset doctor on a tree with every kind of problem, and training on that same tree."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def _noise(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def make_messy_tree(root: Path) -> dict:
    """Returns {problem: path(s)} for every planted problem."""
    for split, n in (("train", 10), ("test", 3)):
        for c, base in (("cat", 0), ("dog", 100)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _noise(base + i + (1000 if split == "test" else 0)).save(root / split / c / f"{c}_{i:03d}.png")
    t = root / "train"
    planted = {}
    (t / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    buf = io.BytesIO()
    _noise(7, 64).save(buf, "JPEG")
    (t / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (t / "cat" / "empty.png").write_bytes(b"")
    (t / "dog" / "notes.jpg").write_text("these are my notes, not a picture")
    (t / "dog" / "readme.txt").write_text("not an image either")
    planted["unreadable"] = {t / "cat" / "corrupt.jpg", t / "dog" / "truncated.jpg", t / "cat" / "empty.png",
                             t / "dog" / "notes.jpg", t / "dog" / "readme.txt"}
    (t / ".ipynb_checkpoints").mkdir()
    _noise(500).save(t / ".ipynb_checkpoints" / "x.png")
    (t / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (t / "bird").mkdir()
    _noise(501, size=8).save(t / "cat" / "tiny.png")
    _noise(502, mode="L").save(t / "dog" / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(503).save(t / "cat" / "rotated.jpg", exif=exif.tobytes())
    _noise(504).save(t / "dog" / "anim.gif", save_all=True, append_images=[_noise(505)])
    shutil.copy(t / "cat" / "cat_000.png", t / "cat" / "dup.png")
    near = np.asarray(Image.open(t / "cat" / "cat_001.png")).astype(int) + 3
    Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(t / "cat" / "near.png")
    shutil.copy(t / "cat" / "cat_002.png", t / "dog" / "cat_copy.png")
    shutil.copy(t / "cat" / "cat_003.png", root / "test" / "cat" / "leak.png")
    return planted


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    planted = make_messy_tree(root)
    return root, planted


def test_audit_names_every_problem_and_leaves_the_tree_alone(messy, tmp_path):
    root, planted = messy
    before = tree_hashes(root)
    proc = run_cli("audit", root, "--json", "--out", tmp_path / "audit")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    p = found["problems"]
    assert {Path(x["path"]) for x in p["unreadable"]} == planted["unreadable"]
    reasons = {Path(x["path"]).name: x["reason"] for x in p["unreadable"]}
    assert "zero-byte" in reasons["empty.png"] and "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["readme.txt"]
    assert {Path(x["path"]).name for x in p["hidden"]} == {".ipynb_checkpoints", ".DS_Store"}
    assert [x["class"] for x in p["empty_classes"]] == ["bird"]
    assert [Path(x["path"]).name for x in p["tiny"]] == ["tiny.png"]
    assert [Path(x["path"]).name for x in p["mixed_modes"]] == ["gray.png"]
    assert [Path(x["path"]).name for x in p["exif_rotated"]] == ["rotated.jpg"]
    assert [Path(x["path"]).name for x in p["animated"]] == ["anim.gif"]
    groups = {kind: [sorted(Path(q).name for q in g["paths"]) + [g["match"]] for g in p.get(kind, [])]
              for kind in ("duplicates", "conflicting_labels", "leakage")}
    assert groups["duplicates"] == [["cat_000.png", "dup.png", "exact"], ["cat_001.png", "near.png", "near"]]
    assert groups["conflicting_labels"] == [["cat_002.png", "cat_copy.png", "exact"]]
    assert groups["leakage"] == [["cat_003.png", "leak.png", "exact"]]
    assert found["imbalance_ratio"] is not None
    html = (tmp_path / "audit" / "audit.html").read_text()
    assert "data:image/png;base64" in html and "leakage" in html
    assert tree_hashes(root) == before  # without --fix nothing changed


def test_training_on_the_messy_tree_skips_exactly_the_bad_files(messy, tmp_path):
    root, planted = messy
    before = tree_hashes(root)
    proc = run_cli("train", root, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--out", tmp_path / "run", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    skipped = {Path(p) for p in json.loads(proc.stdout)["skipped_files"]}
    assert skipped == {p for p in planted["unreadable"] if p.suffix != ".txt"}  # .txt is never an image candidate
    assert "bird" in proc.stderr  # the empty class is named in a warning, not trained
    assert "leakage" in proc.stderr and "conflicting labels" in proc.stderr  # the brief check before training
    assert tree_hashes(root) == before


def test_quarantine_moves_never_deletes(messy, tmp_path):
    root, planted = messy
    before = tree_hashes(root)
    proc = run_cli("audit", root, "--fix", "quarantine", "--quarantine-dir", tmp_path / "q", "--out", tmp_path / "a", "-q")
    assert proc.returncode == 0, proc.stderr
    after = tree_hashes(root)
    moved = set(before) - set(after)
    assert {root / m for m in moved} >= planted["unreadable"]
    assert "train/cat/dup.png" in moved and "train/cat/cat_000.png" not in moved
    assert "train/dog/cat_copy.png" in moved and "train/cat/cat_002.png" in moved  # conflicting: both copies
    assert "train/cat/cat_003.png" in moved and "test/cat/leak.png" not in moved  # leakage: the training copy
    quarantined = tree_hashes(tmp_path / "q")
    for rel in moved:  # same bytes, same relative path
        assert quarantined[rel] == before[rel]
    assert all(after[k] == before[k] for k in after)  # nothing rewritten in place
    log = (tmp_path / "q" / "quarantine.csv").read_text()
    assert log.count("\n") == len(moved) + 1
