"""`pixclass demo`: the whole path on data that ships with scikit-learn, in about a minute."""

from __future__ import annotations

from pathlib import Path

from .config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from .progress import Reporter, console


def run_demo(out: Path, epochs: int = 15, quiet: bool = False) -> dict:
    from .data.builtin import write_digits
    from .data.scan import read_manifest
    from .predict import Predictor
    from .train.run import run_training

    reporter = Reporter(quiet)
    out = Path(out)
    data_dir = write_digits(out.parent / f"{out.name}-digits")
    reporter.info(f"wrote scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) to {data_dir}")
    # Digits must not be mirrored or turned far, so the demo trains without augmentation; the
    # 8x8 images are enlarged to 32x32, the smallest size the classic CNN's three conv blocks accept.
    cfg = RunConfig(data=DataConfig(path=str(data_dir), image_size=32, channels=1), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"), train=TrainConfig(epochs=epochs, batch_size=32, seed=0))
    if out.exists():
        import shutil
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
