"""Grad-CAM, filters and the run report."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import chromium_page, needs_chromium, run_cli, subset

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
OUTPUT = Path(__file__).resolve().parent / "output"  # screenshots and figures a person may look at


@pytest.fixture(scope="module")
def cifar_subset(cifar_train_400, tmp_path_factory):
    """automobile vs frog, 400 training images each."""
    return subset(cifar_train_400, tmp_path_factory.mktemp("cars-frogs"), {"automobile", "frog"})


@pytest.fixture(scope="module")
def cifar_model(cifar_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("train", cifar_subset, "--model", "classic-cnn", "--image-size", "48", "--epochs", "8", "--augment", "none", "--out", out,
                   "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 archive not available")
def test_gradcam_heatmap_follows_the_object(cifar_model, cifar_subset):
    from pixclass import load
    run, summary = cifar_model
    assert summary["metrics"]["accuracy"] > 0.8
    clf = load(run / "model")
    car = Image.open(sorted((cifar_subset / "automobile").iterdir())[3]).convert("RGB").resize((48, 48))
    peaks = []
    for corner in ((0, 0), (48, 48)):
        canvas = Image.new("RGB", (96, 96), (128, 128, 128))
        canvas.paste(car, corner)
        result = clf.explain(canvas, class_name="automobile")
        heat = result["heatmap"]
        assert heat.shape == (48, 48) and heat.max() > heat.min()  # input size, not constant
        half = heat.shape[0] // 2
        quadrants = {(0, 0): heat[:half, :half].sum(), (48, 48): heat[half:, half:].sum()}
        peaks.append(max(quadrants, key=quadrants.get))
        assert result["figure"] is not None and abs(sum(result["probabilities"].values()) - 1) < 1e-5
    assert peaks == [(0, 0), (48, 48)]


@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 archive not available")
def test_explain_and_filters_commands(cifar_model, cifar_subset, tmp_path):
    run, _ = cifar_model
    images = sorted((cifar_subset / "frog").iterdir())[:3]
    for method in ("gradcam", "gradcam++", "eigencam", "layercam", "scorecam"):
        proc = run_cli("explain", run / "model", *images, "--method", method, "--out", tmp_path / method, "-q")
        assert proc.returncode == 0, proc.stderr
        assert len(list((tmp_path / method).glob("*.png"))) == 3
    proc = run_cli("filters", run / "model", "--image", images[0], "--out", tmp_path / "f")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f" / "filters.png").is_file() and (tmp_path / "f" / "feature_maps.png").is_file()
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "gradcam" / f"{images[0].stem}_gradcam.png", OUTPUT / "explain_gradcam.png")
    shutil.copy(tmp_path / "f" / "filters.png", OUTPUT / "filters.png")
    bad = run_cli("explain", run / "model", images[0], "--method", "magic")
    assert bad.returncode == 2 and "--method must be one of" in bad.stderr


def test_filters_api_shapes(trained_run):
    from pixclass import load
    filters, fig = load(trained_run["model_dir"]).filters()
    assert filters.shape == (32, 3, 3, 3) and filters.min() >= 0 and filters.max() <= 1 and fig is not None


def test_own_gradcam_equals_pytorch_grad_cam(trained_run, shapes_session):
    """pixclass computes plain Grad-CAM itself (to spare the library's ~1 s import); the maps must
    be the library's, for the seed CNN and for a pretrained EfficientNet-Lite0."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM as LibraryGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pixclass import artifact
    from pixclass.explain import GradCAM
    from pixclass.models.registry import create_model, family_of

    classic = artifact.load(trained_run["model_dir"])
    lite0, lite0_arch = create_model("efficientnet_lite0", 3)
    torch.manual_seed(0)
    for model, arch, size in ((classic.model.eval(), classic.arch, 32), (lite0.eval(), lite0_arch, 224)):
        layer = family_of(arch).gradcam_layer(model)
        x = torch.randn(3, 3, size, size)
        for p in model.parameters():
            p.requires_grad_(False)  # as Explainer leaves them for pixclass's Grad-CAM
        ours = GradCAM(model, layer)
        maps, probs = ours(x)
        class_one, _ = ours(x, class_index=1)
        ours.release()
        for p in model.parameters():
            p.requires_grad_(True)  # as the library expects
        with LibraryGradCAM(model=model, target_layers=[layer]) as library:
            expected = library(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in probs.argmax(1)])
            expected_one = library(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 3)
        assert maps.shape == expected.shape == (3, size, size) and maps.std() > 0.05
        assert np.abs(maps - expected).max() < 1e-3 and np.abs(class_one - expected_one).max() < 1e-3


@needs_chromium
def test_report_renders_in_chromium_with_every_section(trained_run):
    from pixclass.report import SECTIONS
    report = Path(trained_run["run_dir"]) / "report.html"
    assert Path(trained_run["report"]) == report
    for png in ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png",
                "top_losses.png"):
        assert (report.parent / png).is_file(), png
    OUTPUT.mkdir(exist_ok=True)
    errors = []
    with chromium_page(report.as_uri(), errors) as page:
        for section in SECTIONS:
            assert page.locator(f"section#{section} h2").count() == 1, section
        assert page.locator("section#top-losses img").count() == 1
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUTPUT / "report.png"), full_page=True)
    assert errors == []
    assert "http" not in report.read_text().replace("http-equiv", "")  # self-contained: nothing fetched


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_explaining_500_images_keeps_memory_flat(trained_run, shapes_session, tmp_path):
    from pixclass import artifact
    from pixclass.explain import explain_files
    art = artifact.load(trained_run["model_dir"])
    files = sorted(shapes_session.rglob("*.png"))
    paths = [files[i % len(files)] for i in range(500)]
    explain_files(art, paths[:50], tmp_path / "warm")
    base = _rss_mb()
    explain_files(art, paths, tmp_path / "all")
    after = _rss_mb()
    assert len(list((tmp_path / "all").glob("*.png"))) == len(files)  # same names overwrite
    assert after <= base * 1.10, (base, after)
