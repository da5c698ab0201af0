"""The time budget: the transfer recipe's plan, the deadline every phase keeps, and the record of
both in the run folder."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import needs_hymenoptera, run_cli
from pixclass.config import RunConfig, TrainConfig
from pixclass.train import budget as b


def fixed_speeds(lite0_rate: float):
    return lambda name: b.speeds_from_probe(lite0_rate, name)


def rank(plan: b.TransferPlan) -> tuple[int, int]:
    """Lower is more ambitious: (backbone's place, rung's place)."""
    return b.BACKBONES.index(plan.backbone), b.LADDER.index((plan.unfreeze, plan.feature_views, plan.epochs))


def test_a_longer_budget_never_plans_less():
    for n_train, n_eval in ((245, 153), (973, 489), (2934, 736), (20000, 5000)):
        ranks = [rank(b.plan_transfer(n_train, n_eval, minutes * 60, fixed_speeds(60.0)))
                 for minutes in (0.5, 1, 2, 3, 5, 10, 20, 60)]
        assert ranks == sorted(ranks, reverse=True), (n_train, ranks)


def test_the_plan_fits_its_budget_unless_nothing_can():
    for n_train in (100, 1000, 3000, 10000):
        for minutes in (1, 2, 5, 10):
            plan = b.plan_transfer(n_train, n_train // 4, minutes * 60, fixed_speeds(60.0))
            total = sum(plan.estimate_s.values())
            lowest = (plan.backbone, (plan.unfreeze, plan.feature_views, plan.epochs)) == (b.BACKBONES[-1], b.LADDER[-1])
            assert total <= minutes * 60 or lowest, (n_train, minutes, plan)


def test_a_small_dataset_stops_at_the_top_rung_well_inside_a_large_budget():
    plan = b.plan_transfer(245, 153, 60 * 60, fixed_speeds(60.0))
    assert rank(plan) == (0, 0)
    assert sum(plan.estimate_s.values()) < 0.2 * 3600


def test_a_slow_cpu_or_a_large_dataset_gets_a_smaller_backbone_and_a_lower_rung():
    fast = b.plan_transfer(3000, 700, 300, fixed_speeds(60.0))
    slow = b.plan_transfer(3000, 700, 300, fixed_speeds(10.0))
    assert rank(slow) > rank(fast)
    assert slow.backbone == "efficientnet_lite0"


def test_the_deadline_stops_a_phase_after_the_epoch_that_reached_it():
    from pixclass.data.loaders import SplitData
    from pixclass.progress import Reporter
    from pixclass.train.loop import Trainer
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8), torch.randint(0, 2, (64,))
    split = SplitData(x, y, [f"f{i}" for i in range(64)])
    model = torch.nn.Linear(8, 2)
    cfg = TrainConfig(epochs=50, batch_size=16)
    inputs = lambda features, generator: features[:, 0]  # noqa: E731
    past = Trainer(model, split, split, cfg, inputs, Reporter(quiet=True), deadline=time.perf_counter() - 1)
    past.fit()
    assert len(past.history) == 1
    unlimited = Trainer(torch.nn.Linear(8, 2), split, split, TrainConfig(epochs=3, batch_size=16), inputs,
                        Reporter(quiet=True), deadline=None)
    unlimited.fit()
    assert len(unlimited.history) == 3


@pytest.mark.parametrize("value", ["0", "-1", "abc", "100000"])
def test_a_bad_budget_is_one_line(tmp_path, value):
    proc = run_cli("train", tmp_path, "--budget", value)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:") and "budget" in proc.stderr


@needs_hymenoptera
def test_the_plan_is_recorded_and_rerun_as_planned(ants_bees_small, tmp_path):
    """The run plans for its budget, says so, writes its choices into config.yaml and the report,
    and --config of that run plans nothing again: the same choices."""
    out = tmp_path / "run"
    proc = run_cli("train", ants_bees_small, "--model", "efficientnet_lite0", "--budget", "1", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "plan: 1 min budget: efficientnet_lite0" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["train_seconds"] <= 60
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["plan"].startswith("1 min budget")
    assert saved["train"]["feature_views"] is not None and saved["train"]["unfreeze"].isdigit()
    assert saved["train"]["epochs"] is not None
    report = (out / "report.html").read_text()
    assert "time budget" in report and "time per phase" in report and "features" in report

    from pixclass.progress import Reporter
    from pixclass.train.recipes import choose_recipe
    rerun = RunConfig.load_yaml(out / "config.yaml")
    rerun, _, recipe = choose_recipe(rerun)
    from pixclass.data.scan import scan_dataset
    scanned = scan_dataset(str(ants_bees_small), rerun.data.split, 0, None)
    again = recipe.plan(rerun, scanned, b.Budget(1), False, Reporter(quiet=True))
    assert again.to_dict() == rerun.to_dict()


def test_a_resolved_plan_survives_the_config_file(tmp_path):
    cfg = RunConfig().replace("train", budget=2.5, plan="2.5 min budget: x", feature_views=4, unfreeze="3", epochs=5)
    cfg.save_yaml(tmp_path / "c.yaml")
    back = RunConfig.load_yaml(Path(tmp_path / "c.yaml"))
    assert (back.train.budget, back.train.feature_views, back.train.unfreeze, back.train.epochs) == (2.5, 4, "3", 5)


def test_the_fast_schedule_keeps_what_fits():
    from pixclass.train.recipes.fast import evaluation_seconds, steps_that_fit
    assert steps_that_fit(10, 100, step_s=6, left_s=10_000) == 100  # all of it
    assert steps_that_fit(10, 100, step_s=6, left_s=300) == 60  # 10 done + 50 that fit
    assert steps_that_fit(30, 100, step_s=6, left_s=-5) == 30  # out of time: stop now
    # the evaluation after training is paid for first: more held-out images, fewer steps
    assert evaluation_seconds(30_000, 500, rate=500) > evaluation_seconds(1000, 500, rate=500) > 10
    # the bank holds at most DEFAULT_BANK_SIZE training images
    assert evaluation_seconds(0, 10**6, rate=500) == evaluation_seconds(0, 4096, rate=500)


def test_the_fast_recipe_shortens_its_schedule_to_the_budget(tmp_path):
    from conftest import make_shapes
    data = make_shapes(tmp_path / "shapes", per_class=40)
    out = tmp_path / "r"
    proc = run_cli("train", data, "--recipe", "fast", "--image-size", "32", "--budget", "0.01", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "the schedule shortened to 2 of 20 steps" in proc.stderr
    assert len(json.loads(proc.stdout)["history"]) == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["max_steps"] == 2
    assert saved["train"]["plan"].startswith("0.01 min budget: 2 of the schedule's 20 steps")


def test_a_budget_can_stop_the_fast_recipe_inside_its_first_epoch_and_the_config_reruns_the_cut(tmp_path):
    """A budget shorter than one epoch (CIFAR-10 under --budget 2 on a slow CPU) stops mid-epoch,
    and --config trains the same steps again without a budget check."""
    from conftest import make_shapes
    data = make_shapes(tmp_path / "shapes", per_class=200)  # 13 steps an epoch
    out = tmp_path / "r"
    proc = run_cli("train", data, "--recipe", "fast", "--image-size", "32", "--budget", "0.001", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)["history"]
    assert len(first) == 1 and first[0]["step"] < 13, first
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["epochs"], saved["train"]["max_steps"]) == (1, first[0]["step"])
    again = run_cli("train", data, "--config", out / "config.yaml", "--out", tmp_path / "again", "--json")
    assert again.returncode == 0, again.stderr
    assert [row["step"] for row in json.loads(again.stdout)["history"]] == [first[0]["step"]]
    # naming --epochs drops the recorded cut
    longer = run_cli("train", data, "--config", out / "config.yaml", "--epochs", "2", "--out", tmp_path / "two",
                     "--json")
    assert [row["step"] for row in json.loads(longer.stdout)["history"]] == [13, 26]


def test_a_depth_the_ladder_does_not_have_is_priced_deeper_than_its_deepest():
    """A user's --unfreeze 7 is planned (epochs, views) like any rung, and costs more per epoch."""
    deep = b.plan_transfer(500, 100, 3600, fixed_speeds(60.0), ["efficientnet_lite0"], ((7, 0, 3),))
    ladder_deepest = b.plan_transfer(500, 100, 3600, fixed_speeds(60.0), ["efficientnet_lite0"], ((4, 0, 3),))
    assert deep.unfreeze == 7 and deep.estimate_s["fine-tuning"] > ladder_deepest.estimate_s["fine-tuning"]
