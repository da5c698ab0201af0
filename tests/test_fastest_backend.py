"""The fastest verified backend: a saved model runs in ONNX Runtime when its export answers like
the PyTorch model, the export is made once per model, and anything else falls back to PyTorch
(or is one line of error when ONNX Runtime was asked for)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pixclass import fastest_backend
from pixclass.data.decode import decode_image
from pixclass.data.transforms import image_to_uint8
from pixclass.errors import UserError
from pixclass.fastest_backend import open_fastest
from pixclass.inference import OnnxBackend, TorchBackend


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shape_images(folder: Path, pre) -> torch.Tensor:
    files = sorted(folder.rglob("*.png"))[:12]
    return torch.stack([image_to_uint8(decode_image(f, pre.channels), pre) for f in files])


def test_a_saved_model_runs_in_onnx_runtime_and_answers_like_pytorch(trained_run, shapes_session, fresh_cache):
    choice = open_fastest(trained_run["model_dir"])
    assert isinstance(choice.backend, OnnxBackend) and choice.reason.startswith("onnxruntime")
    torch_choice = open_fastest(trained_run["model_dir"], "torch")
    assert isinstance(torch_choice.backend, TorchBackend)
    images = shape_images(shapes_session, choice.backend.preprocess)
    a = choice.backend.probabilities_uint8(images)
    b = torch_choice.backend.probabilities_uint8(images)
    assert a.shape == (len(images), 3)
    assert np.abs(a - b).max() < 1e-4 and (a.argmax(1) == b.argmax(1)).all()
    exported = list(fresh_cache.glob("onnx/*.onnx"))
    assert len(exported) == 1
    before = exported[0].stat().st_mtime_ns
    again = open_fastest(trained_run["model_dir"])  # the cached export, checked again, not rewritten
    assert isinstance(again.backend, OnnxBackend) and exported[0].stat().st_mtime_ns == before


def _export_of_another_network(art, path):
    """An export that does not answer like the artifact: its last layer's weights are changed."""
    with torch.no_grad():
        changed = [p for p in art.model.parameters()][-2]
        saved = changed.clone()
        changed.add_(torch.randn_like(changed))
        try:
            return REAL_EXPORT(art, path)
        finally:
            changed.copy_(saved)


REAL_EXPORT = fastest_backend.export_onnx


def test_an_export_that_disagrees_falls_back_to_pytorch_with_a_warning(trained_run, fresh_cache, monkeypatch, capsys):
    monkeypatch.setattr(fastest_backend, "export_onnx", _export_of_another_network)
    choice = open_fastest(trained_run["model_dir"])
    assert isinstance(choice.backend, TorchBackend)
    assert "differs from the PyTorch model" in capsys.readouterr().err
    with pytest.raises(UserError, match="--backend onnxruntime: the ONNX export differs"):
        open_fastest(trained_run["model_dir"], "onnxruntime")


def test_an_export_that_fails_falls_back_to_pytorch(trained_run, fresh_cache, monkeypatch, capsys):
    def broken(art, path):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset 17 is not supported")
    monkeypatch.setattr(fastest_backend, "export_onnx", broken)
    assert isinstance(open_fastest(trained_run["model_dir"]).backend, TorchBackend)
    assert "ONNX export or ONNX Runtime failed (RuntimeError: Exporting the operator" in capsys.readouterr().err
    assert not list(fresh_cache.glob("onnx/*"))  # nothing half-written left behind


def test_exported_files_run_as_they_are_and_a_bad_choice_is_one_line(trained_run, tmp_path, fresh_cache):
    onnx_file = fastest_backend.export_onnx(fastest_backend.artifact_io.load(trained_run["model_dir"]),
                                            tmp_path / "m.onnx")
    assert isinstance(open_fastest(onnx_file).backend, OnnxBackend)
    with pytest.raises(UserError, match="--backend torch needs a saved model folder"):
        open_fastest(onnx_file, "torch")
    with pytest.raises(UserError, match="--backend must be one of auto, onnxruntime, torch"):
        open_fastest(trained_run["model_dir"], "tensorrt")


def test_exporting_leaves_the_pytorch_model_as_it_answers(trained_run, shapes_session, tmp_path):
    """The first open exports the model it then checks against: the export must not switch that
    model into training mode (where BatchNorm answers from, and updates, batch statistics)."""
    from pixclass import artifact as artifact_io
    art = artifact_io.load(trained_run["model_dir"])
    reference = TorchBackend.from_artifact(art)
    images = shape_images(shapes_session, reference.preprocess)
    before = reference.probabilities_uint8(images)
    fastest_backend.export_onnx(art, tmp_path / "m.onnx")
    assert not art.model.training
    np.testing.assert_allclose(reference.probabilities_uint8(images), before, atol=1e-6)
