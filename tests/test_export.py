"""Exports that are checked against the original model."""

import json
from pathlib import Path

import onnx

from conftest import run_cli


def test_onnx_export_agrees_and_carries_its_metadata(trained_run, shapes_session, tmp_path):
    model = Path(trained_run["model_dir"])
    proc = run_cli("export", model, "--out", tmp_path / "m.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["passed"] and v["agreement"] >= 0.995 and v["max_prob_diff"] <= 1e-4 and v["n"] >= 10
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["pixclass_classes"]) == ["circle", "square", "triangle"]
    assert json.loads(meta["pixclass_preprocess"])["size"] == 32
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    a = json.loads(run_cli("predict", tmp_path / "m.onnx", shapes_session / "square", "--json").stdout)
    b = json.loads(run_cli("predict", model, shapes_session / "square", "--json").stdout)
    assert [r["top_k"][0]["class"] for r in a] == [r["top_k"][0]["class"] for r in b]
    assert max(abs(x["top_k"][0]["probability"] - y["top_k"][0]["probability"]) for x, y in zip(a, b)) < 1e-5


def test_int8_export_is_calibrated_and_verified(trained_run, tmp_path):
    proc = run_cli("export", trained_run["model_dir"], "--int8", "--out", tmp_path / "q.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["format"] == "onnx int8" and v["agreement"] >= 0.97
    assert v["size_mb"] > 0 and v["path"] == str(tmp_path / "q.onnx")
    assert abs(v["accuracy_export"] - v["accuracy_original"]) <= 0.1


def test_failed_verification_keeps_the_file_as_unverified(trained_run, tmp_path):
    proc = run_cli("export", trained_run["model_dir"], "--out", tmp_path / "m.onnx", "--threshold", "1.01")
    assert proc.returncode == 1
    assert (tmp_path / "m.onnx.unverified").is_file() and not (tmp_path / "m.onnx").exists()
    assert "disagrees" in proc.stderr


def test_export_without_data_is_a_clear_error(trained_run, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(trained_run["model_dir"], model)
    meta = json.loads((model / "pixclass.json").read_text())
    meta["config"]["data"]["path"] = str(tmp_path / "gone")
    (model / "pixclass.json").write_text(json.dumps(meta))
    proc = run_cli("export", model)
    assert proc.returncode == 2 and "--data DIR" in proc.stderr
