"""`--recipe auto` with no model named: the images' size decides between the fast from-scratch
recipe (small images) and transfer learning; the choice and its reason are recorded and shown."""

import pytest
import yaml
from conftest import make_shapes, run_cli

from pixclass.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pixclass.data.probe import probe_image_sizes
from pixclass.train.distributed import Dist
from pixclass.train.recipes import choose_recipe


def _config(tmp_path, run) -> dict:
    return yaml.safe_load((tmp_path / run / "config.yaml").read_text())


def test_default_on_small_images_trains_the_fast_recipe_and_a_config_rerun_keeps_it(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=10, size=32)
    proc = run_cli("train", data, "--epochs", "1", "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert "images are 32 px (median side of 30 sampled): fast from-scratch recipe (airbench)" in proc.stderr
    assert "recipe fast" in proc.stderr and (tmp_path / "a" / "model" / "pixclass.json").is_file()
    cfg = _config(tmp_path, "a")
    assert (cfg["train"]["recipe"], cfg["model"]["name"]) == ("fast", "airbench")
    assert cfg["train"]["recipe_reason"].startswith("images are 32 px")
    again = run_cli("train", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert "recipe fast" in again.stderr and "median side" not in again.stderr  # chosen before, not again
    assert _config(tmp_path, "b")["train"] == cfg["train"] and _config(tmp_path, "b")["model"] == cfg["model"]


def test_a_model_named_on_a_rerun_of_an_auto_config_trains_with_its_own_recipe(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=6, size=32)
    first = RunConfig(data=DataConfig(path=str(data)))
    chosen, _, recipe = choose_recipe(first)
    assert recipe.name == "fast"
    chosen.save_yaml(tmp_path / "auto.yaml")
    proc = run_cli("train", "--config", tmp_path / "auto.yaml", "--model", "classic-cnn", "--epochs", "1",
                   "--out", tmp_path / "r", "-q")
    assert proc.returncode == 0, proc.stderr
    cfg = _config(tmp_path, "r")
    assert (cfg["train"]["recipe"], cfg["model"]["name"]) == ("scratch", "classic-cnn")
    assert cfg["train"]["recipe_reason"] == ""


@pytest.mark.parametrize("per_class, recipe, reason", [
    (11, "transfer", "images are 128 px (median side of 33 sampled): transfer learning from efficientnet_lite0"),
    (10, "fewshot", "images are 128 px (median side of 30 sampled), at most 10 training images per class: "
                    "few-shot classifier on efficientnet_lite0 embeddings"),
])
def test_default_on_larger_images_is_transfer_learning_or_few_shot_with_ten_per_class(tmp_path, per_class, recipe,
                                                                                       reason):
    data = make_shapes(tmp_path / "shapes", per_class=per_class, size=128)
    cfg, _, chosen = choose_recipe(RunConfig(data=DataConfig(path=str(data))))
    assert (chosen.name, cfg.model.name) == (recipe, "efficientnet_lite0")
    assert cfg.train.recipe_reason == reason


def test_a_named_model_or_recipe_wins_over_the_images(tmp_path):
    data = DataConfig(path=str(make_shapes(tmp_path / "shapes", per_class=4, size=32)))
    cfg, _, recipe = choose_recipe(RunConfig(data=data, model=ModelConfig(name="classic-cnn")))
    assert (recipe.name, cfg.model.name, cfg.train.recipe_reason) == ("scratch", "classic-cnn", "")
    cfg, _, recipe = choose_recipe(RunConfig(data=data, train=TrainConfig(recipe="transfer")))
    assert (recipe.name, cfg.model.name, cfg.train.recipe_reason) == ("transfer", "efficientnet_lite0", "")


def test_small_images_go_to_transfer_where_the_fast_recipe_cannot_serve(tmp_path):
    data = DataConfig(path=str(make_shapes(tmp_path / "shapes", per_class=4, size=32)))
    cfg, _, recipe = choose_recipe(RunConfig(data=data), Dist(world=2))
    assert recipe.name == "transfer" and "but under 2 processes" in cfg.train.recipe_reason


def test_small_images_beyond_the_memory_ceiling_still_get_the_fast_recipe(tmp_path):
    # it reads them from the decoded-image cache batch by batch (tests/test_fast.py)
    data = make_shapes(tmp_path / "shapes", per_class=4, size=32)
    cfg, _, recipe = choose_recipe(RunConfig(data=DataConfig(path=str(data), max_memory_gb=1e-6)))
    assert (recipe.name, cfg.train.recipe_reason) == (
        "fast", "images are 32 px (median side of 12 sampled): fast from-scratch recipe (airbench)")


def test_probe_reads_a_bounded_sample_of_training_headers_spread_over_classes(tmp_path):
    make_shapes(tmp_path / "d" / "train", per_class=50, size=24)
    make_shapes(tmp_path / "d" / "val", per_class=50, size=300)  # not the training images: not probed
    make_shapes(tmp_path / "d" / "train", per_class=10, seed=1, classes=("zigzag",), size=200)
    probe = probe_image_sizes(tmp_path / "d", sample=40)
    assert (probe.median_side, probe.sampled, probe.train_images) == (24, 40, 160)
    assert probe_image_sizes(tmp_path / "missing").median_side is None


def test_fast_recipe_on_train_and_test_folders_keeps_a_small_validation_split(tmp_path):
    """The fast recipe selects nothing on a validation split, so it carves out of train/ only the
    few images calibration and the abstain threshold are fitted on (not the default split's 15%)."""
    for split in ("train", "test"):
        make_shapes(tmp_path / "d" / split, per_class=4, size=32)
    cfg, _, recipe = choose_recipe(RunConfig(data=DataConfig(path=str(tmp_path / "d"))))
    assert recipe.name == "fast" and cfg.data.split == (0.95, 0.05, 0.0)
    assert cfg.train.recipe_reason.endswith("fast from-scratch recipe (airbench), on 95% of train/ (the rest "
                                            "calibrates, test/ judges it)")
    make_shapes(tmp_path / "d" / "val", per_class=2, size=32)  # a validation split given: kept, nothing carved
    cfg, _, _ = choose_recipe(RunConfig(data=DataConfig(path=str(tmp_path / "d"))))
    assert cfg.data.split == DataConfig().split and not cfg.train.recipe_reason.endswith("judges it)")
