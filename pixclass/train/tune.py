"""`pixclass tune`: hyperparameter search with Optuna over what the recipe's config exposes.

Each trial trains in this process through the run's own code (`run.fit_in_process`: the same
recipe, data preparation and model as `pixclass train`, without a run folder or report), on the
feature cache the transfer recipe keeps, so a trial takes seconds. The TPE sampler (seeded)
proposes the settings; every epoch's validation score is reported to the trial, and the median
pruner stops trials that fall behind. Trials are selected on the final model's validation score
(accuracy; mAP for multi-label data), never on the test split. The study lives in RUN/tune.db
(SQLite: optuna-dashboard opens it), and the best trial's config is RUN/best.yaml, which
`pixclass train --config` reproduces: every trial trains deterministically from the recorded
seed, with nothing left to the budget's plan."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..extras import require
from ..progress import Reporter
from ..runs import claim_folder, claim_new_folder
from .loop import MULTILABEL_MONITOR
from .recipes import choose_recipe, validation_accuracy
from .run import fit_in_process

STUDY_FILE, BEST_FILE = "tune.db", "best.yaml"
# the median pruner judges a trial only after this many trials have finished, and only from
# this epoch on (the first epochs of a good trial are often below the median of finished ones)
PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 5, 2
TUNED_RECIPES = ("transfer", "scratch")


@dataclass
class TuneResult:
    folder: Path
    best_config: Path
    best_value: float
    best_trial: int
    metric: str  # what best_value measures: a name from METRIC_NAMES
    trials: list[dict]  # number, state, value, params, seconds
    seconds: float


def suggest(trial, base: RunConfig) -> RunConfig:
    """`base` with the trial's choices. Rates, regularization (dropout, label smoothing, weight
    decay) and the epochs for every recipe; for transfer learning also how deep to fine-tune (0:
    the head alone), the fine-tuning epochs and the augmented views cached per image (every
    choice reuses the cache: the views are numbered, so 2 views are the first 2 of 4)."""
    train = dict(lr=trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                 weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
                 label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2))
    model = dict(dropout=trial.suggest_float("dropout", 0.0, 0.5))
    if base.train.recipe == "transfer":
        train["head_epochs"] = trial.suggest_int("head_epochs", 2, 20)
        train["feature_views"] = trial.suggest_categorical("feature_views", [0, 2, 4])
        units = trial.suggest_categorical("unfreeze", ["0", "2", "3"])
        if units == "0":
            train.update(freeze=True, epochs=0, unfreeze="auto")
        else:
            train.update(freeze=False, unfreeze=units, epochs=trial.suggest_int("epochs", 1, 3))
    else:
        train["epochs"] = trial.suggest_int("epochs", 3, 15)
    return base.replace("train", **train).replace("model", **model)


def base_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with the recipe and the network resolved as `pixclass train` resolves them, and
    nothing left to the time budget's plan (its choices are what the search decides, and its
    probe of the CPU would make trials differ from the rerun)."""
    cfg, _, recipe = choose_recipe(cfg)
    if recipe.name not in TUNED_RECIPES:
        raise UserError(f"pixclass tune searches the {' and '.join(TUNED_RECIPES)} recipes' settings; the "
                        f"{recipe.name} recipe runs its own fixed schedule (name another with --model or --recipe)")
    # One thread unless the config names more: a trial's small steps on cached features pay
    # OpenMP's synchronisation on every operation, which on a busy CPU costs far more than a second
    # core gains (bench/RESULTS.md). Recorded in best.yaml, so the rerun computes the same numbers.
    return cfg.replace("train", threads=cfg.train.threads or 1)


def tune(cfg: RunConfig, trials: int, budget_minutes: float | None = None, out: Path | None = None,
         reporter: Reporter | None = None) -> TuneResult:
    """Run the study (at most `trials` trials, and no new one after `budget_minutes`)."""
    optuna = require("optuna", "tune", "pixclass tune")
    reporter = reporter or Reporter()
    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials})")
    if budget_minutes is not None and not budget_minutes > 0:
        raise UserError(f"--budget must be a number of minutes above 0 (got {budget_minutes})")
    _check_validation_split(cfg)
    base = base_config(cfg)
    folder = claim_folder(Path(out), STUDY_FILE) if out else \
        claim_new_folder(f"tune-{Path(cfg.data.path).resolve().name}", claim=STUDY_FILE)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="pixclass", storage=f"sqlite:///{folder.path / STUDY_FILE}", direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=base.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                           n_warmup_steps=PRUNER_WARMUP_EPOCHS))
    started = time.perf_counter()
    quiet = Reporter(quiet=True)

    metric = selection_metric(base)

    def objective(trial) -> float:
        trial_cfg = suggest(trial, base)
        planned, result = fit_in_process(trial_cfg, quiet, hooks=[_ReportToTrial(trial, optuna, metric)])
        value = validation_accuracy(result) if metric == "val_accuracy" else \
            max(r[metric] for r in result.history if r.get(metric) is not None)
        trial.set_user_attr("config", json.dumps(planned.to_dict()))
        reporter.info(f"trial {trial.number}: {METRIC_NAMES[metric]} {value:.4f} ({params_text(trial.params)})")
        return value

    with reporter.bar("trials", trials) as bar:
        study.optimize(objective, n_trials=trials, timeout=budget_minutes * 60 if budget_minutes else None,
                       callbacks=[lambda *_: bar.advance(1)])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(f"no trial finished (see {folder.path / STUDY_FILE})")
    best = study.best_trial
    best_path = folder.path / BEST_FILE
    RunConfig.from_dict(json.loads(best.user_attrs["config"])).save_yaml(best_path)
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "seconds": t.duration.total_seconds() if t.duration else None} for t in study.trials]
    return TuneResult(folder.path, best_path, best.value, best.number, metric, rows,
                      round(time.perf_counter() - started, 1))


METRIC_NAMES = {"val_accuracy": "val accuracy", MULTILABEL_MONITOR: "val mAP"}


def selection_metric(cfg: RunConfig) -> str:
    """The history column trials are judged by: validation mAP for multi-label data (what picks a
    multi-label run's checkpoint; its val_accuracy counts right yes/no answers per label, which
    answering "no" everywhere makes high), else validation accuracy."""
    from ..data.scan import is_multilabel_dataset
    return MULTILABEL_MONITOR if is_multilabel_dataset(cfg.data.path) else "val_accuracy"


class _ReportToTrial:
    """A Trainer hook: every epoch's validation score to the trial (step: the run's epoch number,
    counted over its phases); the trial stops (optuna.TrialPruned) when the pruner says."""

    def __init__(self, trial, optuna, metric: str = "val_accuracy"):
        self.trial, self.optuna, self.metric = trial, optuna, metric

    def after_epoch(self, trainer, row: dict, last: bool) -> None:
        if row.get(self.metric) is None:
            return
        self.trial.report(row[self.metric], row["epoch"])
        if self.trial.should_prune():
            raise self.optuna.TrialPruned()


def _check_validation_split(cfg: RunConfig) -> None:
    from ..data.scan import scan_dataset
    scanned = scan_dataset(cfg.data.path, cfg.data.split, cfg.train.seed, cfg.data.manifest)
    if not scanned.split("val"):
        raise UserError(f"pixclass tune selects on the validation split, and {cfg.data.path} has none "
                        f"(give a val fraction with --split, e.g. 0.7,0.15,0.15)")


def params_text(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
