"""Transfer learning from the offline ImageNet EfficientNet-Lite0 weights on real ants/bees photos."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_hymenoptera, run_cli

# tests that use the ants/bees photos skip through their fixture when the archive is missing; the
# others run everywhere


@needs_hymenoptera
def test_packaged_imagenet_weights_are_real(hymenoptera):
    """Untouched ImageNet model: ants come out among the top-5 as class 310, bees as 309."""
    from pixclass.data.decode import decode_image
    from pixclass.data.transforms import batch_to_input, image_to_uint8
    from pixclass.models.pretrained import imagenet_model, pretrained_preprocess

    model = imagenet_model("efficientnet_lite0")
    pre = pretrained_preprocess(model)
    hits = {}
    for cls, target in (("ants", 310), ("bees", 309)):
        files = sorted((hymenoptera / "train" / cls).iterdir()) + sorted((hymenoptera / "val" / cls).iterdir())
        found = 0
        for start in range(0, len(files), 32):
            batch = torch.stack([image_to_uint8(decode_image(f), pre) for f in files[start:start + 32]])
            with torch.inference_mode():
                top5 = model(batch_to_input(batch, pre)).topk(5, dim=1).indices
            found += int((top5 == target).any(dim=1).sum())
        hits[cls] = found / len(files)
    assert hits["ants"] >= 0.85 and hits["bees"] >= 0.85, hits


@pytest.fixture(scope="module")
def transfer_run(ants_bees_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "run"
    proc = run_cli("train", ants_bees_small, "--model", "efficientnet_lite0", "--head-epochs", "4", "--epochs", "2",
                   "--feature-views", "1", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_default_recipe_trains_head_then_fine_tunes(transfer_run):
    summary, _ = transfer_run
    run = Path(summary["run_dir"])
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["head"] * 4 + ["finetune"] * 2
    assert summary["metrics"]["split"] == "val" and summary["metrics"]["accuracy"] >= 0.75
    meta = json.loads((run / "model" / "pixclass.json").read_text())
    assert meta["arch"]["backbone"] == "tf_efficientnet_lite0"
    assert meta["preprocess"] == {"size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "interpolation": "bicubic", "resize": "crop", "crop_pct": 0.875}


def test_metrics_from_cached_features_match_the_saved_model_on_images(transfer_run, ants_bees_small):
    """The features path used in training and the artifact used for prediction agree."""
    summary, _ = transfer_run
    proc = run_cli("evaluate", summary["model_dir"], ants_bees_small, "--json", "--out", Path(summary["run_dir"]) / "ev")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["n"] == summary["metrics"]["n"] == 24
    assert metrics["accuracy"] == summary["metrics"]["accuracy"]
    assert abs(metrics["loss"] - summary["metrics"]["loss"]) < 1e-4


def test_feature_cache_is_reused_and_keyed_by_content(ants_bees_small, tmp_path):
    data = tmp_path / "ab"
    shutil.copytree(ants_bees_small, data)
    args = ["--model", "efficientnet_lite0", "--freeze", "--head-epochs", "2", "-q"]
    env_cache = os.environ["PIXCLASS_CACHE_DIR"]
    first = run_cli("train", data, *args, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    again = run_cli("train", data, *args[:-1], "--out", tmp_path / "b")
    assert "all 72 images found in the cache" in again.stderr, again.stderr
    # same name, new content: must be recomputed, never served from the stale entry
    victim = sorted((data / "train" / "ants").iterdir())[0]
    from PIL import Image
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    third = run_cli("train", data, *args[:-1], "--out", tmp_path / "c")
    assert third.returncode == 0 and "found in the cache" not in third.stderr
    assert "features 1/1 (100%)" in third.stderr  # the one changed image, computed again
    assert env_cache == os.environ["PIXCLASS_CACHE_DIR"]
    # each run that computed something wrote one shard with only what it computed
    shards = sorted(Path(env_cache, "features").glob("*/*.safetensors"), key=lambda p: p.stat().st_size)
    assert len(shards) >= 2 and shards[0].stat().st_size < shards[-1].stat().st_size / 10
    # a damaged shard is never trusted: its entries are computed again
    newest = max(shards, key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"not a safetensors file")
    fourth = run_cli("train", data, *args[:-1], "--out", tmp_path / "d")
    assert fourth.returncode == 0 and "found in the cache" not in fourth.stderr and "1/1" in fourth.stderr
    assert f"damaged feature-cache shard {newest} skipped" in fourth.stderr


def test_freeze_trains_only_the_head(ants_bees_small, tmp_path):
    proc = run_cli("train", ants_bees_small, "--model", "efficientnet_lite0", "--freeze", "--head-epochs", "3",
                   "--out", tmp_path / "r", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["head"] * 3
    assert summary["timings"]["finetune_s"] == 0
    from safetensors.torch import load_file

    from pixclass.config import ModelConfig
    from pixclass.models.registry import create_model
    trained = load_file(tmp_path / "r" / "model" / "model.safetensors")
    fresh, _ = create_model("efficientnet_lite0", 2, 3, 224, ModelConfig(name="efficientnet_lite0"))
    for key, value in fresh.backbone.state_dict().items():
        assert torch.equal(trained[f"backbone.{key}"], value), key  # BatchNorm statistics included


def test_user_weights_file_reports_matches(tmp_path, ants_bees_small):
    from safetensors.torch import save_file

    from pixclass.config import ModelConfig
    from pixclass.models.registry import create_model
    model, _ = create_model("efficientnet_lite0", 2, 3, 224, ModelConfig(name="efficientnet_lite0"))
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(model.backbone.state_dict(), tmp_path / "w.pth")
    for weights in ("w.safetensors", "w.pth"):
        proc = run_cli("train", ants_bees_small, "--model", "efficientnet_lite0", "--weights", tmp_path / weights,
                       "--freeze", "--head-epochs", "1", "--out", tmp_path / f"r-{weights}")
        assert proc.returncode == 0, proc.stderr
        assert "294 tensors matched" in proc.stderr


def test_pretrained_timm_model_offline_is_a_clear_error(ants_bees_small, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pixclass", "train", str(ants_bees_small), "--model", "resnet18",
                           "--pretrained", "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "cannot get pretrained weights for resnet18" in proc.stderr and "--weights FILE" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_summary_shows_frozen_and_trainable_counts():
    proc = run_cli("summary", "efficientnet_lite0", "--classes", "2", "--freeze")
    assert proc.returncode == 0, proc.stderr
    assert "Trainable params: 328,450" in proc.stdout and "Non-trainable params: 3,371,008" in proc.stdout


def test_cut_model_reproduces_the_full_forward():
    from pixclass.config import ModelConfig
    from pixclass.models.registry import create_model
    from pixclass.models.transfer import default_cut
    model, _ = create_model("efficientnet_lite0", 3, 3, 224, ModelConfig(name="efficientnet_lite0"))
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    cut = default_cut(model)
    with torch.no_grad():
        assert torch.allclose(model.forward_from(cut, model.features_until(cut, x)), model(x), atol=1e-5)
    assert np.isclose(cut, len(model.units) - 2)


def test_preprocessing_known_before_timm_matches_timm():
    """Runs start decoding before timm is imported, from pixclass's copy of timm's data config."""
    import timm

    from pixclass.models.pretrained import OFFLINE_DATA_CONFIG, known_preprocess, pretrained_preprocess, timm_name
    for name in OFFLINE_DATA_CONFIG:
        backbone = timm.create_model(timm_name(name), pretrained=False, num_classes=0)
        for channels, size in ((3, None), (1, None), (3, 160)):
            assert known_preprocess(name, channels, size) == pretrained_preprocess(backbone, channels, size), name
    assert known_preprocess("resnet18") is None


def test_features_from_images_decoded_ahead_equal_decoding_on_demand(ants_bees_small, tmp_path, monkeypatch):
    """Decoding ahead covers every file of the run while only some miss the cache; unreadable
    files are reported the same either way."""
    from pixclass.data.loaders import DecodeAhead
    from pixclass.models.registry import create_model
    from pixclass.models.pretrained import pretrained_preprocess
    from pixclass.models.transfer import default_cut
    from pixclass.progress import Reporter
    from pixclass.train.features import extract_features

    files = sorted(ants_bees_small.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:300])
    model, _ = create_model("efficientnet_lite0", 2)
    model.eval()
    pre = pretrained_preprocess(model.backbone)
    cut = default_cut(model)
    wanted = {"train": (files[:40] + [broken], [0] * 41, 0), "val": (files[50:60], [1] * 10, 0)}
    results = []
    for ahead in (False, True):
        monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / f"cache-{ahead}"))
        decoding = DecodeAhead(files + [broken], pre, workers=1) if ahead else None
        results.append(extract_features(model, cut, wanted, pre, None, 0, Reporter(quiet=True), decoding=decoding))
    (on_demand, failed_a), (decoded_ahead, failed_b) = results
    assert [p for p, _ in failed_a] == [p for p, _ in failed_b] == [broken]
    for split in ("train", "val"):
        assert on_demand[split].paths == decoded_ahead[split].paths and len(on_demand[split]) == len(wanted[split][0]) - (split == "train")
        assert torch.equal(on_demand[split].tensor(), decoded_ahead[split].tensor())


def test_feature_cache_is_shared_by_models_whose_heads_differ(ants_bees_small, tmp_path, monkeypatch):
    """The cache key covers the backbone's weights only: a second model with another random head
    (audit, tune and train each build their own) finds the first one's full-depth features."""
    from pixclass.models.registry import create_model
    from pixclass.models.pretrained import pretrained_preprocess
    from pixclass.progress import Reporter
    from pixclass.train import features

    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    files = sorted(ants_bees_small.rglob("*.jpg"))[:4]
    rows, heads = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, _ = create_model("efficientnet_lite0", 2)
        model.eval()
        heads.append(model.head[0].weight)
        rows.append(features.extract_features(model, model.n_units, {"all": (files, [0, 0, 1, 1], 0)},
                                              pretrained_preprocess(model.backbone), None, 0, Reporter(quiet=True))[0])
        if seed == 0:
            monkeypatch.setattr(features, "_compute", lambda *a, **k: pytest.fail("features computed again"))
    assert not torch.equal(*heads)
    assert torch.equal(rows[0]["all"].tensor(), rows[1]["all"].tensor())
    assert len(list((tmp_path / "cache" / "features").glob("*/*.safetensors"))) == 1


