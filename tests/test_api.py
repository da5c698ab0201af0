import pixclass

from conftest import make_shapes


def test_keras_like_api_round_trip(tmp_path):
    data = pixclass.ImageFolder(make_shapes(tmp_path / "shapes", per_class=20), image_size=32, augment="standard", quiet=True)
    assert data.classes == ["circle", "square", "triangle"] and len(data.train) == 42
    clf = pixclass.ImageClassifier("seed-cnn", classes=data.classes)
    history = clf.fit(data, epochs=2, batch_size=16, quiet=True)
    assert len(history) == 2 and {"train_loss", "val_accuracy"} <= set(history[0])
    metrics = clf.evaluate(data.test)
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["per_class"]) == 3
    top = clf.predict(tmp_path / "shapes" / "circle" / "circle_000.png", k=2)
    assert len(top) == 2 and top[0]["class"] in data.classes
    assert "Conv2d" in clf.summary()
    clf.save(tmp_path / "model")
    again = pixclass.load(tmp_path / "model")
    assert again.predict(tmp_path / "shapes" / "circle" / "circle_000.png", k=2) == top


def test_summary_before_training_needs_a_size():
    clf = pixclass.ImageClassifier("seed-cnn", classes=["a", "b"], image_size=64)
    assert "Total params" in clf.summary()
