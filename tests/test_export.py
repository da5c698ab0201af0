"""Exports that are checked against the original model."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import make_shapes, needs_hymenoptera, run_cli


def test_onnx_export_agrees_and_carries_its_metadata(trained_run, shapes_session, tmp_path):
    model = Path(trained_run["model_dir"])
    proc = run_cli("export", model, "--out", tmp_path / "m.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["passed"] and v["agreement"] >= 0.995 and v["max_prob_diff"] <= 1e-4 and v["n"] >= 10
    assert v["max_similarity_diff"] <= 1e-4  # the graph's second output: the knn_similarity abstain score
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
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def _int8_weights(path) -> list:
    """The int8 weight tensors of a QDQ model (what feeds a DequantizeLinear from an initializer)."""
    from onnx import TensorProto, numpy_helper
    proto = onnx.load(str(path))
    dq_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.name in dq_inputs and t.data_type == TensorProto.INT8]


def test_int8_export_is_calibrated_and_verified(trained_run, tmp_path):
    # 300 images the model never saw, so that the 0.97 threshold is measured in steps of 1/300
    verify_on = make_shapes(tmp_path / "verify", per_class=100, seed=1)
    # into a folder that does not exist yet, as the fp32 export allows
    proc = run_cli("export", trained_run["model_dir"], "--int8", "--out", tmp_path / "new" / "q.onnx", "--data",
                   verify_on, "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["format"] == "onnx int8" and v["passed"] and v["threshold"] == 0.97
    assert v["n"] == v["n_held_out"] == 300 and v["agreement"] >= 0.97
    assert v["size_mb"] > 0 and v["path"] == str(tmp_path / "new" / "q.onnx")
    assert abs(v["accuracy_export"] - v["accuracy_original"]) <= 0.05
    # 7-bit weights: no pair of uint8 x int8 products can saturate VPMADDUBSW's int16 (CPUs without
    # VNNI), so every x86 CPU computes the same integers
    weights = _int8_weights(tmp_path / "new" / "q.onnx")
    assert len(weights) >= 3 and max(int(abs(w.astype(int)).max()) for w in weights) <= 64


SATURATION_PROBE = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
    [helper.make_tensor("b", TensorProto.INT8, [2, 1], [127, 127])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
print(session.run(None, {"a": np.full((1, 2), 255, np.uint8)})[0].item())
"""


