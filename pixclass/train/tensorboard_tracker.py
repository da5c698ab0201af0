"""TensorBoard tracking through torch.utils.tensorboard: event files in the run folder's
tensorboard/ (`tensorboard --logdir runs` compares every run). Per epoch the metrics.csv numbers
as scalars, by their column name; at the end the run's figures as images, and the config as
hyperparameters beside the final metrics (the HPARAMS tab)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..config import RunConfig
from ..extras import require
from .tracking import EXTRA, epoch_scalars, figures, final_metrics, flat_config

FOLDER = "tensorboard"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, cfg: RunConfig, run_dir: Path):
        require("tensorboard", EXTRA, "--track tensorboard")  # torch.utils.tensorboard's own import says less
        from torch.utils.tensorboard import SummaryWriter
        self.folder = run_dir / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")

    def log_epoch(self, row: dict) -> None:
        for tag, value in epoch_scalars(row).items():
            self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()  # readable while the run trains

    def finish(self, cfg: RunConfig, summary: dict, run_dir: Path) -> None:
        for path in figures(run_dir):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(path.stem, pixels, dataformats="HWC")
        metrics = final_metrics(summary)
        if metrics:
            # run_name ".": the hyperparameters go beside the scalars, not into a timestamped subfolder
            self.writer.add_hparams(flat_config(cfg), metrics, run_name=".")
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()
