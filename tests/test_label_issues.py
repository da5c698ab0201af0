"""Label issues (`pixclass audit DATA --labels`) on CIFAR-10 images with known wrong labels, and
`--fix relabel` / `--undo` restoring the tree byte for byte."""

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest

from conftest import make_shapes, needs_cifar, run_cli


def tree_state(root: Path) -> dict:
    """Every file's SHA-256 (and a symlink's target) and every folder, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = f"-> {p.readlink()} " + hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def flipped_copy(source: Path, dest: Path, classes, per_class: int, flips: int, seed: int = 0) -> set[Path]:
    """Class folders of symlinks to `per_class` files of each class, `flips` of them (seeded) filed
    under another class; returns the flipped ones."""
    rng = random.Random(seed)
    files = [(c, f) for c in classes for f in sorted((source / c).iterdir())[:per_class]]
    wrong = set(rng.sample(range(len(files)), flips))
    out = set()
    for i, (cls, f) in enumerate(files):
        filed = rng.choice([c for c in classes if c != cls]) if i in wrong else cls
        target = dest / filed / f"{cls}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f)
        if i in wrong:
            out.add(target)
    return out


@needs_cifar
def test_audit_labels_finds_the_flipped_files_and_changes_nothing(cifar_train_400, tmp_path):
    data = tmp_path / "noisy"
    wrong = flipped_copy(cifar_train_400, data, ("airplane", "automobile", "frog", "horse"), 50, 10)
    before = tree_state(data)
    proc = run_cli("audit", data, "--labels", "--json", "-q", "--out", tmp_path / "audit")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["label_issues"]
    top = [Path(i["path"]) for i in found["issues"][:len(wrong)]]
    hits = sum(p in wrong for p in top)
    assert hits / len(wrong) >= 0.8, (hits, found["issues"][:12])  # precision = recall at k = flipped
    first = found["issues"][0]
    assert Path(first["path"]).parent.name == first["given"] != first["suggested"]
    assert tree_state(data) == before  # no byte of DATA changes without --fix
    with open(tmp_path / "audit" / "label_issues.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [i["path"] for i in found["issues"]]
    html = (tmp_path / "audit" / "audit.html").read_text()
    assert "Likely label errors" in html and "data:image/png;base64" in html


def _decisions(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "given", "suggested", "score", "accept"])
        writer.writerows(rows)
    return path


def test_relabel_moves_accepted_files_and_undo_restores_the_tree(tmp_path):
    data = tmp_path / "shapes"
    for split, n in (("train", 4), ("val", 2)):
        make_shapes(data / split, per_class=n, classes=("circle", "square"), seed=len(split))
    make_shapes(data / "train", per_class=2, classes=("triangle",))  # val/ has no triangle folder
    # a file whose name is taken in its new class folder: renamed, the one there left alone
    (data / "train" / "square" / "circle_000.png").write_bytes(b"not the same image")
    before = tree_state(data)
    decisions = _decisions(tmp_path / "decisions.csv", [
        [data / "train" / "circle" / "circle_000.png", "circle", "square", 0.01, "yes"],
        [data / "train" / "circle" / "circle_001.png", "circle", "triangle", 0.02, ""],  # not accepted
        [data / "val" / "square" / "square_001.png", "square", "triangle", 0.03, "x"],
        [data / "train" / "square" / "square_002.png", "square", "square", 0.5, "y"],  # already there
    ])
    proc = run_cli("audit", data, "--fix", "relabel", decisions, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["moved"] == 2
    log = Path(result["log"])
    assert log.parent == tmp_path and log.is_file()  # beside the dataset, not in it
    assert (data / "train" / "square" / "circle_000.png").read_bytes() == b"not the same image"
    assert (data / "train" / "square" / "circle_000.relabel-1.png").is_file()
    assert (data / "val" / "triangle" / "square_001.png").is_file()
    assert not (data / "train" / "circle" / "circle_000.png").exists()
    assert (data / "train" / "circle" / "circle_001.png").is_file()
    with open(log) as f:
        assert [r["action"] for r in csv.DictReader(f)] == ["move", "mkdir", "move"]
    # nothing deleted or rewritten: the same file contents, only some under other names
    assert sorted(v for v in before.values() if v != "dir") == sorted(v for v in tree_state(data).values() if v != "dir")

    proc = run_cli("audit", data, "--undo", log)
    assert proc.returncode == 0, proc.stderr
    assert tree_state(data) == before  # every file back, byte for byte, and the new folder gone
    assert not log.exists() and log.with_name(log.name + ".undone").is_file()


@pytest.mark.parametrize("rows, message", [
    ([["{data}/circle/circle_000.png", "circle", "hexagon", 0.1, "y"]], "not a class"),
    ([["{data}/circle/missing.png", "circle", "square", 0.1, "y"]], "does not exist"),
])
def test_a_bad_decision_moves_nothing(tmp_path, rows, message):
    data = make_shapes(tmp_path / "shapes", per_class=3, classes=("circle", "square"))
    before = tree_state(data)
    good = [str(data / "circle" / "circle_001.png"), "circle", "square", 0.1, "y"]
    decisions = _decisions(tmp_path / "d.csv", [good] + [[str(c).format(data=data) for c in r] for r in rows])
    proc = run_cli("audit", data, "--fix", "relabel", decisions)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert tree_state(data) == before


def test_undo_refuses_to_overwrite(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=3, classes=("circle", "square"))
    decisions = _decisions(tmp_path / "d.csv", [[data / "circle" / "circle_000.png", "circle", "square", 0.1, "y"]])
    log = Path(json.loads(run_cli("audit", data, "--fix", "relabel", decisions, "--json").stdout)["log"])
    (data / "circle" / "circle_000.png").write_bytes(b"a new file under the old name")
    proc = run_cli("audit", data, "--undo", log)
    assert proc.returncode == 2 and "would be overwritten" in proc.stderr
    assert (data / "square" / "circle_000.png").is_file()  # nothing moved
