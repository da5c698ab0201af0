import numpy as np

from pixclass.metrics import classification_metrics, confusion_matrix, per_class_report


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix as sk_cm, precision_recall_fscore_support
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, 200))
    preds[preds == 3] = 2  # class 3 never predicted: precision undefined -> 0
    assert (confusion_matrix(labels, preds, 4) == sk_cm(labels, preds, labels=[0, 1, 2, 3])).all()
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=[0, 1, 2, 3], zero_division=0)
    report = per_class_report(labels, preds, ["a", "b", "c", "d"])
    assert np.allclose([x["precision"] for x in report], p) and np.allclose([x["recall"] for x in report], r)
    assert np.allclose([x["f1"] for x in report], f) and [x["support"] for x in report] == list(s)


def test_classification_metrics_topk_and_loss():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1])
    m = classification_metrics(labels, probs, ["x", "y", "z"], k=2)
    assert m["accuracy"] == 1 / 3 and m["top2_accuracy"] == 1.0
    assert abs(m["loss"] - np.mean(-np.log([0.7, 0.3, 0.4]))) < 1e-9


def test_a_class_absent_from_the_evaluated_labels_is_named_not_scored():
    from sklearn.metrics import f1_score
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1, 0, 0])  # no image of class "z"
    m = classification_metrics(labels, probs, ["x", "y", "z"])
    assert m["absent_classes"] == ["z"]
    assert m["macro_f1"] == f1_score(labels, probs.argmax(1), labels=[0, 1], average="macro")  # over x and y
    assert [r["support"] for r in m["per_class"]] == [3, 1, 0]
    full = classification_metrics(np.array([0, 1, 2]), np.eye(3), ["x", "y", "z"])
    assert full["absent_classes"] == [] and full["macro_f1"] == 1.0
