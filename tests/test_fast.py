"""The fast from-scratch recipe and the decoded-image cache."""

import json

import pytest
import torch

from conftest import make_shapes, run_cli


def test_whitening_layer_whitens_patches():
    from pixclass.models.airbench import AirbenchNet
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 16, 16, generator=g))  # correlated channels
    net = AirbenchNet(num_classes=3)
    net.init_whitening(images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # the positive half
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_whitening_stays_float32_under_bfloat16_autocast():
    """bfloat16 would round away the pixel differences the smallest-eigenvalue filters amplify
    (measured on CIFAR-10: 12-16% rms error in those channels)."""
    from pixclass.models.airbench import AirbenchNet
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=g).cumsum(-1) / 4  # smooth rows: small neighbour differences
    net = AirbenchNet(num_classes=3)
    net.init_whitening(images)
    seen = {}
    net.whiten.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        net(images)
        exact = seen["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(images)
    assert seen["out"].dtype == torch.float32
    assert torch.allclose(seen["out"], exact, atol=1e-5)


def test_translations_are_crops_of_the_reflect_padded_images():
    """Each batch is padded on its own (no padded copy of the training set is kept): every crop is
    one of the (2 * shift + 1)^2 windows of that image padded by reflection, at a drawn offset."""
    import torch.nn.functional as F

    from pixclass.train.recipes.fast import _crops
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    idx = torch.tensor([7, 3, 3, 49, 0])
    crops = _crops(images, idx, 8, 2, torch.Generator().manual_seed(0))
    padded = F.pad(images, (2,) * 4, mode="reflect")
    offsets = set()
    for crop, i in zip(crops, idx):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(crop, padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert windows, "a crop is not a window of its padded image"
        offsets.add(windows[0])
    assert len(offsets) > 1  # offsets are drawn per image


def test_fast_recipe_trains_and_saves_a_usable_model(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=40)
    proc = run_cli("train", data, "--recipe", "fast", "--epochs", "4", "--image-size", "32", "--out", tmp_path / "r",
                   "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    m = summary["metrics"]
    assert m["tta"] == "hflip" and m["accuracy"] > 0.5
    meta = json.loads((tmp_path / "r" / "model" / "pixclass.json").read_text())
    assert meta["arch"]["name"] == "airbench"
    assert meta["tta"] == "hflip"
    pred = run_cli("predict", tmp_path / "r" / "model", data / "circle", "--json")
    assert pred.returncode == 0 and len(json.loads(pred.stdout)) == 40
    # the run's figure is what the saved model gives on the held-out files
    import numpy as np
    import pixclass
    held = [line.split(",") for line in (tmp_path / "r" / "manifest.csv").read_text().splitlines()[1:]
            if line.endswith("," + m["split"])]
    model = pixclass.load(tmp_path / "r" / "model")
    probs = model.predict_proba([data / row[0] for row in held])
    labels = np.array([model.classes.index(row[1]) for row in held])
    assert float((probs.argmax(1) == labels).mean()) == m["accuracy"]


def test_images_beyond_their_memory_share_are_read_from_the_cache_and_train_the_same_model(tmp_path, monkeypatch):
    """A --max-memory too small to hold the decoded images: they are read from the decoded-image
    cache batch by batch, and the run trains exactly the model the held images train."""
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_shapes(tmp_path / "shapes", per_class=40)
    args = ["train", data, "--recipe", "fast", "--epochs", "2", "--image-size", "32", "--json"]
    held = run_cli(*args, "--out", tmp_path / "held")
    on_disk = run_cli(*args, "--max-memory", "0.0001", "--out", tmp_path / "disk")
    assert held.returncode == 0 and on_disk.returncode == 0, held.stderr + on_disk.stderr
    assert "read from the cache per batch" in on_disk.stderr and "read from the cache per batch" not in held.stderr
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("held", "disk")]
    assert weights[0] == weights[1]
    assert json.loads(held.stdout)["metrics"]["accuracy"] == json.loads(on_disk.stdout)["metrics"]["accuracy"]


def test_a_damaged_decoded_image_cache_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_shapes(tmp_path / "shapes", per_class=10)
    args = ["train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--augment", "none"]
    assert run_cli(*args, "--out", tmp_path / "a").returncode == 0
    shards = sorted((tmp_path / "cache" / "images").glob("*/*.safetensors"))
    assert shards
    with open(shards[0], "r+b") as f:  # cut short, as a disk filling up mid-write would leave it
        f.truncate(f.seek(0, 2) // 2)
    again = run_cli(*args, "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert "damaged decoded-image cache" in again.stderr
    assert again.stderr.count("decoded images from the cache") == 2  # the two intact splits


def test_wide_network_has_airbench95_sizes_and_rebuilds_from_its_arch():
    from pixclass.models.registry import build_model, create_model
    from pixclass.train.recipes.fast import hyper_for
    _, arch = create_model("airbench-wide", 10, 3, 32)
    rebuilt = build_model(arch)
    assert [group[0].out_channels for group in rebuilt.groups] == [128, 384, 384]
    assert [group[0].out_channels for group in build_model(create_model("airbench", 10, 3, 32)[1]).groups] == [64, 256, 256]
    assert (hyper_for("airbench-wide").epochs, hyper_for("airbench").epochs) == (15, 10)
    assert hyper_for("airbench-wide").lr < hyper_for("airbench").lr


def test_fast_recipe_rejects_another_model(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=4)
    proc = run_cli("train", data, "--recipe", "fast", "--model", "resnet18", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "--recipe fast trains its own network" in proc.stderr


def test_fast_recipe_refuses_settings_it_would_ignore(tmp_path):
    """airbench's optimizer, schedule and batch size are its own: a flag for them would do nothing,
    so it is an error that names it, before any run folder is made."""
    data = make_shapes(tmp_path / "shapes", per_class=4)
    proc = run_cli("train", data, "--recipe", "fast", "--lr", "0.5", "--batch-size", "128", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "--batch-size, --lr would have no effect" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_fast_recipe_takes_label_smoothing_and_records_what_it_trained_with(tmp_path, monkeypatch):
    import yaml
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_shapes(tmp_path / "shapes", per_class=16)
    args = ["train", data, "--recipe", "fast", "--epochs", "1", "--image-size", "32", "-q"]
    runs = {"own": (), "off": ("--label-smoothing", "0")}
    for name, extra in runs.items():
        assert run_cli(*args, *extra, "--out", tmp_path / name).returncode == 0
    recorded = {name: yaml.safe_load((tmp_path / name / "config.yaml").read_text())["train"]["label_smoothing"]
                for name in runs}
    assert recorded == {"own": 0.2, "off": 0.0}
    import csv
    losses = {name: next(csv.DictReader((tmp_path / name / "metrics.csv").open()))["train_loss"] for name in runs}
    assert losses["own"] != losses["off"]  # same seed, data and steps: only the loss differs
    again = run_cli("train", "--config", tmp_path / "off" / "config.yaml", "-q", "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert ((tmp_path / "again" / "model" / "model.safetensors").read_bytes()
            == (tmp_path / "off" / "model" / "model.safetensors").read_bytes())


def test_augment_none_trains_and_predicts_without_mirrored_images(tmp_path, monkeypatch):
    """Digits, text and arrows change meaning in a mirror: with --augment none the fast recipe
    neither trains on mirrored or shifted images nor averages the mirror in the saved model."""
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_shapes(tmp_path / "shapes", per_class=16)
    args = ["train", data, "--recipe", "fast", "--epochs", "1", "--image-size", "32", "--json", "-q"]
    runs = {"own": (), "none": ("--augment", "none")}
    done = {name: run_cli(*args, *extra, "--out", tmp_path / name) for name, extra in runs.items()}
    assert all(proc.returncode == 0 for proc in done.values()), [p.stderr for p in done.values()]
    tta = {name: json.loads((tmp_path / name / "model" / "pixclass.json").read_text())["tta"] for name in runs}
    assert tta == {"own": "hflip", "none": "none"}
    assert json.loads(done["none"].stdout)["metrics"]["tta"] == "none"
    import csv
    losses = {name: next(csv.DictReader((tmp_path / name / "metrics.csv").open()))["train_loss"] for name in runs}
    assert losses["own"] != losses["none"]
    config = tmp_path / "rotated.yaml"
    config.write_text(f"data: {{path: {data}, image_size: 32}}\ntrain: {{recipe: fast}}\naugment: {{rotation: 5}}\n")
    refused = run_cli("train", "--config", config, "--out", tmp_path / "rotated")
    assert refused.returncode == 2 and "augment.rotation would have no effect" in refused.stderr, refused.stderr


def test_decoded_images_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))  # empty: nothing decoded before
    data = make_shapes(tmp_path / "shapes", per_class=10)
    args = ["--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--augment", "none"]
    first = run_cli("train", data, *args, "--out", tmp_path / "a")
    assert first.returncode == 0 and "from the cache" not in first.stderr
    second = run_cli("train", data, *args, "--out", tmp_path / "b")
    assert "decoded images from the cache" in second.stderr
    from PIL import Image
    victim = sorted((data / "circle").iterdir())[0]
    Image.open(victim).rotate(90).save(victim)
    third = run_cli("train", data, *args, "--out", tmp_path / "c")
    assert third.returncode == 0
    # the split holding the changed file is decoded again; the others still come from the cache
    assert third.stderr.count("decoded images from the cache") == second.stderr.count("decoded images from the cache") - 1


@pytest.mark.ddp
def test_fast_recipe_under_two_processes_trains_once(tmp_path):
    """The fast recipe is single-process: under --nproc 2 rank 0 trains and writes, rank 1 leaves
    at once, and one summary is printed."""
    import os
    import subprocess
    import sys
    data = make_shapes(tmp_path / "shapes", per_class=12)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "pixclass", "train", str(data), "--recipe", "fast", "--epochs", "2",
                           "--image-size", "32", "--out", str(tmp_path / "runs" / "r"), "--nproc", "2", "--json", "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # exactly one JSON document: one summary
    assert summary["recipe"] == "fast" and summary["epochs_run"] == 2
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]
    assert sorted(p.name for p in (tmp_path / "runs" / "r" / "model").iterdir()) == ["model.safetensors",
                                                                                    "pixclass.json"]
    assert len((tmp_path / "runs" / "r" / "metrics.csv").read_text().splitlines()) == 3
