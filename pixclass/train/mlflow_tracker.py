"""MLflow tracking: one MLflow run per training run, in the tracking store MLFLOW_TRACKING_URI
names (else mlflow's own default, sqlite:///mlflow.db in the working directory) and the
experiment MLFLOW_EXPERIMENT_NAME names (else the default one). It holds the resolved config as
params ("train.lr"...), the metrics.csv numbers per epoch (step = epoch), the final metrics
("test/accuracy"...), the run folder's files as artifacts under run/ (all but checkpoints and
TensorBoard's events), and the model as an MLflow pyfunc model named "model" (mlflow_model.py:
image paths in, class names out)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from ..config import RunConfig
from ..extras import captured_output, require
from .tensorboard_tracker import FOLDER as TENSORBOARD_FOLDER
from .tracking import EXTRA, epoch_scalars, final_metrics, flat_config

RUN_ID_FILE = "mlflow_run_id.txt"  # a resumed run continues its MLflow run
NOT_LOGGED = {"checkpoints", TENSORBOARD_FOLDER}  # resume state and another tracker's files
MODEL_NAME = "model"
# a tracking server out of reach holds the run for one retry (mlflow's default of 7 retries with
# growing waits is minutes) before the tracker is dropped; a value set by the user stands
RETRIES = "2"


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, resumed: bool):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", RETRIES)
        self.mlflow = mlflow = require("mlflow", EXTRA, "--track mlflow")
        previous = run_dir / RUN_ID_FILE
        run_id = previous.read_text().strip() if resumed and previous.is_file() else None
        with captured_output():  # mlflow's logs (creating its database...) are noise among the run's lines
            self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name,
                                        nested=mlflow.active_run() is not None,  # inside a caller's own run
                                        tags={"pixclass.run_dir": str(run_dir.resolve())})
            if run_id is None:
                mlflow.log_params(flat_config(cfg))
        previous.write_text(self.run.info.run_id + "\n")

    def log_epoch(self, row: dict) -> None:
        self.mlflow.log_metrics(epoch_scalars(row), step=int(row["epoch"]), run_id=self.run.info.run_id)

    def finish(self, cfg: RunConfig, summary: dict, run_dir: Path) -> None:
        mlflow, run_id = self.mlflow, self.run.info.run_id
        with captured_output():
            mlflow.log_metrics(final_metrics(summary), run_id=run_id)
            for entry in sorted(run_dir.iterdir()):
                if entry.name in NOT_LOGGED:
                    continue
                if entry.is_dir():
                    mlflow.log_artifacts(str(entry), artifact_path=f"run/{entry.name}", run_id=run_id)
                else:
                    mlflow.log_artifact(str(entry), artifact_path="run", run_id=run_id)
            # logged "from code" (the file travels with the model and is run when it loads): no pickle
            from .. import mlflow_model
            mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=mlflow_model.__file__,
                                    artifacts={mlflow_model.MODEL_DIR_ARTIFACT: str(summary["model_dir"])},
                                    pip_requirements=[f"pixclass=={__version__}"])  # not inferred: seconds

    def close(self, failed: bool) -> None:
        with captured_output():
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