def test_predict_and_the_service_answer_unknown_for_cifar_images_not_for_unseen_ants_and_bees(
        transfer_run, hymenoptera, cifar_train_400):
    """The deployed knn_similarity threshold (features of the fine-tuned backbone against a bank
    of the training images'): CIFAR-10 photos, upscaled by the model's preprocessing, are not ants
    or bees, and photos of ants and bees the run never saw mostly are."""
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    summary, _ = transfer_run
    unseen = [f for cls in ("ants", "bees") for f in sorted((hymenoptera / "val" / cls).iterdir())[12:24]]
    cifar = [f for cls in sorted(os.listdir(cifar_train_400)) for f in sorted((cifar_train_400 / cls).iterdir())[:2]]
    meta = json.loads((Path(summary["model_dir"]) / "pixclass.json").read_text())
    assert meta["abstain"]["method"] == "knn_similarity"
    out = json.loads(run_cli("predict", summary["model_dir"], *unseen, *cifar, "--json").stdout)
    on_unseen, on_cifar = out[:len(unseen)], out[len(unseen):]
    assert sum(r["answer"] == "unknown" for r in on_cifar) >= 18, [r["score"] for r in on_cifar]
    assert sum(r["unknown"] for r in on_unseen) <= 3, [r["score"] for r in on_unseen]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in unseen[:4] + cifar[:4]]
    with TestClient(create_app(Settings(model=summary["model_dir"]))) as client:
        body = client.post("/v1/predict", files=files).json()
    assert [p["unknown"] for p in body["predictions"]] == [r["unknown"] for r in on_unseen[:4] + on_cifar[:4]]
    assert [p["score"] for p in body["predictions"]] == pytest.approx(
        [r["score"] for r in on_unseen[:4] + on_cifar[:4]], abs=1e-4)


