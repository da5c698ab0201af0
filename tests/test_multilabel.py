"""Multi-label classification end to end on pairs of CIFAR-10 images (conftest.cifar_multilabel):
training with sigmoid outputs and thresholds tuned on validation, evaluate, the report, predict on
the saved model and its ONNX export, the service; and the metrics against scikit-learn's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MULTILABEL_CLASSES, needs_cifar, run_cli, start_server
from phone_browser import classify, needs_chromium, phone_page
from pixclass.metrics import average_precision, multilabel_metrics, tune_thresholds


def test_average_precision_is_scikit_learns():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(50) < 0.3
        scores = np.round(rng.random(50), 1)  # ties included
        assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores))


def test_thresholds_maximize_each_labels_f1():
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 3)) < 0.4).astype(np.float32)
    probs = np.clip(labels * 0.35 + rng.random((200, 3)) * 0.65, 0, 1).astype(np.float32)
    probs[:, 2] = 0.3  # one label the model cannot tell: every image or none
    labels[:, 1] = 0  # one label with no positive image keeps the default
    thresholds = tune_thresholds(labels, probs)
    assert thresholds[1] == 0.5
    tuned = multilabel_metrics(labels, probs, list("abc"), thresholds)["per_class"]
    for t in np.linspace(0, 1, 41):  # no other threshold does better on these images
        other = multilabel_metrics(labels, probs, list("abc"), [t] * 3)["per_class"]
        for j in (0, 2):
            assert tuned[j]["f1"] >= other[j]["f1"] - 1e-9


@pytest.fixture(scope="module")
def multilabel_run(cifar_multilabel, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml-run") / "run"
    r = run_cli("train", str(cifar_multilabel), "--out", str(out), "--image-size", "32", "--epochs", "8")
    assert r.returncode == 0, r.stderr
    return out, r.stdout + r.stderr


@needs_cifar
def test_trains_with_sigmoid_outputs_and_tuned_thresholds(multilabel_run, cifar_multilabel):
    out, log = multilabel_run
    assert "multi-label data" in log and "no temperature scaling" in log
    meta = json.loads((out / "model" / "pixclass.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == sorted(MULTILABEL_CLASSES)
    assert len(meta["thresholds"]) == 4 and meta["abstain"] is None and meta["temperature"] == 1.0
    m = meta["metrics"]
    # a quarter of the pairs have one label, the others two: answering every label scores a
    # macro-F1 near 0.6 and a mAP near 0.45 (each label's share); the tiny run must beat both
    assert m["mAP"] > 0.6 and m["macro_f1"] > 0.62, m
    per_label = json.loads((out / "evaluation" / "metrics.json").read_text())["per_class"]
    assert [r["threshold"] for r in per_label] == pytest.approx(meta["thresholds"])
    rows = list(csv.DictReader(open(out / "evaluation" / "per_class.csv")))
    assert {"average_precision", "threshold"} <= set(rows[0])
    assert not (out / "evaluation" / "confusion_matrix.json").exists()
    page = (out / "report.html").read_text()
    assert "Per-label precision" in page and "mAP" in page and "Confusion matrix" not in page


@needs_cifar
def test_evaluate_gives_the_runs_figures(multilabel_run, cifar_multilabel, tmp_path):
    out, _ = multilabel_run
    r = run_cli("evaluate", str(out / "model"), str(cifar_multilabel), "--out", str(tmp_path / "ev"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    saved = json.loads((out / "model" / "pixclass.json").read_text())["metrics"]
    assert got["evaluated_on"].startswith("the test split") and got["n"] == saved["n"]
    assert got["mAP"] == pytest.approx(saved["mAP"], abs=1e-6)
    assert got["macro_f1"] == pytest.approx(saved["macro_f1"], abs=1e-6)


def _labels_above_thresholds(record, thresholds, classes) -> list[str]:
    probs = {c["class"]: c["probability"] for c in record["top_k"]}
    return sorted(c for c, t in zip(classes, thresholds) if probs[c] >= t)


@needs_cifar
def test_predict_and_the_onnx_export_answer_every_label_above_its_threshold(multilabel_run, cifar_multilabel,
                                                                           tmp_path):
    out, _ = multilabel_run
    meta = json.loads((out / "model" / "pixclass.json").read_text())
    r = run_cli("export", str(out / "model"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    verified = json.loads(r.stdout)
    # the label sets above the thresholds agree, on the held-out pairs and on others
    assert verified["passed"] and verified["agreement"] >= 0.99 and verified["n_held_out"] > 0 and verified["multilabel"]
    images = sorted((cifar_multilabel.parent / "images").iterdir())[:40]
    answers = {}
    for model in (out / "model", tmp_path / "m.onnx"):
        r = run_cli("predict", str(model), *map(str, images), "--top-k", "4", "--json")
        assert r.returncode == 0, r.stderr
        records = json.loads(r.stdout)
        for rec in records:
            assert sorted(rec["labels"]) == _labels_above_thresholds(rec, meta["thresholds"], meta["classes"])
            assert rec["answer"] == " ".join(rec["labels"])
        answers[model.name] = [rec["labels"] for rec in records]
        assert any(len(labels) == 2 for labels in answers[model.name])
    assert answers["model"] == answers["m.onnx"]
    r = run_cli("predict", str(tmp_path / "m.onnx"), *map(str, images[:5]), "--top-k", "4", "--out",
                str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [row["answer"] for row in rows] == [" ".join(a) for a in answers["m.onnx"][:5]]


@needs_cifar
def test_the_service_answers_the_label_list(multilabel_run, cifar_multilabel):
    import httpx
    out, _ = multilabel_run
    meta = json.loads((out / "model" / "pixclass.json").read_text())
    image = sorted((cifar_multilabel.parent / "images").iterdir())[0]
    proc, url = start_server(out / "model")
    try:
        r = httpx.post(f"{url}/v1/predict", params={"k": 4}, files=[("files", (image.name, image.read_bytes()))])
        assert r.status_code == 200, r.text
        [pred] = r.json()["predictions"]
        assert sorted(pred["labels"]) == _labels_above_thresholds(pred, meta["thresholds"], meta["classes"])
        info = httpx.get(f"{url}/v1/model").json()
        assert info["task"] == "multilabel" and info["thresholds"] == meta["thresholds"]
    finally:
        proc.terminate()
        proc.wait(10)


@needs_cifar
def test_the_python_api_answers_the_label_list_and_saves_a_multilabel_model(multilabel_run, cifar_multilabel,
                                                                            tmp_path):
    from pixclass import api
    out, _ = multilabel_run
    images = sorted((cifar_multilabel.parent / "images").iterdir())[:20]
    predicted = json.loads(run_cli("predict", str(out / "model"), *map(str, images), "--json").stdout)
    clf = api.load(out / "model")
    answers = clf.predict([str(p) for p in images])
    assert [[c["class"] for c in a] for a in answers] == [r["labels"] for r in predicted]
    # sigmoid outputs, not a softmax: the probabilities of an image need not sum to 1
    assert not np.allclose(clf.predict_proba([str(images[0])]).sum(), 1.0, atol=1e-3)
    saved = json.loads((clf.save(tmp_path / "again") / "pixclass.json").read_text())
    assert saved["task"] == "multilabel" and saved["thresholds"] == pytest.approx(clf.thresholds)


@needs_cifar
@needs_chromium
def test_the_web_app_answers_the_label_list(multilabel_run, cifar_multilabel, tmp_path):
    out, _ = multilabel_run
    r = run_cli("export", str(out / "model"), "--format", "webapp", "--out", str(tmp_path / "app"), "--json")
    assert r.returncode == 0, r.stderr
    images = sorted((cifar_multilabel.parent / "images").iterdir())[:40]
    predicted = json.loads(run_cli("predict", str(out / "model"), *map(str, images), "--json").stdout)
    # two images with two labels and, where predict answers any, one with another number of labels
    two = [r for r in predicted if len(r["labels"]) == 2][:2]
    picked = two + [r for r in predicted if len(r["labels"]) != 2][:1]
    assert len(two) == 2
    errors = []
    with phone_page(tmp_path / "app", errors) as (_, page):
        shown = [classify(page, Path(r["path"])) for r in picked]
    assert errors == []
    for record, result in zip(picked, shown):
        assert json.loads(result["labels"]) == record["labels"] and result["answer"] == record["answer"]
        assert result["status"] == (f"labels: {record['answer']}" if record["labels"] else "no label reaches its threshold")


def _csv(tmp_path: Path, text: str, images=("a.png", "b.png", "c.png")) -> Path:
    from PIL import Image
    for name in images:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text(text)
    return tmp_path / "labels.csv"


@needs_cifar
def test_tune_judges_multilabel_trials_by_validation_map(cifar_multilabel, tmp_path):
    """Per-label yes/no accuracy rewards answering "no" everywhere; trials are picked by mAP, and
    best.yaml reruns to the best trial's figure."""
    r = run_cli("tune", str(cifar_multilabel), "--trials", "2", "--seed", "3", "--out", str(tmp_path / "t"), "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["metric"] == "val_map"
    r = run_cli("train", "--config", str(tmp_path / "t" / "best.yaml"), "--out", str(tmp_path / "rerun"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "rerun" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert found["best_value"] == pytest.approx(max(float(row["val_map"]) for row in rows), abs=0.01)
    assert found["best_value"] != pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)


def test_a_bad_multilabel_csv_is_one_error_line(tmp_path):
    csv_path = _csv(tmp_path, 'path,label,split\na.png,"x y",train\nb.png,x,val\nc.png,z,test\n')
    r = run_cli("train", str(csv_path), "--model", "classic-cnn", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "tag(s) z have no training row" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_multilabel_data_with_another_recipe_is_one_error_line(tmp_path):
    csv_path = _csv(tmp_path, 'path,label\na.png,"x y"\nb.png,x\nc.png,y\n')
    r = run_cli("train", str(csv_path), "--recipe", "fast", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "multi-label" in r.stderr and "--recipe scratch" in r.stderr and len(r.stderr.strip().splitlines()) == 1
