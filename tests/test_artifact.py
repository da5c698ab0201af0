import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pixclass import artifact as artifact_io
from pixclass.data.scan import collect_image_paths
from pixclass.predict import Predictor

from conftest import run_cli


def test_artifact_is_safetensors_plus_json(trained_run):
    model_dir = Path(trained_run["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.safetensors", "pixclass.json"]
    meta = json.loads((model_dir / "pixclass.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["arch"]["name"] == "classic-cnn"
    assert meta["preprocess"]["size"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert {"torch", "pixclass", "timm"} <= set(meta["versions"])
    assert "accuracy" in meta["metrics"] and meta["config"]["train"]["epochs"] == 12


def test_fresh_process_gives_same_probabilities(trained_run, shapes_session, tmp_path):
    model_dir = trained_run["model_dir"]
    files = collect_image_paths([shapes_session])[::7]
    before = Predictor(artifact_io.load(model_dir)).probabilities(files)
    np.save(tmp_path / "files.npy", np.array([str(f) for f in files]))
    script = (
        "import sys, numpy as np\n"
        "from pixclass.predict import Predictor\n"
        f"files = list(np.load({str(tmp_path / 'files.npy')!r}))\n"
        f"np.save({str(tmp_path / 'after.npy')!r}, Predictor.load({model_dir!r}).probabilities(files))\n"
        "assert 'pixclass.train' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    after = np.load(tmp_path / "after.npy")
    assert np.abs(before - after).max() <= 1e-5


def test_predict_does_not_import_training_code(trained_run, shapes_session):
    import subprocess
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pixclass", "predict", trained_run["model_dir"],
                           shapes_session / "circle" / "circle_000.png", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "pixclass.predict" in imported
    assert not [m for m in imported if m.startswith("pixclass.train")]
    assert json.loads(proc.stdout)[0]["top_k"][0]["class"] in ("circle", "square", "triangle")


def test_in_memory_model_equals_saved_model(trained_run, shapes_session):
    from pixclass import load
    clf = load(trained_run["model_dir"])
    probs = clf.predict_proba(shapes_session / "square" / "square_001.png")
    assert probs.shape == (1, 3) and abs(probs.sum() - 1) < 1e-5
    out = run_cli("predict", trained_run["model_dir"], shapes_session / "square" / "square_001.png", "--json")
    top = json.loads(out.stdout)[0]["top_k"][0]
    assert top["class"] == clf.classes[int(probs.argmax())]
    assert abs(top["probability"] - float(probs.max())) < 1e-5
