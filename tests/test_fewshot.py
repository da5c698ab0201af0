"""Few-shot training, add-class and suggest (issue 19, items 3 and 4), end to end on small
synthetic photos (96 px, so `--recipe auto` takes the pretrained route)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pixclass import artifact as artifact_io
from pixclass.cli import main
from pixclass.predict import Predictor

from conftest import make_shapes

SIZE = 96
NOT_FEW_SHOT = Path(__file__).parent / "fixtures" / "artifacts-6de4714" / "seed-cnn"  # a saved classic CNN


def _split_folders(root, classes, per_class=6, seed=0):
    make_shapes(root / "train", per_class=per_class, seed=seed, classes=classes, size=SIZE)
    make_shapes(root / "val", per_class=per_class, seed=seed + 1, classes=classes, size=SIZE)
    return root


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
    """Auto recipe on 6 training images per class of two shapes: the few-shot path."""
    from pixclass.config import DataConfig, RunConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training
    root = tmp_path_factory.mktemp("fewshot")
    data = _split_folders(root / "data", ("circle", "square"))
    cfg = RunConfig(data=DataConfig(path=str(data)))
    summary = run_training(cfg, out=root / "run", reporter=Reporter(quiet=True))
    return summary, data, root


def test_auto_chooses_few_shot_and_the_saved_model_predicts(fewshot_run):
    summary, data, _ = fewshot_run
    assert summary["recipe"] == "fewshot"
    metrics = summary["metrics"]
    assert metrics["fewshot_estimate"] == "leave-one-out" and metrics["fewshot_head"] in ("prototypes", "linear")
    assert metrics["loo_accuracy"] == max(metrics["loo_accuracy_prototypes"], metrics["loo_accuracy_linear"])
    saved = json.loads((Path(summary["model_dir"]) / "pixclass.json").read_text())
    assert saved["arch"]["kwargs"]["head"] == "normalized" and saved["metrics"]["loo_accuracy"] == metrics["loo_accuracy"]
    # the saved model, through the ordinary predictor, reproduces the run's validation accuracy
    predictor = Predictor.load(summary["model_dir"])
    files = sorted((data / "val").rglob("*.png"))
    results, failures = predictor.predict_files(files)
    assert not failures
    correct = [r["top_k"][0]["class"] == f.parent.name for r, f in zip(results, files)]
    assert np.mean(correct) == pytest.approx(metrics["accuracy"])
    assert metrics["accuracy"] >= 0.75  # circles and squares are told apart from six examples each
    assert "accuracy on the training images" in (Path(summary["run_dir"]) / "report.html").read_text()


def test_add_class_adds_a_class_and_keeps_the_old_ones(fewshot_run, tmp_path, capsys):
    summary, data, _ = fewshot_run
    triangles = make_shapes(tmp_path / "new", per_class=6, seed=7, classes=("triangle",), size=SIZE) / "triangle"
    out = tmp_path / "with-triangle"
    code, stdout, err = _cli(capsys, "add-class", summary["model_dir"], triangles, "--out", out)
    assert code == 0, err
    assert "added class 'triangle'" in stdout
    old, new = Predictor.load(summary["model_dir"]), Predictor.load(out)
    assert new.classes == ["circle", "square", "triangle"]
    old_files = sorted((data / "val").rglob("*.png"))
    p_old, p_new = old.probabilities(old_files), new.probabilities(old_files)
    # the old classes' scores keep their ratios (their rows are untouched): same order among them
    renormalized = p_new[:, :2] / p_new[:, :2].sum(1, keepdims=True)
    np.testing.assert_allclose(renormalized, p_old, atol=1e-4)
    assert (p_new[:, :2].argmax(1) == p_old.argmax(1)).all()
    fresh = make_shapes(tmp_path / "fresh", per_class=6, seed=11, classes=("triangle",), size=SIZE) / "triangle"
    assert (new.probabilities(sorted(fresh.iterdir())).argmax(1) == 2).mean() >= 0.5
    # the unknown answer's feature bank grew by the new images: a triangle the model was given is
    # not "unknown" to it (its own embedding is in the bank)
    old_art, new_art = artifact_io.load(summary["model_dir"]), artifact_io.load(out)
    assert old_art.abstain.method == "knn_similarity" and len(new_art.feature_bank) == len(old_art.feature_bank) + 6
    answers, _ = new.predict_files(sorted(triangles.iterdir()))
    assert [a["answer"] for a in answers] == ["triangle"] * 6
    assert (Path(summary["model_dir"]) / "pixclass.json").read_text().count("triangle") == 0


def test_add_class_misuse_is_one_line(fewshot_run, tmp_path, capsys):
    summary, data, _ = fewshot_run
    cases = [((NOT_FEW_SHOT, data / "train" / "circle", "--name", "x"), "not a few-shot (prototype) model"),
             ((summary["model_dir"], data / "train" / "circle"), "already has a class 'circle'"),
             ((summary["model_dir"], tmp_path / "missing", "--name", "y"), "not a folder"),
             ((summary["model_dir"], data / "train" / "circle", "--name", "z", "--out", summary["model_dir"]),
              "exists already")]
    for args, message in cases:
        code, stdout, err = _cli(capsys, "add-class", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_suggest_writes_csv_and_html_with_diverse_picks(fewshot_run, tmp_path, capsys):
    summary, _, _ = fewshot_run
    pool = make_shapes(tmp_path / "pool", per_class=8, seed=21, classes=("circle", "square"), size=SIZE)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for f in sorted(pool.rglob("*.png")):
        shutil.copy(f, unlabeled / f.name)
    code, _, err = _cli(capsys, "suggest", summary["model_dir"], unlabeled, "--n", "16", "--out", tmp_path / "first")
    assert code == 0, err
    first = list(csv.DictReader((tmp_path / "first" / "suggest.csv").open()))
    # eight copies of the most uncertain image: a ranking by uncertainty alone would pick them all
    top = unlabeled / first[0]["path"].rsplit("/", 1)[1]
    assert float(first[0]["score"]) >= max(float(r["score"]) for r in first)
    for i in range(8):
        shutil.copy(top, unlabeled / f"copy_{i}.png")
    code, _, err = _cli(capsys, "suggest", summary["model_dir"], unlabeled, "--n", "5", "--out", tmp_path / "s")
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "s" / "suggest.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert set(rows[0]) == {"rank", "path", "score", "top_classes"}
    same = [r for r in rows if r["path"].endswith(top.name) or "copy_" in r["path"]]
    assert len(same) == 1  # the copies are near-identical to the first pick: skipped
    page = (tmp_path / "s" / "suggest.html").read_text()
    assert page.count("<img ") == 5 and "Label these next" in page


def test_suggest_misuse_is_one_line(fewshot_run, tmp_path, capsys):
    summary, data, _ = fewshot_run
    for args, message in [((summary["model_dir"], tmp_path / "missing"), "not a folder"),
                          ((summary["model_dir"], data / "val", "--by", "luck"), "--by must be one of"),
                          ((tmp_path, data / "val"), "not a pixclass model folder")]:
        code, _, err = _cli(capsys, "suggest", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
