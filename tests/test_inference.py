"""The inference backends: PyTorch and ONNX Runtime answer alike on the same images, files open in
the backend their suffix names, and prediction and evaluation go through the backends."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pixclass.data.loaders import SplitData
from pixclass.data.transforms import Preprocess
from pixclass.errors import UserError
from pixclass.evaluate import evaluate_split
from pixclass.export import export_onnx
from pixclass.inference import (OnnxBackend, Probabilities, TorchBackend, open_backend,
                                predict_batches, softmax_probabilities)
from pixclass.predict import Predictor

CLASSES = ["cat", "dog", "fox"]
PRE = Preprocess(size=16, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def tiny_model(seed: int = 0) -> nn.Module:
    """A small CNN built here, so these tests do not depend on the model registry."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(CLASSES))).eval()


def tiny_artifact(seed: int = 0):
    """What export_onnx reads of an artifact."""
    return SimpleNamespace(model=tiny_model(seed), classes=CLASSES, preprocess=PRE, arch={"name": "tiny"},
                           tta="none", temperature=1.0, abstain=None, thresholds=None, multilabel=False,
                           task="multiclass", feature_bank=None)


def uint8_batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return export_onnx(tiny_artifact(), tmp_path / "tiny.onnx")


def test_softmax_probabilities_are_float32_and_sum_to_one():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    probs = softmax_probabilities(logits)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(probs[0], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0).numpy(), atol=1e-6)


def test_probabilities_module_is_the_softmax_of_the_model():
    model = tiny_model()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(Probabilities(model)(x).numpy(), torch.softmax(model(x), 1).numpy(), atol=1e-7)


def test_torch_and_onnx_backends_agree_on_the_same_uint8_batch(onnx_file):
    torch_backend = TorchBackend(tiny_model(), CLASSES, PRE)
    onnx_backend = OnnxBackend(onnx_file)
    assert (torch_backend.name, onnx_backend.name) == ("torch", "onnxruntime")
    assert onnx_backend.classes == CLASSES and onnx_backend.preprocess == PRE  # read from the file's metadata
    batch = uint8_batch()
    expected = torch_backend.probabilities_uint8(batch)
    got = onnx_backend.probabilities_uint8(batch)
    assert expected.shape == got.shape == (6, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(expected - 1 / 3).max() > 1e-3  # not a degenerate, uniform answer that anything would match
    # a different model is told apart: the comparison above can fail
    other = TorchBackend(tiny_model(seed=7), CLASSES, PRE).probabilities_uint8(batch)
    assert np.abs(other - got).max() > 1e-3


def test_backends_take_numpy_or_torch_inputs(onnx_file):
    x = torch.randn(3, 3, 16, 16)
    for backend in (TorchBackend(tiny_model(), CLASSES, PRE), OnnxBackend(onnx_file)):
        np.testing.assert_allclose(backend.probabilities(x), backend.probabilities(x.numpy()), atol=1e-6)


def test_open_backend_dispatches_by_suffix(trained_run, onnx_file, tmp_path):
    assert isinstance(open_backend(onnx_file), OnnxBackend)
    folder = open_backend(trained_run["model_dir"])
    assert isinstance(folder, TorchBackend) and folder.classes == ["circle", "square", "triangle"]
    with pytest.raises(UserError, match="has no m.tflite.json beside it"):
        open_backend(tmp_path / "m.tflite")  # opened as a LiteRTBackend, which first reads the JSON sidecar
    with pytest.raises(UserError, match="not a pixclass model folder"):
        open_backend(tmp_path / "missing-model")  # a folder's own error, from artifact.load


@pytest.mark.parametrize("name", ["model.pt", "weights.safetensors", "notes.txt"])
def test_open_backend_refuses_an_unknown_file_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(UserError) as e:
        open_backend(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and ".onnx" in message


def test_onnx_file_not_from_pixclass_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.onnx"
    torch.onnx.export(tiny_model(), torch.zeros(1, 3, 16, 16), str(path), dynamo=False)
    with pytest.raises(UserError, match="not exported by pixclass"):
        OnnxBackend(path)
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load ONNX model") as e:
        OnnxBackend(tmp_path / "broken.onnx")
    assert "\n" not in str(e.value)


def test_predict_batches_through_a_backend():
    model, batch = tiny_model(), uint8_batch(10)
    batches = [(batch[:4], torch.arange(4), torch.arange(4)), (batch[4:], torch.arange(6), torch.arange(4, 10))]
    probs, labels, indices = predict_batches(TorchBackend(model, CLASSES, PRE), batches)
    assert probs.shape == (10, 3) and labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert indices.tolist() == list(range(10))
    np.testing.assert_allclose(probs, TorchBackend(model, CLASSES, PRE).probabilities_uint8(batch), atol=1e-6)
    empty, _, _ = predict_batches(TorchBackend(model, CLASSES, PRE), [])
    assert empty.shape == (0, 0)


def _shape_files(shapes_session: Path) -> list[Path]:
    return [p for c in ("circle", "square", "triangle") for p in sorted((shapes_session / c).iterdir())[:4]]


def test_predictor_on_the_onnx_export_equals_predictor_on_the_folder(trained_run, shapes_session, tmp_path):
    from pixclass import artifact
    folder = trained_run["model_dir"]
    onnx_path = export_onnx(artifact.load(folder), tmp_path / "m.onnx")
    files = _shape_files(shapes_session)
    from_folder, from_onnx = Predictor.load(folder), Predictor.load(onnx_path)
    assert (from_folder.backend.name, from_onnx.backend.name) == ("torch", "onnxruntime")
    assert from_onnx.classes == from_folder.classes and from_onnx.preprocess == from_folder.preprocess
    expected = from_folder.probabilities(files)
    np.testing.assert_allclose(from_onnx.probabilities(files), expected, atol=1e-5)
    assert (expected.argmax(1) == np.repeat([0, 1, 2], 4)).mean() >= 0.75  # the trained model, not noise
    results, failures = from_onnx.predict_files(files, k=2)
    assert not failures and [r["top_k"][0]["class"] for r in results] == [from_folder.classes[i]
                                                                           for i in expected.argmax(1)]


def test_evaluation_goes_through_the_backend(trained_run, shapes_session, tmp_path, monkeypatch):
    from pixclass import artifact
    from pixclass.data.decode import decode_image
    from pixclass.data.transforms import image_to_uint8
    art = artifact.load(trained_run["model_dir"])
    files = _shape_files(shapes_session)
    images = torch.stack([image_to_uint8(decode_image(p, 3), art.preprocess) for p in files])
    split = SplitData(images, torch.as_tensor(np.repeat([0, 1, 2], 4)), files)
    calls = []
    original = TorchBackend.scores_uint8
    monkeypatch.setattr(TorchBackend, "scores_uint8", lambda self, b: calls.append(len(b)) or original(self, b))
    metrics, probs = evaluate_split(art, split, batch_size=5)
    assert calls == [5, 5, 2]  # every batch went through the artifact's TorchBackend
    onnx_backend = OnnxBackend(export_onnx(art, tmp_path / "m.onnx"))
    onnx_metrics, onnx_probs = evaluate_split(art, split, backend=onnx_backend)
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-5)
    assert onnx_metrics["accuracy"] == metrics["accuracy"] and metrics["n"] == 12
