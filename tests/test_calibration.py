"""Calibration (temperature scaling) and the "unknown" answer (abstain threshold): fitted at the
end of a run on its validation split, stored in the artifact, applied by predict, evaluate, the
service and the exports; an artifact written before them still loads and never abstains."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from pixclass import artifact as artifact_io
from pixclass.abstain import Abstain, fit_abstain
from pixclass.calibration import fit_temperature
from pixclass.errors import UserError
from pixclass.feature_bank import nearest_similarity, nearest_similarity_in_chunks
from pixclass.inference import OnnxBackend, TorchBackend
from pixclass.predict import Predictor
from pixclass.tta import combine_views, probabilities

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "artifacts-6de4714"


def test_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2000, 5, generator=g) * 4
    labels = torch.multinomial(torch.softmax(logits[0] / 2.5, 1), 1, generator=g)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    # two views (test-time augmentation): the probabilities averaged over them are what is fitted
    views = torch.stack([logits[0], logits[0] + 0.1 * torch.randn(2000, 5, generator=g)])
    t = fit_temperature(views, labels)
    assert t == pytest.approx(2.5, rel=0.15)
    nll = lambda t: torch.nn.functional.nll_loss(combine_views(views, t).log(), labels).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1))


def test_a_handful_of_right_validation_images_does_not_sharpen_the_model_without_bound():
    # 40 validation images, all right, from barely to clearly: maximum likelihood alone drives T to
    # its floor (sharper is always cheaper for them); the prior on log T keeps it several times higher
    logits = torch.zeros(1, 40, 3)
    logits[0, :, 0] = torch.linspace(0.5, 5, 40)
    labels = torch.zeros(40, dtype=torch.long)
    assert fit_temperature(logits, labels, prior_sd=None) < 0.1
    assert 0.2 < fit_temperature(logits, labels) < 1.0


def test_temperature_keeps_the_top_class_and_the_threshold_keeps_the_share_asked_for():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.randn(50, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, scaled = probabilities(model, x), probabilities(model, x, temperature=3.0)
    assert torch.equal(plain.argmax(1), scaled.argmax(1)) and (scaled.max(1).values < plain.max(1).values).all()
    abstain = fit_abstain(scaled.numpy(), keep=0.9)
    assert abstain.unknown(scaled.numpy()).mean() == pytest.approx(0.1, abs=0.021)


def test_similarity_of_a_split_in_chunks_is_the_whole_similarity():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(2, 1003, 16, generator=g), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    whole = nearest_similarity(features, bank)
    chunked = nearest_similarity_in_chunks(features, bank, max_elements=2 * 50 * 7)  # 7 rows at a time
    assert chunked.shape == (1003,) and torch.allclose(chunked, whole, atol=1e-6)
    assert nearest_similarity_in_chunks(features[:, :0], bank).shape == (0,)


def test_a_run_stores_calibration_and_its_report_shows_before_and_after(trained_run):
    model_dir, run_dir = Path(trained_run["model_dir"]), Path(trained_run["run_dir"])
    meta = json.loads((model_dir / "pixclass.json").read_text())
    assert meta["temperature"] != 1.0 and meta["temperature"] == trained_run["metrics"]["temperature"]
    assert meta["abstain"]["method"] == "knn_similarity" and meta["abstain"]["keep"] == 0.95
    assert meta["abstain"]["fallback"]["method"] == "max_probability"  # for the exports without the similarity
    calib = json.loads((run_dir / "calibration.json").read_text())
    assert calib["temperature"] == meta["temperature"] and "ece" in calib["before"]
    page = (run_dir / "report.html").read_text()
    assert "before, <b>" in page and "reliability_uncalibrated.png" in page and "answered <i>unknown</i>" in page
    # the run's figures are the calibrated model's: what `pixclass evaluate` gives
    art = artifact_io.load(model_dir)
    assert art.temperature == meta["temperature"] and art.abstain == Abstain.from_dict(meta["abstain"])
    assert art.feature_bank.dtype == torch.float16 and art.feature_bank.ndim == 2  # the training features
    backend = TorchBackend.from_artifact(art)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(art.model(x) / art.temperature, 1).numpy()
    np.testing.assert_allclose(backend.probabilities(x), expected, atol=1e-6)


def noise_images(folder: Path, n: int = 12) -> Path:
    """Uniform colour noise: nothing like the drawn shapes the model was trained on."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"noise_{i:02d}.png")
    return folder


def test_predict_answers_unknown_for_noise_and_abstain_off_turns_it_off(trained_run, shapes_session, tmp_path):
    noise = noise_images(tmp_path / "noise")
    shapes = sorted(shapes_session.rglob("*.png"))[::4]
    out = json.loads(run_cli("predict", trained_run["model_dir"], noise, *shapes, "--json").stdout)
    on_noise, on_shapes = out[:12], out[12:]
    assert sum(r["unknown"] for r in on_noise) >= 6, [r["score"] for r in on_noise]
    assert sum(r["unknown"] for r in on_shapes) <= len(on_shapes) // 5
    for r in out:
        assert r["answer"] == ("unknown" if r["unknown"] else r["top_k"][0]["class"])
        # the feature similarity the knn_similarity threshold reads (a cosine against a float16 bank)
        assert -1.001 <= r["score"] <= 1.001
    off = json.loads(run_cli("predict", trained_run["model_dir"], noise, "--json", "--abstain", "off").stdout)
    assert all(not r["unknown"] and r["score"] is None and r["answer"] == r["top_k"][0]["class"] for r in off)
    table = run_cli("predict", trained_run["model_dir"], noise).stdout
    assert "unknown" in table
    bad = run_cli("predict", trained_run["model_dir"], noise, "--abstain", "maybe")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --abstain must be on or off (got 'maybe')"]


