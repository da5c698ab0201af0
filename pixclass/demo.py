"""`pixclass demo`: the whole path on data that ships with scikit-learn, in about a minute."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from .config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import UserError
from .progress import Reporter, console


def run_demo(out: Path, epochs: int = 15, quiet: bool = False) -> dict:
    from .data.builtin import write_digits
    from .data.scan import read_manifest
    from .predict import Predictor
    from .train.run import run_training

    reporter = Reporter(quiet)
    out = Path(out)
    if out.exists() and not _is_earlier_demo_run(out, out.parent / f"{out.name}-digits"):
        raise UserError(f"--out {out} exists and is not an earlier demo run; give a new folder")
    data_dir = write_digits(out.parent / f"{out.name}-digits")
    reporter.info(f"wrote scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) to {data_dir}")
    # Digits must not be mirrored or turned far, so the demo trains without augmentation; the
    # 8x8 images are enlarged to 32x32, the smallest size the classic CNN's three conv blocks accept.
    cfg = RunConfig(data=DataConfig(path=str(data_dir), image_size=32, channels=1), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"), train=TrainConfig(epochs=epochs, batch_size=32, seed=0))
    if out.exists():  # an earlier demo run (checked above): the demo replaces its own
        shutil.rmtree(out)
    summary = run_training(cfg, out=out, reporter=reporter)
    m = summary["metrics"]
    console.print(f"\n[bold]test accuracy {m['accuracy']:.4f}[/bold] on {m['n']} held-out digits")
    console.print(f"run folder: {summary['run_dir']}  (config, split manifest, metrics.csv, curves.png)", markup=False)
    console.print(f"report: {Path(summary['run_dir']) / 'evaluation'}  (metrics.json, per_class.csv, confusion matrix)", markup=False)
    console.print(f"model: {summary['model_dir']}", markup=False)
    predictor = Predictor.load(summary["model_dir"])
    held_out = read_manifest(Path(summary["run_dir"]) / "manifest.csv", data_dir)
    files = [p for p, (_, split) in sorted(held_out.items()) if split == "test"][::40][:6]
    results, _ = predictor.predict_files(files, k=2)
    console.print("a few predictions on held-out test images:")
    for r in results:
        best = r["top_k"][0]
        truth = held_out[Path(r["path"])][0]
        console.print(f"  {r['path']}: {best['class']} ({best['probability']:.3f}), true class {truth}", markup=False)
    console.print(f"try: pixclass predict {summary['model_dir']} {data_dir}/5", markup=False)
    return summary


def _is_earlier_demo_run(out: Path, data_dir: Path) -> bool:
    """Whether `out` is a run folder the demo wrote: its config.yaml trained on the demo's digits."""
    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
        return Path(config["data"]["path"]).resolve() == Path(data_dir).resolve()
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return False
