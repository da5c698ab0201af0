"""`pixclass robustness` (corruptions and ART attacks, JSON and HTML) and `train --adversarial`
(issue 20, items 3-4), on the drawn-shapes data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixclass import artifact
from pixclass.cli import main

from conftest import chromium_page, needs_chromium

OUTPUT = Path(__file__).resolve().parent / "output"


@pytest.fixture(scope="module")
def robustness_run(trained_run, shapes_session, tmp_path_factory):
    from pixclass.progress import Reporter
    from pixclass.robustness import run_robustness
    model_dir = Path(trained_run["model_dir"])
    out = tmp_path_factory.mktemp("robustness")
    results = run_robustness(artifact.load(model_dir), shapes_session, out, model_dir=model_dir, limit=60,
                             eps_255=(8, 32), steps=5, reporter=Reporter(quiet=True))
    return results, out


def test_robustness_measures_corruptions_and_attacks(robustness_run, trained_run):
    from pixclass.corruptions import CORRUPTIONS, SEVERITIES
    results, out = robustness_run
    written = json.loads((out / "robustness.json").read_text())
    # the model's own held-out test split (fewer than --limit images)
    assert written["clean_accuracy"] == results["clean_accuracy"] and written["images"] == trained_run["metrics"]["n"]
    assert set(written["corruptions"]) == set(CORRUPTIONS)
    for c in written["corruptions"].values():
        assert [r["severity"] for r in c["severities"]] == list(SEVERITIES)
        assert all(0 <= r["accuracy"] <= 1 for r in c["severities"])
    # the strongest corruptions change what the model sees: not every one leaves accuracy as it was
    strongest = [c["severities"][-1]["accuracy"] for c in written["corruptions"].values()]
    assert min(strongest) < written["clean_accuracy"]
    for name in ("fgsm", "pgd"):
        assert [r["eps_255"] for r in written["attacks"][name]] == [8, 32]
    pgd = {r["eps_255"]: r["accuracy"] for r in written["attacks"]["pgd"]}
    fgsm = {r["eps_255"]: r["accuracy"] for r in written["attacks"]["fgsm"]}
    # the attacks work: the undefended CNN loses most of its accuracy at 32/255 (bright shapes on dark
    # ground resist smaller ε), PGD at least as much as the single FGSM step
    assert pgd[32] < 0.5 * written["clean_accuracy"] and pgd[32] <= fgsm[32] and pgd[32] <= pgd[8]
    assert written["clean_accuracy"] > 0.6  # the model learnt the shapes: the drops above are its own


@needs_chromium
def test_robustness_report_renders_in_chromium(robustness_run):
    _, out = robustness_run
    page_path = out / "robustness.html"
    OUTPUT.mkdir(exist_ok=True)
    errors = []
    with chromium_page(page_path.as_uri(), errors) as page:
        for section in ("summary", "curves", "corruptions", "attacks", "examples"):
            assert page.locator(f"section#{section} h2").count() == 1, section
        assert page.locator("img").count() == 2
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUTPUT / "robustness.png"), full_page=True)
    assert errors == []
    assert "http" not in page_path.read_text()  # self-contained


@pytest.mark.slow
def test_adversarial_training_resists_pgd_better(trained_run, shapes_session, tmp_path):
    """The same run with --adversarial at 16/255: its held-out PGD accuracy is in the metrics and
    the report, and on all the images it beats the plainly trained model's under the same attack."""
    from pixclass.attacks import attack_accuracy
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.robustness import sample_images
    from pixclass.train.run import run_training
    cfg = RunConfig(data=DataConfig(path=str(shapes_session), image_size=32), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"),
                    train=TrainConfig(epochs=12, batch_size=16, seed=0, adversarial=True, adversarial_eps=16.0))
    summary = run_training(cfg, out=tmp_path / "adv", reporter=Reporter(quiet=True))
    accuracy = {}
    for name, model_dir in (("plain", trained_run["model_dir"]), ("adversarial", summary["model_dir"])):
        art = artifact.load(model_dir)
        images, labels, _, _ = sample_images(art, shapes_session, limit=None, reporter=Reporter(quiet=True))
        np.random.seed(0)  # PGD's random start
        accuracy[name] = attack_accuracy(art.model, art.preprocess, len(art.classes), images, labels, "pgd", 16 / 255)
    assert accuracy["adversarial"] >= accuracy["plain"] + 0.1, accuracy


def test_adversarial_run_reports_clean_and_pgd_accuracy(shapes, tmp_path):
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training
    cfg = RunConfig(data=DataConfig(path=str(shapes), image_size=32), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"),
                    train=TrainConfig(epochs=2, batch_size=16, seed=0, adversarial=True, adversarial_eps=4.0))
    summary = run_training(cfg, out=tmp_path / "adv", reporter=Reporter(quiet=True))
    robust = summary["metrics"]["adversarial"]
    assert robust["attack"] == "PGD" and robust["eps_255"] == 4.0 and robust["n"] == summary["metrics"]["n"]
    assert 0 <= robust["accuracy"] <= 1
    page = Path(summary["report"]).read_text()
    assert "accuracy under PGD ε=4/255" in page and f"{robust['accuracy']:.4f}" in page
    saved = artifact.load(summary["model_dir"])
    assert saved.metrics["adversarial"] == robust and saved.config["train"]["adversarial"] is True


def test_fast_adversary_stays_in_the_eps_ball():
    from pixclass.config import ModelConfig
    from pixclass.data.transforms import Preprocess, normalize
    from pixclass.models.registry import create_model
    from pixclass.train.adversarial import FastAdversary
    model, _ = create_model("classic-cnn", 3, 3, 32, ModelConfig(name="classic-cnn"))
    pre = Preprocess(32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    pixels = torch.rand(8, 3, 32, 32)
    adversary = FastAdversary(model.train(), pre, 4 / 255)
    out = adversary(normalize(pixels, pre), torch.randint(0, 3, (8,)), torch.Generator().manual_seed(0))
    back = out * torch.tensor(pre.std).view(1, -1, 1, 1) + torch.tensor(pre.mean).view(1, -1, 1, 1)
    change = (back - pixels).abs()
    assert change.max() <= 4 / 255 + 1e-5 and change.mean() > 1 / 255
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5


@pytest.mark.parametrize("args, message", [
    (["--eps", "0,2"], "--eps values must be in (0, 255]"),
    (["--eps", "two"], "--eps must be numbers"),
])
def test_robustness_bad_eps_is_one_line(args, message, trained_run, shapes_session, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", trained_run["model_dir"], str(shapes_session), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_adversarial_needs_a_recipe_that_trains_on_images(shapes, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(shapes), "--recipe", "transfer", "--adversarial"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adversarial" in err[0] and "scratch" in err[0]


def test_robustness_command_prints_json_and_writes_the_report(trained_run, shapes_session, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", trained_run["model_dir"], str(shapes_session), "--limit", "10", "--eps", "8",
              "--pgd-steps", "2", "--json", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(tmp_path / "r" / "robustness.html") and (tmp_path / "r" / "robustness.html").is_file()
    assert [r["eps_255"] for r in printed["attacks"]["pgd"]] == [8]
