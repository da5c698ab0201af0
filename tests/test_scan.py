from collections import Counter
from pathlib import Path

import pytest

from pixclass.data.scan import read_manifest, scan_dataset, write_manifest
from pixclass.errors import DatasetError

from conftest import make_shapes


def test_class_folders_split_is_stratified_seeded_and_ignores_hidden(tmp_path):
    root = make_shapes(tmp_path / "d", per_class=20)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes((root / "circle" / "circle_000.png").read_bytes())
    (root / "circle" / ".DS_Store").write_bytes(b"junk")
    ds = scan_dataset(root, seed=1)
    assert ds.classes == ["circle", "square", "triangle"]
    assert ds.layout == "class-folders"
    assert all(not any(part.startswith(".") for part in s.path.parts[-2:]) for s in ds.samples)
    counts = ds.counts()
    for c in ds.classes:
        assert counts[c] == {"train": 14, "val": 3, "test": 3}
    again = scan_dataset(root, seed=1)
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in ds.samples]
    other = scan_dataset(root, seed=2)
    assert [s.split for s in other.samples] != [s.split for s in ds.samples]


def test_manifest_keeps_existing_files_in_their_split(tmp_path):
    root = make_shapes(tmp_path / "d", per_class=20)
    first = scan_dataset(root, seed=0)
    write_manifest(first, tmp_path / "manifest.csv")
    make_shapes(tmp_path / "extra", per_class=10, seed=5)
    for f in (tmp_path / "extra" / "circle").iterdir():
        f.rename(root / "circle" / f"new_{f.name}")
    second = scan_dataset(root, seed=99, manifest=tmp_path / "manifest.csv")
    before = {s.path: s.split for s in first.samples}
    after = {s.path: s.split for s in second.samples}
    assert all(after[p] == split for p, split in before.items())
    assert len(after) == len(before) + 10
    assert set(read_manifest(tmp_path / "manifest.csv", root)) == set(before)


def test_manifest_keeps_the_validation_carved_from_a_given_train_folder(tmp_path):
    # train/ and test/ given, val carved out of train/: a rerun with the manifest and another
    # carve fraction (another --split, or another recipe's own carve) keeps the first run's val
    make_shapes(tmp_path / "d" / "train", per_class=20)
    make_shapes(tmp_path / "d" / "test", per_class=5, seed=4)
    first = scan_dataset(tmp_path / "d", fractions=(0.7, 0.15, 0.15))
    write_manifest(first, tmp_path / "manifest.csv")
    make_shapes(tmp_path / "extra", per_class=10, seed=5)
    for f in (tmp_path / "extra" / "circle").iterdir():
        f.rename(tmp_path / "d" / "train" / "circle" / f"new_{f.name}")
    second = scan_dataset(tmp_path / "d", fractions=(0.95, 0.05, 0.0), manifest=tmp_path / "manifest.csv")
    before = {s.path: s.split for s in first.samples}
    after = {s.path: s.split for s in second.samples}
    assert Counter(before.values())["val"] > 0
    assert all(after[p] == split for p, split in before.items())
    new = [s.split for s in second.samples if s.path.name.startswith("new_")]
    assert len(new) == 10 and set(new) <= {"train", "val"}
    assert scan_dataset(tmp_path / "d", fractions=(0.95, 0.05, 0.0)).counts() != second.counts()


def test_split_folder_layout_with_and_without_val(tmp_path):
    make_shapes(tmp_path / "a" / "train", per_class=20)
    make_shapes(tmp_path / "a" / "valid", per_class=4, seed=3)
    make_shapes(tmp_path / "a" / "test", per_class=5, seed=4)
    ds = scan_dataset(tmp_path / "a")
    assert ds.layout == "split-folders"
    assert Counter(s.split for s in ds.samples) == {"train": 60, "val": 12, "test": 15}
    make_shapes(tmp_path / "b" / "train", per_class=20)
    ds = scan_dataset(tmp_path / "b")
    split = Counter(s.split for s in ds.samples)
    assert split["val"] > 0 and split["test"] == 0 and sum(split.values()) == 60


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no class folders"),
    (lambda p: make_shapes(p, 5, classes=("only",)), "only one class"),
    (lambda p: (make_shapes(p, 5, classes=("a", "b")), [f.unlink() for f in list((p / "b").iterdir())[1:]]), "fewer than 2"),
    (lambda p: [(p / c).mkdir(parents=True) or (p / c / "notes.txt").write_text("x") for c in "ab"], "no images"),
])
def test_unusable_datasets_raise_clear_errors(tmp_path, setup, message):
    p = Path(tmp_path / "data")
    setup(p)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(p)


def _minority(root: Path, big: int, small: int) -> Path:
    make_shapes(root, per_class=big, classes=("circle",))
    return make_shapes(root, per_class=small, classes=("square",), seed=1)


@pytest.mark.parametrize("small, expected", [(2, {"train": 1, "val": 0, "test": 1}),
                                             (3, {"train": 1, "val": 1, "test": 1}),
                                             (5, {"train": 3, "val": 1, "test": 1})])
def test_a_small_class_gets_held_out_images(tmp_path, small, expected):
    ds = scan_dataset(_minority(tmp_path / "d", 200, small))
    assert ds.counts()["square"] == expected
    assert ds.counts()["circle"] == {"train": 140, "val": 30, "test": 30}  # large classes split as before
    assert ds.classes_missing_from_held_out() == ({"val": ["square"]} if expected["val"] == 0 else {})


def test_held_out_sizes_keep_a_training_image_and_follow_the_fractions():
    from pixclass.data.scan import held_out_sizes
    assert held_out_sizes(2, 0.15, 0.15) == (0, 1)  # too small for both: test first
    assert held_out_sizes(3, 0.1, 0.8) == (1, 1)  # test gives val one back
    assert held_out_sizes(20, 0.15, 0.15) == (3, 3)
    assert held_out_sizes(10, 0.0, 0.2) == (0, 2) and held_out_sizes(10, 0.2, 0.0) == (2, 0)  # no fraction, none
    for n in range(2, 40):
        n_val, n_test = held_out_sizes(n, 0.15, 0.15)
        assert n - n_val - n_test >= 1


def test_files_without_an_image_extension_are_listed_not_silently_dropped(tmp_path):
    root = make_shapes(tmp_path / "d", per_class=5)
    jpeg = (root / "circle" / "circle_000.png").read_bytes()
    (root / "circle" / "photo.heic").write_bytes(jpeg)
    (root / "square" / "noextension").write_bytes(jpeg)
    (root / "square" / ".DS_Store").write_bytes(b"junk")  # hidden: neither data nor worth a warning
    ds = scan_dataset(root)
    assert sorted(p.name for p in ds.ignored) == ["noextension", "photo.heic"]
    assert all(s.path.name not in ("photo.heic", "noextension") for s in ds.samples)
    from pixclass.data.scan import ignored_files_note
    note = ignored_files_note(ds.ignored)
    assert note.startswith("ignored 2 file(s) without an image extension (.heic 1, no extension 1")


def test_a_dataset_of_only_unread_extensions_names_them(tmp_path):
    image = (make_shapes(tmp_path / "d", per_class=1) / "circle" / "circle_000.png").read_bytes()
    for cls in ("a", "b"):
        (tmp_path / "heic" / cls).mkdir(parents=True)
        (tmp_path / "heic" / cls / "photo.heic").write_bytes(image)
    with pytest.raises(DatasetError) as error:
        scan_dataset(tmp_path / "heic")
    message = str(error.value)
    assert "no images found" in message and "ignored 2 file(s) without an image extension (.heic 2" in message

