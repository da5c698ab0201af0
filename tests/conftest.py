"""Small real image data made on the fly: three classes of drawn shapes that a small CNN learns
in a few epochs."""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(kind: str, rng: random.Random, size: int = 40) -> Image.Image:
    bg = tuple(rng.randint(0, 80) for _ in range(3))
    fg = tuple(rng.randint(150, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def make_shapes(root: Path, per_class: int = 30, seed: int = 0, classes=SHAPES, fmt: str = "png",
                size: int = 40) -> Path:
    rng = random.Random(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, rng, size).save(root / kind / f"{kind}_{i:03d}.{fmt}")
    return root


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_shapes(tmp_path / "shapes")


@pytest.fixture(scope="session")
def shapes_session(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes", per_class=40)


@pytest.fixture(scope="session")
def trained_run(shapes_session, tmp_path_factory) -> dict:
    """One small seed-CNN run shared by the tests that need a trained model."""
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training

    cfg = RunConfig(data=DataConfig(path=str(shapes_session), image_size=32), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"),
                    train=TrainConfig(epochs=12, batch_size=16, seed=0))
    return run_training(cfg, out=tmp_path_factory.mktemp("runs") / "shapes", reporter=Reporter(quiet=True))


def run_cli(*args, cwd=None):
    """Run `python -m pixclass ARGS` in a fresh process; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "pixclass", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def chromium_path():
    import shutil
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed")


@contextmanager
def chromium_page(uri: str, errors: list):
    """A headless Chromium page (Debian's, through playwright) opened at `uri`; the console's
    errors and the page's exceptions are appended to `errors`."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(uri)
        try:
            yield page
        finally:
            browser.close()


HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera.tar.gz"
needs_hymenoptera = pytest.mark.skipif(not HYMENOPTERA.is_file(), reason="ants/bees archive not available")


@pytest.fixture(autouse=True, scope="session")
def _private_feature_cache(tmp_path_factory):
    """Tests never read or fill the user's ~/.cache/pixclass."""
    import os
    os.environ["PIXCLASS_CACHE_DIR"] = str(tmp_path_factory.mktemp("pixclass-cache"))


@pytest.fixture(scope="session")
def hymenoptera(tmp_path_factory) -> Path:
    """The full ants/bees photo set (train/ants, train/bees, val/ants, val/bees); tests that use it
    skip where the archive is missing."""
    import tarfile
    if not HYMENOPTERA.is_file():
        pytest.skip("ants/bees archive not available")
    dest = tmp_path_factory.mktemp("hymenoptera")
    with tarfile.open(HYMENOPTERA) as tar:
        tar.extractall(dest, filter="data")
    return dest / "hymenoptera"


@pytest.fixture(scope="session")
def ants_bees_small(hymenoptera, tmp_path_factory) -> Path:
    """A small copy: 24 training and 12 validation photos per class."""
    import shutil
    dest = tmp_path_factory.mktemp("ab-small") / "ab"
    for split, n in (("train", 24), ("val", 12)):
        for cls in ("ants", "bees"):
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((hymenoptera / split / cls).iterdir())[:n]:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
needs_cifar = pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason="CIFAR-10 archive not available")


@pytest.fixture(scope="session")
def cifar_train_400(tmp_path_factory) -> Path:
    """The first 400 training JPEGs of every CIFAR-10 class (one pass over the archive); tests that
    use it skip where the archive is missing."""
    import tarfile
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip("CIFAR-10 archive not available")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1] == "train"]
    by_class = {}
    for m in members:
        by_class.setdefault(m.name.split("/")[2], []).append(m)
    keep = [m for ms in by_class.values() for m in sorted(ms, key=lambda m: m.name)[:400]]
    # in archive order: a gzip stream cannot seek back, so extracting members out of order
    # decompresses the archive again from its start for each step back (minutes, not seconds)
    keep.sort(key=lambda m: m.offset)
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        tar.extractall(root, members=keep, filter="data")
    return root / "cifar10" / "train"


def subset(source: Path, dest: Path, classes=None, per_class: int = 400) -> Path:
    """Class folders linking to the first `per_class` files of `source`'s classes."""
    for cls in sorted(d.name for d in source.iterdir() if d.is_dir()):
        if classes and cls not in classes:
            continue
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / cls).iterdir())[:per_class]:
            (dest / cls / f.name).symlink_to(f)
    return dest


def start_server(model_dir, *args):
    """`pixclass serve MODEL ARGS` on a free local port; returns (process, base URL) once /readyz
    answers 200."""
    from pixclass.serve.local import start_local
    return start_local(model_dir, *args, timeout_s=30)


def make_multilabel_pairs(source: Path, dest: Path, classes, pairs: int, seed: int = 0, per_class: int = 400,
                          splits: bool = False) -> Path:
    """A multi-label set from single-label class folders: each image two of `source`'s images side
    by side (64x32 for CIFAR-10), labelled with both classes (one label when both halves are of
    the same class), listed in `dest`/labels.csv (`path,"tag1 tag2"`). Each half is drawn without
    replacement from the first `per_class` files of its class, so no image appears in two pairs
    while there are enough. `splits`: a split column, 70/15/15 by position (seeded order)."""
    import csv
    rng = random.Random(seed)
    pools = {c: sorted((source / c).iterdir())[:per_class] for c in classes}
    for files in pools.values():
        rng.shuffle(files)
    used = {c: 0 for c in classes}

    def take(c):
        f = pools[c][used[c] % len(pools[c])]
        used[c] += 1
        return f

    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(pairs):
        a, b = rng.choice(classes), rng.choice(classes)
        left, right = Image.open(take(a)).convert("RGB"), Image.open(take(b)).convert("RGB")
        pair = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width, 0))
        name = f"images/{i:05d}.jpg"
        pair.save(dest / name, quality=95)
        split = ["train", "val", "test"][(i * 20 // pairs >= 14) + (i * 20 // pairs >= 17)] if splits else None
        rows.append([name, " ".join(sorted({a, b}))] + ([split] if splits else []))
    with open(dest / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"] + (["split"] if splits else []))
        writer.writerows(rows)
    return dest / "labels.csv"


MULTILABEL_CLASSES = ("airplane", "automobile", "cat", "frog")


@pytest.fixture(scope="session")
def cifar_multilabel(cifar_train_400, tmp_path_factory) -> Path:
    """labels.csv of 480 multi-label pairs (64x32) of 4 CIFAR-10 classes."""
    return make_multilabel_pairs(cifar_train_400, tmp_path_factory.mktemp("multilabel"), MULTILABEL_CLASSES, 480)
