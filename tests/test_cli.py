"""End-to-end: the `pixclass` command in a fresh process, as a user runs it."""

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import make_shapes, run_cli


def test_train_evaluate_predict_end_to_end(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=20)
    (data / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "run"
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["run_dir"] == str(out) and Path(summary["model_dir"]).is_dir()
    assert summary["metrics"]["split"] == "test" and summary["metrics"]["n"] == 9
    assert summary["skipped_files"] == [str(data / "square" / "broken.jpg")]
    assert "broken.jpg" in proc.stderr  # listed in a warning
    assert "epoch 2/2" in proc.stderr  # progress goes to stderr

    proc = run_cli("evaluate", out / "model", data, "--json", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert "test split" in proc.stderr  # evaluated on the run's held-out test split, not on training images
    # the same model on the same split: what the run reported
    assert metrics["n"] == 9 and metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["metrics"]["loss"], rel=1e-4) and "top3_accuracy" in metrics
    assert [r["class"] for r in metrics["per_class"]] == ["circle", "square", "triangle"]
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file() and (tmp_path / "eval" / "confusion_matrix.json").is_file()

    proc = run_cli("predict", out / "model", data / "circle", data / "square" / "broken.jpg", "--format", "csv", "-k", "2")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 2 * 20 and {r["rank"] for r in rows} == {"1", "2"}
    assert "broken.jpg" in proc.stderr

    proc = run_cli("predict", out / "model", data / "circle" / "circle_000.png")
    assert proc.returncode == 0 and "circle_000.png" in proc.stdout


def test_rerun_with_the_manifest_keeps_the_split(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=10)
    out = tmp_path / "run"
    assert run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--out", out, "-q").returncode == 0
    first = (out / "manifest.csv").read_text()
    make_shapes(tmp_path / "more", per_class=3, seed=9)
    for f in (tmp_path / "more" / "circle").iterdir():
        f.rename(data / "circle" / f"extra_{f.name}")
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--out", tmp_path / "again",
                   "--manifest", out / "manifest.csv", "-q", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    second = set((tmp_path / "again" / "manifest.csv").read_text().splitlines())
    assert set(first.splitlines()) <= second and len(second) == len(first.splitlines()) + 3


def test_config_file_from_a_run_is_reusable(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=8)
    assert run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--lr", "0.002", "--out", tmp_path / "a", "-q").returncode == 0
    proc = run_cli("train", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b", "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    import yaml
    cfg = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 0.002 and cfg["data"]["image_size"] == 32


def test_summary_command():
    proc = run_cli("summary", "classic-cnn", "--image-size", "224", "--classes", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Conv2d" in proc.stdout and "Total params" in proc.stdout


def _unreadable_only(p: Path):
    for c in ("a", "b"):
        (p / c).mkdir(parents=True)
        for i in range(3):
            (p / c / f"{i}.jpg").write_bytes(f"garbage {c} {i}".encode())


BAD_INPUTS = {
    "missing folder": (lambda p: None, [], "dataset folder not found"),
    "empty folder": (lambda p: p.mkdir(), [], "no class folders found"),
    "one class": (lambda p: make_shapes(p, 4, classes=("cat",)), [], "only one class (cat)"),
    "tiny class": (lambda p: (make_shapes(p, 4, classes=("cat", "dog")),
                              [f.unlink() for f in sorted((p / "dog").iterdir())[1:]]), [], "fewer than 2 images in"),
    "no readable images": (_unreadable_only, [], "no readable training images"),
    "wrong model": (lambda p: make_shapes(p, 4), ["--model", "resnet_doesnotexist"], "unknown model 'resnet_doesnotexist'"),
    "bad option value": (lambda p: make_shapes(p, 4), ["--lr", "-0.1"], "lr must be > 0"),
    "bad augment": (lambda p: make_shapes(p, 4), ["--augment", "heavy"], "augment must be one of none, standard"),
    "bad config file": (lambda p: (make_shapes(p, 4), (p.parent / "c.yaml").write_text("train:\n  epochs: -3\n")),
                        ["--config", "{parent}/c.yaml"], "epochs must be >= 0"),
    "image too small": (lambda p: make_shapes(p, 4), ["--model", "classic-cnn", "--image-size", "16"], "too small for classic-cnn"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case):
    setup, extra, message = BAD_INPUTS[case]
    data = tmp_path / "data"
    setup(data)
    extra = [a.replace("{parent}", str(tmp_path)) for a in extra]
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--out", tmp_path / "run", "-q", *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line


def test_bad_model_folder_for_predict(tmp_path):
    proc = run_cli("predict", tmp_path, tmp_path)
    assert proc.returncode == 2 and "not a pixclass model folder" in proc.stderr and "Traceback" not in proc.stderr


def _unusable_outputs(tmp_path: Path) -> dict:
    """--out values that cannot be a folder: an existing file, and a path below a regular file
    (unwritable even for root, unlike a read-only folder)."""
    a_file = tmp_path / "taken.txt"
    a_file.write_text("not a folder")
    return {"existing file": (a_file, "is an existing file"),
            "below a file": (a_file / "out", "is a file, not a folder")}


@pytest.mark.parametrize("command", ["evaluate", "explain", "audit"])
def test_unusable_out_is_one_line_and_exit_code_2(command, trained_run, shapes_session, tmp_path, capsys):
    from pixclass.cli import main
    model = trained_run["model_dir"]
    args = {"evaluate": ["evaluate", model, shapes_session], "audit": ["audit", shapes_session],
            "explain": ["explain", model, shapes_session / "circle" / "circle_000.png"]}[command]
    for out, message in _unusable_outputs(tmp_path).values():
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args] + ["--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: --out ") and message in err, err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]  # nothing written anywhere


def test_a_minority_class_is_tested_and_a_missing_split_is_named(tmp_path):
    make_shapes(tmp_path / "data", per_class=40, classes=("circle",))
    data = make_shapes(tmp_path / "data", per_class=2, classes=("square",), seed=1)
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--out",
                   tmp_path / "run", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["split"] == "test" and metrics["absent_classes"] == []  # the 2-image class is tested
    assert "no val images for class(es) square (2 image(s) in all)" in proc.stderr


def test_a_class_missing_from_a_given_manifests_test_split_is_named_beside_the_accuracy(tmp_path):
    # a manifest (or a fixed split) can leave a class out of the held-out split: the final
    # accuracy then does not cover it, and the run says so beside it
    data = make_shapes(tmp_path / "data", per_class=6, classes=("circle", "square"))
    rows = ["path,class,split"]
    for cls in ("circle", "square"):
        for i, f in enumerate(sorted((data / cls).iterdir())):
            split = "train" if i < 4 or cls == "square" else "test"
            rows.append(f"{cls}/{f.name},{cls},{split}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32", "--manifest",
                   manifest, "--out", tmp_path / "run", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["absent_classes"] == ["square"]
    assert "not evaluated: square" in proc.stderr


def test_evaluating_without_a_class_says_so(trained_run, shapes_session, tmp_path, capsys):
    from pixclass.cli import main
    from conftest import subset
    data = subset(shapes_session, tmp_path / "two", classes=("circle", "square"))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", trained_run["model_dir"], str(data), "--out", str(tmp_path / "eval"), "--json"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert metrics["absent_classes"] == ["triangle"]
    scored = [r["f1"] for r in metrics["per_class"] if r["class"] != "triangle"]
    assert metrics["macro_f1"] == pytest.approx(sum(scored) / 2)
    assert "not evaluated: triangle" in captured.err
    assert "not evaluated" in (tmp_path / "eval" / "report.html").read_text()


def test_train_and_audit_agree_on_the_files_used_and_the_report_names_the_split(tmp_path):
    data = make_shapes(tmp_path / "data", per_class=8)
    image = (data / "circle" / "circle_000.png").read_bytes()
    (data / "circle" / "photo.heic").write_bytes(image)  # an image under a name training does not read
    (data / "square" / "noextension").write_bytes(image)
    (data / "square" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    proc = run_cli("train", data, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32",
                   "--split", "0.75,0.25,0", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "ignored 2 file(s) without an image extension (.heic 1, no extension 1" in proc.stderr
    # the data line counts the images used: the manifest's minus the unreadable one
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    used = [r for r in rows if r["path"] != "square/broken.png"]
    train = sum(r["split"] == "train" for r in used)
    assert f"train {train}, val {len(used) - train}, test 0 images" in proc.stderr
    page = (out / "report.html").read_text()
    assert "<h1>pixclass run: run</h1>" in page
    assert "<h2>Validation metrics</h2>" in page and "Test metrics" not in page

    proc = run_cli("audit", data, "--json", "--out", tmp_path / "audit")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert {Path(x["path"]).name for x in found["problems"]["ignored_extension"]} == {"photo.heic", "noextension"}
    per_class = {c: sum(r["class"] == c for r in used) for c in ("circle", "square", "triangle")}
    assert {c: n["all"] for c, n in found["counts"].items()} == per_class


def test_predict_on_files_that_are_not_images_is_one_line(trained_run, tmp_path, capsys):
    from pixclass.cli import main
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("not a picture")
    (junk / "b.png").write_bytes(b"\x89PNG nothing more")
    proc = run_cli("predict", trained_run["model_dir"], junk)  # the table to a pipe
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: none of the 2 file(s) given could be read as an image")
    assert proc.stderr.count("\n") == 1
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("text")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", trained_run["model_dir"], str(notes)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: no image files found") and "ignored 1 file(s)" in err


def test_too_large_image_quotes_the_max_pixels_given(trained_run, tmp_path, capsys):
    from PIL import Image
    from pixclass.cli import main
    big = tmp_path / "big.png"
    Image.new("1", (10000, 9000)).save(big)  # 90 megapixels, over Pillow's own limit as well
    from pixclass.data.decode import set_max_pixels
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["predict", trained_run["model_dir"], str(big), "--max-pixels", "1000000"])
    finally:
        set_max_pixels(None)  # predict sets the limit for its process: not for the tests that follow
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "(90,000,000 pixels, limit 1,000,000; raise it with --max-pixels)" in err
