"""Test-time augmentation stored in the artifact (`tta`): "hflip" averages the probabilities of
the image and of its mirror, identically in the PyTorch backend, the ONNX export and its
verification, predict, evaluate, the service and explain; the field survives save and load, an
artifact without it means "none", an unknown value is refused with one line, and a recipe's
FitResult.tta reaches the saved artifact and its report."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import make_shapes, run_cli

CLASSES = ["circle", "square", "triangle"]


def _asymmetric_image(path: Path) -> Path:
    """A picture whose mirror is another picture: a left-to-right ramp with a triangle on the left."""
    ramp = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))
    img = Image.fromarray(np.stack([ramp, ramp // 2, 255 - ramp], axis=2))
    ImageDraw.Draw(img).polygon([(4, 30), (14, 8), (18, 30)], fill=(250, 250, 40))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("tta-data") / "shapes", per_class=8)


@pytest.fixture(scope="module")
def asymmetric(tmp_path_factory) -> Path:
    return _asymmetric_image(tmp_path_factory.mktemp("tta-img") / "asymmetric.png")


def _save_model(folder: Path, data: Path, tta: str = "hflip") -> Path:
    """An untrained classic CNN for 32-px images (what a trained one looks like on disk, without
    the seconds of training), saved with the given test-time augmentation. Its last layer is
    scaled up so that it answers as confidently as a trained one (an untrained one is near-uniform,
    where the mirror's effect would be small)."""
    from pixclass import artifact
    from pixclass.config import ModelConfig
    from pixclass.data.transforms import Preprocess
    from pixclass.models.registry import create_model
    torch.manual_seed(0)
    model, arch = create_model("classic-cnn", num_classes=3, in_channels=3, image_size=32,
                               model_cfg=ModelConfig(name="classic-cnn", filters=(8, 16), dense=32))
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(20)
    art = artifact.Artifact(model=model, arch=arch, classes=CLASSES,
                            preprocess=Preprocess(size=32, mean=(0.3, 0.3, 0.3), std=(0.3, 0.3, 0.3)),
                            config={"data": {"path": str(data), "image_size": 32}}, tta=tta)
    return artifact.save(art, folder)


@pytest.fixture(scope="module")
def hflip_model(tmp_path_factory, data) -> Path:
    return _save_model(tmp_path_factory.mktemp("tta-model") / "model", data)


def _inputs(art, paths) -> torch.Tensor:
    """Standardized N x C x H x W, as every pixclass path prepares them."""
    from pixclass.data.decode import decode_image
    from pixclass.data.transforms import batch_to_input, image_to_uint8
    pre = art.preprocess
    batch = torch.stack([image_to_uint8(decode_image(p, pre.channels), pre) for p in paths])
    return batch_to_input(batch, pre, memory_format=torch.contiguous_format)


def _plain_and_hflip(model_dir: Path, paths) -> tuple[np.ndarray, np.ndarray]:
    """(softmax of the network on the images, mean of that and the softmax on their mirrors),
    computed here from the plain network, independently of pixclass's TTA code."""
    from pixclass import artifact
    art = artifact.load(model_dir)
    x = _inputs(art, paths)
    with torch.no_grad():
        plain = torch.softmax(art.model(x), dim=1).numpy()
        mirrored = torch.softmax(art.model(torch.flip(x, dims=[3])), dim=1).numpy()
    return plain, (plain + mirrored) / 2


def _images(data: Path) -> list[Path]:
    return sorted(data.rglob("*.png"))


def test_artifact_round_trips_hflip_and_an_old_artifact_means_none(hflip_model, data, tmp_path):
    from pixclass import artifact
    assert json.loads((hflip_model / "pixclass.json").read_text())["tta"] == "hflip"
    art = artifact.load(hflip_model)
    assert art.tta == "hflip"
    assert artifact.load(artifact.save(art, tmp_path / "again")).tta == "hflip"
    # an artifact written before the field existed
    old = shutil.copytree(hflip_model, tmp_path / "old")
    meta = json.loads((old / "pixclass.json").read_text())
    del meta["tta"]
    (old / "pixclass.json").write_text(json.dumps(meta))
    assert artifact.load(old).tta == "none"


def test_torch_backend_averages_the_image_and_its_mirror(hflip_model, data, asymmetric):
    from pixclass import artifact
    from pixclass.inference import TorchBackend
    paths = [asymmetric] + _images(data)[:5]
    plain, expected = _plain_and_hflip(hflip_model, paths)
    art = artifact.load(hflip_model)
    x = _inputs(art, paths)
    got = TorchBackend.from_artifact(art).probabilities(x)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)
    # the mirror changes the answer on an asymmetric picture, so the comparison above can fail
    assert np.abs(got[0] - plain[0]).max() > 1e-2
    without = TorchBackend(art.model, art.classes, art.preprocess, tta="none").probabilities(x)
    np.testing.assert_allclose(without, plain, atol=1e-6)


