"""How a saved model holds up: accuracy under common corruptions (corruptions.py) at three
severities each, and under FGSM and PGD attacks from the Adversarial Robustness Toolbox
(attacks.py) at several ε in pixel units, on a sample of labelled images. Writes
robustness.json and a self-contained robustness.html (curves, tables, example images with their
predictions)."""

from __future__ import annotations

import html
import json
import random
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from . import plots
from .artifact import Artifact
from .attacks import ATTACKS, PGD_STEPS, PixelSpaceModel, adversarial_examples, art_classifier, predicted, to_pixels
from .corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt
from .data.loaders import load_split
from .errors import UserError
from .evaluate import labelled_files
from .inference import TorchBackend
from .progress import Reporter
from .report import html_page, html_table, img_tag

DEFAULT_LIMIT = 200  # images: a small CNN's report in about a minute on a laptop CPU
DEFAULT_EPS = (1.0, 2.0, 4.0, 8.0)  # in 1/255 pixel steps
EXAMPLES = 4  # images shown clean, corrupted and attacked


def parse_eps(text: str) -> tuple[float, ...]:
    """'1,2,4,8' -> ε values in 1/255 steps."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--eps must be numbers of 1/255 pixel steps like 1,2,4,8 (got {text!r})") from None
    if not values or not all(0 < v <= 255 for v in values):
        raise UserError(f"--eps values must be in (0, 255] (1/255 pixel steps; got {text!r})")
    return tuple(sorted(set(values)))


def check_single_label(art: Artifact) -> None:
    if art.multilabel:  # every figure here is the accuracy of one answer per image, and the attacks aim at it
        raise UserError("robustness measures single-label accuracy; it is not available for a multi-label model")


def sample_images(art: Artifact, data, model_dir=None, limit: int | None = DEFAULT_LIMIT, seed: int = 0,
                  reporter: Reporter | None = None):
    """(uint8 images N x C x H x W, labels N, description, skipped files): the images evaluate
    would use, `limit` of them drawn at random (all classes mixed, the same ones on every run)."""
    check_single_label(art)
    reporter = reporter or Reporter()
    paths, labels, what = labelled_files(data, art, model_dir, reporter)
    if limit and len(paths) > limit:
        keep = sorted(random.Random(seed).sample(range(len(paths)), limit))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        what = f"{limit} images drawn from {what}"
    split, failures = load_split(paths, labels, art.preprocess, reporter, what="decoding")
    images, kept = zip(*[(x, y) for x, y, _ in split.batches(256)]) if len(split) else ((), ())
    if not images:
        raise UserError(f"no readable images in {data}")
    return torch.cat(images), torch.cat(kept).numpy(), what, [str(p) for p, _ in failures]


def measure(art: Artifact, images: torch.Tensor, labels: np.ndarray, eps_255=DEFAULT_EPS, steps: int = PGD_STEPS,
            seed: int = 0, reporter: Reporter | None = None) -> tuple[dict, dict]:
    """(results, examples): accuracies clean, per corruption and severity, per attack and ε; and
    the first EXAMPLES images under each (name -> (uint8 images, probabilities))."""
    reporter = reporter or Reporter()
    backend = TorchBackend.from_artifact(art)
    n = len(labels)

    def probabilities(batch: torch.Tensor) -> np.ndarray:
        return np.concatenate([backend.probabilities_uint8(batch[i:i + 256]) for i in range(0, len(batch), 256)])

    def accuracy(probs: np.ndarray) -> float:
        return float((probs.argmax(1) == labels).mean())

    clean = probabilities(images)
    examples = {"clean": (images[:EXAMPLES], clean[:EXAMPLES])}
    results = {"clean_accuracy": accuracy(clean), "corruptions": {}, "attacks": {}}
    with reporter.bar("corruptions", len(CORRUPTIONS) * len(SEVERITIES) * n) as bar:
        for name in CORRUPTIONS:
            values, meaning = PARAMETERS[name]
            rows = []
            for severity in SEVERITIES:
                corrupted = corrupt(images, name, severity, seed)
                probs = probabilities(corrupted)
                rows.append({"severity": severity, "value": values[severity - 1], "accuracy": accuracy(probs)})
                if severity == 2:
                    examples[f"{name} {severity}"] = (corrupted[:EXAMPLES], probs[:EXAMPLES])
                bar.advance(n)
            results["corruptions"][name] = {"parameter": meaning, "severities": rows}
    results["mean_corruption_accuracy"] = float(np.mean([r["accuracy"] for c in results["corruptions"].values()
                                                         for r in c["severities"]]))
    classifier = art_classifier(backend.model, art.preprocess, len(art.classes), art.tta)
    pixel_model = PixelSpaceModel(backend.model, art.preprocess, art.tta)
    pixels = to_pixels(images)
    np.random.seed(seed)  # ART draws PGD's random starts from NumPy's global generator
    for name in ATTACKS:
        rows = []
        with reporter.bar(f"{name} attack, ε {', '.join(f'{e:g}' for e in eps_255)}/255", len(eps_255) * n) as bar:
            for e in eps_255:
                attacked = adversarial_examples(classifier, name, e / 255, pixels, labels, steps, bar.advance)
                probs = predicted(pixel_model, attacked)
                rows.append({"eps": e / 255, "eps_255": e, "accuracy": accuracy(probs)})
            examples[f"{name} {e:g}/255"] = (torch.from_numpy(attacked[:EXAMPLES] * 255).round().to(torch.uint8),
                                             probs[:EXAMPLES])
        results["attacks"][name] = rows
    results["settings"] = {"norm": "Linf", "space": "pixels in [0, 1], before the model's standardization",
                           "fgsm": "one step of ε", "pgd": f"{steps} steps of ε/4 from a random start in the ε-ball",
                           "attacked_labels": "the true labels", "seed": seed,
                           "library": f"adversarial-robustness-toolbox {version('adversarial-robustness-toolbox')}",
                           "corruption_severities": {k: list(v[0]) for k, v in PARAMETERS.items()}}
    return results, examples


def run_robustness(art: Artifact, data, out, model_dir=None, limit: int | None = DEFAULT_LIMIT, eps_255=DEFAULT_EPS,
                   steps: int = PGD_STEPS, seed: int = 0, reporter: Reporter | None = None) -> dict:
    """Measure on `data` and write robustness.json and robustness.html in `out`."""
    reporter = reporter or Reporter()
    images, labels, what, skipped = sample_images(art, data, model_dir, limit, seed, reporter)
    reporter.info(f"robustness of {art.arch['name']} on {what} ({len(labels)} images)")
    results, examples = measure(art, images, labels, eps_255, steps, seed, reporter)
    results = {"model": str(model_dir) if model_dir else art.arch["name"], "arch": art.arch["name"],
               "evaluated_on": what, "images": int(len(labels)), "skipped_files": skipped, **results}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(results, indent=2))
    write_html(out, results, examples, labels[:EXAMPLES], art.classes)
    results["out"], results["report"] = str(out), str(out / "robustness.html")
    return results


def _example_gallery(examples: dict, labels: np.ndarray, classes: list[str], path: Path) -> Path:
    """One row per image: clean, each corruption at severity 2, each attack at the largest ε."""
    items = []
    for i in range(len(examples["clean"][0])):
        for name, (batch, probs) in examples.items():
            rgb = batch[i].permute(1, 2, 0).numpy().astype(np.float32) / 255
            if rgb.shape[2] == 1:
                rgb = np.repeat(rgb, 3, axis=2)
            guess = int(probs[i].argmax())
            mark = "ok" if guess == labels[i] else "WRONG"
            caption = f"{name}\n{classes[guess]} {probs[i][guess]:.2f} {mark}"
            if name == "clean":
                caption += f"\ntrue {classes[labels[i]]}"
            items.append((rgb, caption))
    return plots.image_gallery(items, path, cols=len(examples))


def write_html(out: Path, results: dict, examples: dict, labels: np.ndarray, classes: list[str]) -> Path:
    curves = plots.robustness_curves(results, out / "robustness_curves.png")
    gallery = _example_gallery(examples, labels, classes, out / "robustness_examples.png")
    settings = results["settings"]
    summary = html_table([["model", results["model"]], ["evaluated on", results["evaluated_on"]],
                          ["clean accuracy", f"{results['clean_accuracy']:.4f}"],
                          ["mean accuracy over the corruptions", f"{results['mean_corruption_accuracy']:.4f}"]] +
                         [[f"{name.upper()} ε={r['eps_255']:g}/255", f"{r['accuracy']:.4f}"]
                          for name, rows in results["attacks"].items() for r in rows], ["", ""])
    corruption_rows = [[name, c["parameter"]] + [f"{r['value']:g}: {r['accuracy']:.4f}" for r in c["severities"]]
                       for name, c in results["corruptions"].items()]
    corruptions = html_table(corruption_rows, ["corruption", "parameter"] + [f"severity {s}" for s in SEVERITIES])
    attack_rows = [[name.upper(), f"{r['eps_255']:g}/255", f"{r['accuracy']:.4f}"]
                   for name, rows in results["attacks"].items() for r in rows]
    attacks = html_table(attack_rows, ["attack", "ε", "accuracy"]) + \
        f"<p>{html.escape('; '.join(f'{k}: {v}' for k, v in settings.items() if isinstance(v, (str, int))))}</p>"
    sections = {"summary": ("Summary", summary), "curves": ("Accuracy under corruption and attack", img_tag(curves)),
                "corruptions": ("Common corruptions", corruptions), "attacks": ("Adversarial attacks", attacks),
                "examples": ("Examples (prediction, probability, right or wrong)", img_tag(gallery))}
    body = "".join(f'<section id="{k}"><h2>{title}</h2>{content}</section>' for k, (title, content) in sections.items())
    path = out / "robustness.html"
    path.write_text(html_page(f"robustness of {results['model']}", body))
    return path