def test_calibration_from_cached_features_matches_the_saved_model_on_images(transfer_run, ants_bees_small):
    """Calibration reads the fine-tuned tail's outputs from the feature cache instead of running
    the network on the images again: the temperature, the bank and the threshold it stores are
    what the saved model gives on the images themselves."""
    import csv

    from pixclass import artifact as artifact_io
    from pixclass.abstain import fit_abstain
    from pixclass.calibration import fit_temperature
    from pixclass.data.loaders import load_split
    from pixclass.feature_bank import features_of_batches, nearest_similarity_in_chunks
    from pixclass.progress import Reporter
    from pixclass.tta import combine_views
    summary, _ = transfer_run
    art = artifact_io.load(summary["model_dir"])
    rows = list(csv.DictReader((Path(summary["run_dir"]) / "manifest.csv").open()))

    def on_images(split):
        chosen = [r for r in rows if r["split"] == split]
        data, _ = load_split([ants_bees_small / r["path"] for r in chosen], [art.classes.index(r["class"]) for r in chosen],
                             art.preprocess, Reporter(quiet=True), 4.0)
        assert len(data) == len(chosen) > 0
        return features_of_batches(art.model, art.preprocess, data.batches(8), art.tta)

    val_logits, val_features, val_labels = on_images("val")
    temperature = fit_temperature(val_logits, val_labels)
    assert art.temperature == pytest.approx(temperature, rel=0.02)
    _, train_features, _ = on_images("train")
    bank = art.feature_bank.float()
    assert 0 < len(bank) <= train_features.shape[1]
    # every bank row is a training image's features, as the saved model computes them
    assert (bank @ train_features[0].T).max(dim=1).values.min() > 0.999
    similarity = nearest_similarity_in_chunks(val_features, bank).numpy()
    refit = fit_abstain(combine_views(val_logits, temperature).numpy(), method="knn_similarity",
                        fallback=art.abstain.fallback, similarity=similarity)
    assert art.abstain.method == "knn_similarity"
    assert art.abstain.threshold == pytest.approx(refit.threshold, abs=2e-3)