def test_onnx_export_carries_tta_and_verifies_against_the_tta_reference(hflip_model, data, asymmetric, tmp_path):
    import onnx

    from pixclass import artifact
    from pixclass.export import export
    from pixclass.inference import OnnxBackend, TorchBackend
    out = tmp_path / "model.onnx"
    result = export(hflip_model, "onnx", out=out, data=data)
    assert result.passed and result.agreement == 1.0
    # both sides average the mirror: a side without it would differ by the mirror's effect (> 1e-2)
    assert result.max_prob_diff < 1e-5
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["pixclass_tta"] == "hflip"
    paths = [asymmetric] + _images(data)[:5]
    plain, expected = _plain_and_hflip(hflip_model, paths)
    art = artifact.load(hflip_model)
    x = _inputs(art, paths)
    onnx_probs = OnnxBackend(out).probabilities(x)
    np.testing.assert_allclose(onnx_probs, TorchBackend.from_artifact(art).probabilities(x), atol=1e-5)
    np.testing.assert_allclose(onnx_probs, expected, atol=1e-5)
    assert np.abs(onnx_probs[0] - plain[0]).max() > 1e-2


def test_cli_predict_uses_the_artifacts_tta(hflip_model, asymmetric):
    plain, expected = _plain_and_hflip(hflip_model, [asymmetric])
    proc = run_cli("predict", hflip_model, asymmetric, "--format", "json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    got = {c["class"]: c["probability"] for c in json.loads(proc.stdout)[0]["top_k"]}
    np.testing.assert_allclose([got[c] for c in CLASSES], expected[0], atol=1e-5)
    assert np.abs(expected[0] - plain[0]).max() > 1e-2


def test_cli_evaluate_uses_the_artifacts_tta_and_its_report_says_so(hflip_model, data, tmp_path):
    from pixclass.metrics import classification_metrics
    paths = _images(data)
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    plain, expected = _plain_and_hflip(hflip_model, paths)
    want, without = (classification_metrics(labels, p, CLASSES)["loss"] for p in (expected, plain))
    proc = run_cli("evaluate", hflip_model, data, "--json", "--quiet", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["n"] == len(paths)
    assert metrics["loss"] == pytest.approx(want, abs=1e-5)
    assert abs(want - without) > 1e-3  # the same loss without the mirror would be told apart
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "<td>test-time augmentation</td><td>hflip</td>" in report


def test_service_and_explain_report_the_tta_probabilities(hflip_model, asymmetric):
    from fastapi.testclient import TestClient

    from pixclass import artifact
    from pixclass.explain import Explainer
    from pixclass.serve.app import Settings, create_app
    _, expected = _plain_and_hflip(hflip_model, [asymmetric])
    with TestClient(create_app(Settings(model=str(hflip_model)))) as client:
        r = client.post("/v1/predict?k=3", files=[("files", (asymmetric.name, asymmetric.read_bytes(), "image/png"))])
        assert r.status_code == 200, r.text
        got = {c["class"]: c["probability"] for c in r.json()["predictions"][0]["top_k"]}
        np.testing.assert_allclose([got[c] for c in CLASSES], expected[0], atol=1e-5)
        info = client.get("/v1/model").json()
        # the mirror is in the ONNX graph the service runs, and applied there once
        assert info["tta"] == "hflip" and info["backend"]["name"] == "onnxruntime"
    # explain's probabilities are the same; its Grad-CAM runs on the plain network
    with Explainer(artifact.load(hflip_model)) as explainer:
        maps, probs, _ = explainer.heatmaps([asymmetric])
    np.testing.assert_allclose(probs[0], expected[0], atol=1e-5)
    assert maps.shape == (1, 32, 32) and 0 <= maps.min() and maps.max() <= 1


def test_an_unknown_tta_is_refused_with_one_line(hflip_model, asymmetric, tmp_path):
    from pixclass.artifact import Artifact
    bad = shutil.copytree(hflip_model, tmp_path / "bad")
    meta = json.loads((bad / "pixclass.json").read_text())
    meta["tta"] = "vflip"
    (bad / "pixclass.json").write_text(json.dumps(meta))
    proc = run_cli("predict", bad, asymmetric)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tta" in lines[0] and "'hflip'" in lines[0], \
        proc.stderr
    with pytest.raises(ValueError, match="vflip"):  # a recipe's mistake, before anything is written
        Artifact(model=None, arch={}, classes=CLASSES, preprocess=None, tta="vflip")


def test_a_recipes_tta_is_saved_in_the_artifact_and_named_in_the_report(data, tmp_path, monkeypatch):
    from pixclass import artifact
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.recipes import get_recipe
    from pixclass.train.run import run_training
    recipe = get_recipe("scratch")
    fit = recipe.fit
    # a recipe that sets FitResult.tta (the real recipes choose theirs; this one only says it)
    monkeypatch.setattr(recipe, "fit", lambda job: dataclasses.replace(fit(job), tta="hflip"))
    cfg = RunConfig(data=DataConfig(path=str(data), image_size=32), augment=AugmentConfig(policy="none"),
                    model=ModelConfig(name="classic-cnn", filters=(8, 16), dense=32),
                    train=TrainConfig(epochs=1, batch_size=16, seed=0, recipe="scratch"))
    summary = run_training(cfg, out=tmp_path / "run", reporter=Reporter(quiet=True))
    assert artifact.load(summary["model_dir"]).tta == "hflip"
    assert "<td>test-time augmentation</td><td>hflip</td>" in Path(summary["report"]).read_text()