def _cpu_without_vnni(tmp_path) -> dict:
    """An environment in which ONNX Runtime sees an AVX2 CPU without AVX-512, VNNI or AMX (CPUID
    faulting, bench/cpuid_avx2_only.c); skips where Linux cannot trap CPUID."""
    import os
    import platform
    import shutil
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.is_file() or " cpuid_fault" not in cpuinfo.read_text():
        pytest.skip("needs an x86-64 Linux CPU with CPUID faulting")
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the CPUID shim")
    shim = tmp_path / "cpuid_avx2_only.so"
    source = Path(__file__).resolve().parents[1] / "bench" / "cpuid_avx2_only.c"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim)}
    env.pop("PYTHONFAULTHANDLER", None)  # its SIGSEGV handler would take the trapped CPUIDs
    # the shim works if ONNX Runtime now saturates: 255*127 + 255*127 = 64770 clipped to int16
    probe = subprocess.run([sys.executable, "-c", SATURATION_PROBE], check=False, env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.split() == ["32767"], probe.stderr
    return env


def test_int8_export_verifies_on_a_cpu_without_vnni(trained_run, tmp_path):
    env = _cpu_without_vnni(tmp_path)
    verify_on = make_shapes(tmp_path / "verify", per_class=100, seed=1)
    proc = subprocess.run([sys.executable, "-m", "pixclass", "export", str(trained_run["model_dir"]), "--int8",
                           "--out", str(tmp_path / "q.onnx"), "--data", str(verify_on), "--json"],
                          check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["passed"] and v["n"] == 300 and v["agreement"] >= 0.97


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


def _tflite_verification(model_dir, out, *extra):
    proc = run_cli("export", model_dir, "--format", "tflite", "--out", out, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # parses only if the converters' chatter stayed off stdout


def test_tflite_fp32_and_int8_agree_in_the_litert_interpreter(trained_run, tmp_path):
    v = _tflite_verification(trained_run["model_dir"], tmp_path / "m.tflite")
    assert v["format"] == "tflite fp32" and v["passed"] and v["agreement"] >= 0.99 and v["max_prob_diff"] < 1e-4
    side = json.loads((tmp_path / "m.tflite.json").read_text())
    assert side["classes"] == ["circle", "square", "triangle"] and side["preprocess"]["size"] == 32
    from ai_edge_litert.interpreter import Interpreter
    details = Interpreter(model_path=str(tmp_path / "m.tflite")).get_input_details()[0]
    assert list(details["shape"]) == [1, 32, 32, 3]  # NHWC, as Android expects
    q = _tflite_verification(trained_run["model_dir"], tmp_path / "q.tflite", "--int8")
    assert q["format"] == "tflite int8" and q["agreement"] >= 0.97 and q["size_mb"] < v["size_mb"] / 2


@needs_hymenoptera
def test_tflite_of_a_fine_tuned_efficientnet_lite0(ants_bees_small, tmp_path):
    proc = run_cli("train", ants_bees_small, "--head-epochs", "3", "--epochs", "1", "--out", tmp_path / "r", "-q")
    assert proc.returncode == 0, proc.stderr
    v = _tflite_verification(tmp_path / "r" / "model", tmp_path / "lite0.tflite")
    assert v["passed"] and v["agreement"] >= 0.99 and v["max_prob_diff"] < 1e-4
    assert v["n_held_out"] == 24 and v["n"] == 72  # the 24 val photos, topped up with the 48 training ones


def test_coreml_export_declares_image_input_outputs_and_labels(trained_run, tmp_path):
    proc = run_cli("export", trained_run["model_dir"], "--format", "coreml", "--out", tmp_path / "m.mlpackage", "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)
    assert v["passed"] and [c[0] for c in v["checks"]] == ["loads as a spec", "input", "outputs", "class labels"]
    assert (tmp_path / "m.mlpackage" / "Manifest.json").is_file()
    # the check can fail: the same file against a model whose classes differ
    from pixclass import artifact
    from pixclass.export_mobile import check_coreml
    art = artifact.load(trained_run["model_dir"])
    art.classes = ["circle", "square", "star"]
    failed = check_coreml(art, tmp_path / "m.mlpackage")
    assert not failed.passed and [c[0] for c in failed.checks if not c[1]] == ["class labels"]


def test_missing_converter_is_a_clear_error(monkeypatch):
    import sys

    import pytest

    from pixclass.errors import UserError
    from pixclass.extras import require
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'pixclass\[tflite\]'"):
        require("litert_torch", "tflite")


def _export_in_process(capsys, *args) -> tuple[int, str]:
    """`pixclass export ARGS` through cli.main in this process: (exit code, stderr)."""
    from pixclass.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["export", *map(str, args)])
    return exit_.value.code, capsys.readouterr().err


def _one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def model_copy(trained_run, tmp_path) -> Path:
    """A run folder of its own (run/model + manifest), so a failing test cannot damage the shared one."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(Path(trained_run["model_dir"]).parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run / "model"


def test_export_never_overwrites_the_model_it_exports(model_copy, capsys):
    """Issue 16, case 3: `export RUN/model --out RUN/model/model.safetensors` printed PASS and the
    weights were gone."""
    import os
    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    os.symlink(model_copy / "model.safetensors", model_copy.parent / "link.onnx")
    refused = [(["--out", model_copy / "model.safetensors"], "model's own model.safetensors"),
               (["--out", model_copy / "pixclass.json", "--int8"], "model's own pixclass.json"),
               (["--out", model_copy / "model.safetensors", "--format", "coreml"], "model's own model.safetensors"),
               (["--out", model_copy / "pixclass", "--format", "tflite"], "model's own pixclass.json"),  # its .json
               (["--out", model_copy.parent / "link.onnx"], "model's own model.safetensors"),
               (["--out", model_copy], "would replace the model folder"),
               (["--out", model_copy.parent, "--format", "webapp"], "would replace the model folder")]
    for args, why in refused:
        assert why in _one_error_line(*_export_in_process(capsys, model_copy, *args)), args
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before


def test_export_refuses_an_existing_file_it_did_not_write_and_replaces_its_own(model_copy, tmp_path, capsys):
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    line = _one_error_line(*_export_in_process(capsys, model_copy, "--out", notes))
    assert "already exists and is not an earlier export" in line and notes.read_text() == "my notes"
    page = tmp_path / "site"
    page.mkdir()
    (page / "index.html").write_text("my page")
    _one_error_line(*_export_in_process(capsys, model_copy, "--format", "webapp", "--out", page))
    assert (page / "index.html").read_text() == "my page" and len(list(page.iterdir())) == 1
    # an earlier export is replaced: exporting twice to the same file works
    for _ in range(2):
        code, err = _export_in_process(capsys, model_copy, "--out", tmp_path / "m.onnx")
        assert code == 0, err


def test_export_to_an_unwritable_place_is_one_error_line_before_any_work(model_copy, tmp_path, capsys):
    """Issue 16, case 9: FileExistsError / OSError tracebacks. The data folder given does not exist,
    so an error about --out shows that --out was checked before the data was read."""
    import os
    gone = tmp_path / "no-such-data"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    line = _one_error_line(*_export_in_process(capsys, model_copy, "--out", a_file / "sub" / "m.onnx", "--data", gone))
    assert f"{a_file} is a file, not a folder" in line
    line = _one_error_line(*_export_in_process(capsys, model_copy, "--out", tmp_path / "new" / "m.onnx", "--data", gone))
    assert "--data DIR" in line  # the same command with a good --out reaches the data check
    if os.geteuid() == 0:
        return  # permissions do not stop root: the read-only case cannot be made here
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _one_error_line(*_export_in_process(capsys, model_copy, "--out", locked / "m.onnx", "--data", gone))
        assert f"cannot write in {locked}" in line
    finally:
        locked.chmod(0o700)