def test_service_answers_unknown_for_noise(trained_run, tmp_path):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    noise = sorted(noise_images(tmp_path / "noise").iterdir())
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in noise]
    expected = Predictor(artifact_io.load(trained_run["model_dir"]))
    expected = [r["unknown"] for r in expected.predict_files(noise)[0]]
    for abstain in (True, False):
        with TestClient(create_app(Settings(model=trained_run["model_dir"], abstain=abstain))) as client:
            body = client.post("/v1/predict", files=files).json()
            info = client.get("/v1/model").json()
        got = [p["unknown"] for p in body["predictions"]]
        if abstain:
            assert got == expected and sum(got) >= 6
            assert all(p["answer"] == "unknown" for p in body["predictions"] if p["unknown"])
            assert info["abstain"]["threshold"] > 0 and info["temperature"] != 1.0
        else:
            assert not any(got) and info["abstain"] is None


def test_evaluate_reports_the_share_answered_unknown(trained_run, shapes_session, tmp_path):
    proc = run_cli("evaluate", trained_run["model_dir"], shapes_session, "--json", "-q", "--out", tmp_path / "e")
    metrics = json.loads(proc.stdout)
    assert 0 <= metrics["unknown_share"] <= 0.2 and 0.5 <= metrics["answered_accuracy"] <= 1
    assert metrics["abstain"] == json.loads((Path(trained_run["model_dir"]) / "pixclass.json").read_text())["abstain"]
    off = json.loads(run_cli("evaluate", trained_run["model_dir"], shapes_session, "--json", "-q",
                             "--abstain", "off", "--out", tmp_path / "f").stdout)
    assert "unknown_share" not in off and off["accuracy"] == metrics["accuracy"]


def test_onnx_export_bakes_the_temperature_and_carries_the_threshold(trained_run, tmp_path):
    proc = run_cli("export", trained_run["model_dir"], "--out", tmp_path / "m.onnx", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["passed"], proc.stderr
    art = artifact_io.load(trained_run["model_dir"])
    onnx = OnnxBackend(tmp_path / "m.onnx")
    assert onnx.abstain == art.abstain
    meta = onnx.session.get_modelmeta().custom_metadata_map
    assert float(meta["pixclass_temperature"]) == art.temperature
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    (probs, similarity), (expected, expected_similarity) = onnx.scores(x), TorchBackend.from_artifact(art).scores(x)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # the knn_similarity score is the graph's second output, as PyTorch computes it
    assert [o.name for o in onnx.session.get_outputs()] == ["probabilities", "similarity"]
    np.testing.assert_allclose(similarity, expected_similarity, atol=1e-5)


def test_an_artifact_from_before_calibration_loads_and_never_abstains(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "seed-cnn", folder)
    assert "temperature" not in json.loads((folder / "pixclass.json").read_text())
    art = artifact_io.load(folder)
    assert art.temperature == 1.0 and art.abstain is None
    [record], _ = Predictor(art).predict_files([FIXTURES / "circle.png"])
    assert record["unknown"] is False and record["score"] is None and record["answer"] == record["top_k"][0]["class"]
    artifact_io.save(art, tmp_path / "resaved")  # written back with the defaults, loads the same
    assert artifact_io.load(tmp_path / "resaved").temperature == 1.0


def test_an_artifact_with_a_max_probability_threshold_and_no_bank_answers_as_before(tmp_path):
    """The artifacts written between calibration and the feature bank: their threshold is on the
    top probability, and every backend (PyTorch here, ONNX from its export) applies it so."""
    folder = tmp_path / "mid"
    shutil.copytree(FIXTURES / "seed-cnn", folder)
    meta = json.loads((folder / "pixclass.json").read_text())
    meta["abstain"] = {"method": "max_probability", "threshold": 0.999, "keep": 0.95}
    (folder / "pixclass.json").write_text(json.dumps(meta))
    art = artifact_io.load(folder)
    assert art.feature_bank is None and art.abstain.method == "max_probability"
    [record], _ = Predictor(art).predict_files([FIXTURES / "circle.png"])
    assert record["score"] == pytest.approx(record["top_k"][0]["probability"])
    assert record["unknown"] == (record["score"] < 0.999)
    probs, similarity = TorchBackend.from_artifact(art).scores(torch.zeros(1, 3, art.preprocess.size,
                                                                           art.preprocess.size))
    assert similarity is None and probs.shape == (1, len(art.classes))


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 0.0, "temperature: Input should be greater than or equal to 0.05"),
    ("temperature", "2", "temperature: Input should be a valid number"),
    ("abstain", {"method": "energy", "threshold": 0.5, "keep": 0.95}, "abstain.method: Input should be"),
    ("abstain", {"method": "knn_similarity", "threshold": 0.5, "keep": 0.95}, "needs the feature bank"),
    ("abstain", {"method": "knn_similarity", "threshold": 0.5, "keep": 0.95,
                 "fallback": {"method": "knn_similarity", "threshold": 0.5, "keep": 0.95}},
     "a fallback threshold is a max_probability one"),
])
def test_a_damaged_calibration_is_one_error_line(tmp_path, field, value, message):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "seed-cnn", folder)
    meta = json.loads((folder / "pixclass.json").read_text())
    meta[field] = value
    (folder / "pixclass.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as caught:  # the CLI's one `error:` line
        artifact_io.load(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value)
