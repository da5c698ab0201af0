import json

import numpy as np

import pixclass

from conftest import make_shapes, run_cli


def test_keras_like_api_round_trip(tmp_path):
    data = pixclass.ImageFolder(make_shapes(tmp_path / "shapes", per_class=20), image_size=32, augment="standard", quiet=True)
    assert data.classes == ["circle", "square", "triangle"] and len(data.train) == 42
    clf = pixclass.ImageClassifier("classic-cnn")
    history = clf.fit(data, epochs=2, batch_size=16, out=tmp_path / "run", quiet=True)
    assert len(history) == 2 and {"train_loss", "val_accuracy"} <= set(history[0])
    assert (tmp_path / "run" / "report.html").is_file() and clf.metrics["split"] == "test"
    metrics = clf.evaluate(data)
    assert metrics["n"] == 9 and metrics["accuracy"] == clf.metrics["accuracy"] and len(metrics["per_class"]) == 3
    top = clf.predict(tmp_path / "shapes" / "circle" / "circle_000.png", k=2)
    assert len(top) == 2 and top[0]["class"] in data.classes
    assert "Conv2d" in clf.summary()
    clf.save(tmp_path / "model")
    again = pixclass.load(tmp_path / "model")
    assert again.predict(tmp_path / "shapes" / "circle" / "circle_000.png", k=2) == top


def test_summary_before_training_needs_a_size():
    clf = pixclass.ImageClassifier("classic-cnn", classes=["a", "b"], image_size=64)
    assert "Total params" in clf.summary()


def test_the_api_trains_what_the_command_line_trains(tmp_path):
    """Defaults on both sides (for images of 96 px, a pretrained EfficientNet-Lite planned for the
    budget: for 60 images, Lite2): same architecture, same preprocessing, the same answers on the
    test split."""
    shapes = make_shapes(tmp_path / "shapes", per_class=20, size=96)
    proc = run_cli("train", shapes, "--out", tmp_path / "cli", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    cli_summary = json.loads(proc.stdout)
    clf = pixclass.ImageClassifier()
    clf.fit(pixclass.ImageFolder(shapes, quiet=True), out=tmp_path / "api", quiet=True)
    cli_model = pixclass.load(cli_summary["model_dir"])
    assert clf.arch == cli_model.arch and clf.arch["backbone"] == "tf_efficientnet_lite2"
    assert clf.preprocess == cli_model.preprocess and clf.preprocess.size == 260
    test_files = [line.split(",")[0] for line in (tmp_path / "cli" / "manifest.csv").read_text().splitlines()[1:]
                  if line.endswith(",test")]
    assert len(test_files) == 9
    paths = [shapes / f for f in test_files]
    ours, theirs = clf.predict_proba(paths), cli_model.predict_proba(paths)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99
    assert np.abs(ours - theirs).max() < 1e-4
