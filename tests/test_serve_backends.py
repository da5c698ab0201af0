"""Which backend the service predicts with: a saved model is served through ONNX Runtime when its
export answers like the PyTorch model (and GET /v1/model says so, and why), `--backend torch`
serves the PyTorch model, an export that disagrees falls back to PyTorch, explain still runs the
PyTorch model under ONNX Runtime, and a bad --backend is one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np

from conftest import run_cli, start_server


def _files(folder: Path, n: int = 6) -> list[Path]:
    return sorted(folder.rglob("*.png"))[:n]


def _served_probabilities(post, paths: list[Path], classes: list[str]) -> np.ndarray:
    """N x K probabilities in the model's class order, from one POST /v1/predict with every class."""
    r = post("/v1/predict", params={"k": len(classes)},
             files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    rows = [{c["class"]: c["probability"] for c in p["top_k"]} for p in r.json()["predictions"]]
    return np.array([[row[c] for c in classes] for row in rows])


def _pytorch_probabilities(model_dir, paths: list[Path]) -> np.ndarray:
    from pixclass import artifact
    from pixclass.inference import TorchBackend
    from pixclass.predict import Predictor
    return Predictor(TorchBackend.from_artifact(artifact.load(model_dir))).probabilities(paths)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_a_saved_model_is_served_through_onnx_runtime_with_pytorchs_answers(trained_run, shapes_session):
    model_dir = trained_run["model_dir"]
    paths = _files(shapes_session)
    proc, base = start_server(model_dir)
    try:
        info = httpx.get(f"{base}/v1/model").json()
        assert info["backend"]["name"] == "onnxruntime", info
        assert info["backend"]["reason"].startswith("onnxruntime (agrees with torch within")
        served = _served_probabilities(lambda *a, **kw: httpx.post(base + a[0], timeout=30, **kw), paths,
                                       info["classes"])
    finally:
        _stop(proc)
    expected = _pytorch_probabilities(model_dir, paths)
    assert served.shape == expected.shape == (len(paths), 3)
    assert np.abs(served - expected).max() < 1e-4
    assert (served.argmax(1) == expected.argmax(1)).all()


def test_backend_torch_serves_the_pytorch_model(trained_run, shapes_session):
    model_dir = trained_run["model_dir"]
    paths = _files(shapes_session)
    proc, base = start_server(model_dir, "--backend", "torch")
    try:
        info = httpx.get(f"{base}/v1/model").json()
        assert info["backend"] == {"name": "torch", "reason": "torch (asked for)"}, info
        served = _served_probabilities(lambda *a, **kw: httpx.post(base + a[0], timeout=30, **kw), paths,
                                       info["classes"])
    finally:
        _stop(proc)
    np.testing.assert_allclose(served, _pytorch_probabilities(model_dir, paths), atol=1e-6)


def test_explain_under_onnx_runtime_is_pytorchs_grad_cam(trained_run, shapes_session):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    image = _files(shapes_session, 1)[0]
    overlays = {}
    for backend in ("auto", "torch"):
        with TestClient(create_app(Settings(model=trained_run["model_dir"], backend=backend))) as client:
            overlays[client.get("/v1/model").json()["backend"]["name"]] = client.post(
                "/v1/explain", files=[("file", (image.name, image.read_bytes(), "image/png"))])
    assert set(overlays) == {"onnxruntime", "torch"}
    for r in overlays.values():
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert overlays["onnxruntime"].content == overlays["torch"].content


def test_an_export_that_disagrees_is_served_by_pytorch_and_says_why(trained_run, shapes_session, tmp_path,
                                                                     monkeypatch):
    from fastapi.testclient import TestClient

    from pixclass import fastest_backend
    from pixclass.serve.app import Settings, create_app
    from test_fastest_backend import _export_of_another_network
    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fastest_backend, "export_onnx", _export_of_another_network)
    paths = _files(shapes_session, 3)
    with TestClient(create_app(Settings(model=trained_run["model_dir"]))) as client:
        info = client.get("/v1/model").json()
        served = _served_probabilities(client.post, paths, info["classes"])
    assert info["backend"]["name"] == "torch" and "differs from the PyTorch model" in info["backend"]["reason"]
    np.testing.assert_allclose(served, _pytorch_probabilities(trained_run["model_dir"], paths), atol=1e-6)


def test_a_bad_backend_is_one_line(trained_run):
    proc = run_cli("serve", trained_run["model_dir"], "--backend", "tensorrt")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == ["error: --backend must be one of auto, onnxruntime, torch (got 'tensorrt')"], \
        proc.stderr


def test_an_exported_file_is_not_a_model_folder_to_serve(trained_run, tmp_path):
    from pixclass import artifact
    from pixclass.fastest_backend import export_onnx
    onnx_file = export_onnx(artifact.load(trained_run["model_dir"]), tmp_path / "model.onnx")
    proc = run_cli("serve", onnx_file)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
