"""Model quality on the dev datasets (issue 17): for each dataset, in one run and one after the
other (never concurrently: the timings matter on 2 cores),
  default  `pixclass train DATA --seed S --out RUN`, a cold first run (a fresh PIXCLASS_CACHE_DIR);
  budget   the same with `--budget B` for each B of --budgets;
  peer     ../shared/peers/seed_transfer.py ROOT 3 (the guide's recipe, 3 epochs; unseeded, run once
           per seed; its best epoch and its last are both kept);
  probe    bench/linear_probe.py: logistic regression on the frozen EfficientNet-Lite0 features
           (deterministic, so run once per dataset).
Accuracy and macro-F1 on the held-out split (val/ for train/+val/ sets, test/ for train/+test/),
mean ± std over the seeds, mean wall time of the whole command, and each row against the peer's
best epoch: accuracy difference in points, error ratio, time ratio. A variant that fails is
reported as "failed: <its error line>" and the run goes on.

usage: python bench/quality.py [--datasets hymenoptera,gtsrb10] [--seeds 3] [--variants default,probe]
       [--budgets 10] [--data-dir DIR] [--work DIR] [--markdown FILE] [--json FILE] [--timeout S]"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, extract, pixclass_cmd, result_fields  # noqa: E402

DATASETS = ("hymenoptera", "cifar10", "gtsrb10", "caltech12", "cxr-pneumonia")
VARIANTS = ("default", "budget", "peer", "probe")
PEER_EPOCHS = 3
PEER = SHARED / "peers" / "seed_transfer.py"
LINEAR_PROBE = Path(__file__).resolve().parent / "linear_probe.py"


@dataclass
class Finished:
    ok: bool
    wall_s: float
    stdout: str
    stderr: str
    error: str | None = None


def run_timed(cmd: list, env: dict | None = None, timeout: float | None = None) -> Finished:
    """Wall time of a whole command (start-up included). Never raises for the command's own
    failure: it comes back as `error`, one line, so the bench can report it and go on."""
    start = time.perf_counter()
    # a session of its own, so a timeout stops the command's worker processes too
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Finished(False, time.perf_counter() - start, out, err, f"timed out after {timeout:.0f} s")
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return Finished(False, elapsed, out, err, error_line(err) or f"exit code {proc.returncode}")
    return Finished(True, elapsed, out, err)


def error_line(stderr: str) -> str | None:
    """pixclass's one `error: ...` line (warnings may come before it), else the first line; for a
    traceback its last line, which names the exception."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return None
    marked = [line for line in lines if line.lower().startswith("error")]
    if marked:
        return marked[0]
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


# --- data ------------------------------------------------------------------------------------


def dataset_root(name: str, data_dir: Path) -> Path:
    """DATA_DIR/NAME as it is when it already holds train/ (an extracted copy), else extracted
    there from ../shared/datasets (cifar10 comes from cifar10-jpg.tar.gz)."""
    root = data_dir / name
    if (root / "train").is_dir():
        return root
    archives = sorted((SHARED / "datasets").glob(f"{name}*.tar.gz"))
    if not archives:
        raise SystemExit(f"no archive for dataset {name!r} in {SHARED / 'datasets'}")
    extract(archives[0], data_dir)
    if not (root / "train").is_dir():
        raise SystemExit(f"{archives[0].name} did not give {root}/train")
    return root


def held_out_split(root: Path) -> str:
    return "val" if (root / "val").is_dir() else "test"


def peer_layout(root: Path, work: Path) -> Path:
    """The peer reads ROOT/train and ROOT/val only: a train/+test/ set is given to it through
    links (its test/ as val/), so it is scored on the same images as pixclass."""
    if held_out_split(root) == "val":
        return root
    layout = work / f"{root.name}-test-as-val"
    layout.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", "train"), ("val", "test")):
        if not (layout / name).exists():
            (layout / name).symlink_to((root / target).resolve())
    return layout


# --- one measurement per call ------------------------------------------------------------------


def measure_pixclass(root: Path, seed: int, extra: list, runs: Path, label: str, timeout) -> dict:
    out = runs / f"{root.name}-{label}-seed{seed}"
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=runs))  # cold: no feature cache from any earlier run
    try:
        done = run_timed(pixclass_cmd("train", root, "--seed", seed, "--out", out, *extra),
                         env={"PIXCLASS_CACHE_DIR": str(cache)}, timeout=timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    record = {"seed": seed, "wall_s": round(done.wall_s, 2), "run_dir": str(out), "ok": done.ok}
    if not done.ok:
        return {**record, "error": done.error}
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    expected = held_out_split(root)
    if metrics.get("split") != expected:
        return {**record, "ok": False, "error": f"scored on {metrics.get('split')}, not on the held-out {expected}"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    epochs = max(0, len((out / "metrics.csv").read_text().strip().splitlines()) - 1)
    return {**record, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "split": metrics["split"],
            "n": metrics["n"], "recipe": config["train"].get("recipe"), "model": config["model"].get("name"),
            "epochs": epochs}


def measure_peer(root: Path, seed: int, work: Path, timeout) -> dict:
    done = run_timed([sys.executable, PEER, peer_layout(root, work), PEER_EPOCHS], timeout=timeout)
    record = {"seed": seed, "wall_s": round(done.wall_s, 2), "ok": done.ok}
    if done.ok and "RESULT" not in done.stdout:
        done.ok, done.error = False, "no RESULT line"
    if not done.ok:
        return {**record, "error": done.error}
    epochs = [{"epoch": int(e), "val_acc": float(a), "elapsed_s": float(s)}
              for e, a, s in re.findall(r"epoch (\d+) val_acc=([\d.]+) elapsed_s=([\d.]+)", done.stdout)]
    result = result_fields(done.stdout)
    best = max(epochs, key=lambda e: e["val_acc"]) if epochs else None
    # the peer prints no macro-F1: it is left out rather than guessed
    return {**record, "accuracy": float(result["val_acc"]), "best_accuracy": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None, "epochs": epochs, "total_s": float(result["total_s"])}


def measure_probe(root: Path, timeout) -> dict:
    done = run_timed([sys.executable, LINEAR_PROBE, root], timeout=timeout)
    record = {"seed": None, "wall_s": round(done.wall_s, 2), "ok": done.ok}
    if not done.ok:
        return {**record, "error": done.error}
    return {**record, **json.loads(done.stdout.strip().splitlines()[-1])}


# --- summary and tables ------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[dict], accuracy_key: str = "accuracy") -> dict:
    ok = [r for r in records if r["ok"] and r.get(accuracy_key) is not None]
    errors = [("" if r["seed"] is None else f"seed {r['seed']}: ") + f"failed: {r['error']}"
              for r in records if not r["ok"]]
    summary = {"runs": len(records), "ok": len(ok), "errors": errors}
    if ok:
        summary["accuracy"] = mean_std([r[accuracy_key] for r in ok])
        f1 = [r["macro_f1"] for r in ok if r.get("macro_f1") is not None]
        summary["macro_f1"] = mean_std(f1) if len(f1) == len(ok) else None
        summary["wall_s"] = statistics.mean(r["wall_s"] for r in ok)
    return summary


def fmt_mean_std(value) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def against_peer(row: dict, peer: dict | None) -> list[str]:
    """Accuracy difference in points, error ratio and time ratio against the peer's best epoch."""
    if not peer or "accuracy" not in peer or "accuracy" not in row:
        return ["—", "—", "—"]
    acc, peer_acc = row["accuracy"][0], peer["accuracy"][0]
    errors = f"x{(1 - acc) / (1 - peer_acc):.2f}" if peer_acc < 1 else "— (peer makes no error)"
    return [f"{100 * (acc - peer_acc):+.2f}", errors, f"x{row['wall_s'] / peer['wall_s']:.2f}"]


def dataset_rows(records: dict[str, list[dict]], budgets: list[str]) -> list[tuple[str, dict]]:
    """(row label, summary) for each variant measured on one dataset, in table order."""
    rows = []
    if "default" in records:
        rows.append(("pixclass default", summarize(records["default"])))
    for budget in budgets:
        if f"budget-{budget}" in records:
            rows.append((f"pixclass --budget {budget}", summarize(records[f"budget-{budget}"])))
    if "peer" in records:
        rows.append((f"peer seed_transfer, {PEER_EPOCHS} epochs: last", summarize(records["peer"])))
        rows.append((f"peer seed_transfer, {PEER_EPOCHS} epochs: best epoch",
                     summarize(records["peer"], "best_accuracy")))
    if "probe" in records:
        rows.append(("linear probe (frozen Lite0 features, deterministic)", summarize(records["probe"])))
    return rows


TABLE_HEADER = ("| variant | runs ok | accuracy | macro-F1 | wall s (mean) | Δ acc vs peer best (pts) "
                "| errors / peer's | time / peer's |")


def markdown_table(name: str, info: dict, budgets: list[str]) -> str:
    rows = dataset_rows(info["records"], budgets)
    peer = next((s for label, s in rows if label.endswith("best epoch")), None)
    size = f", {info['n']} images" if info.get("n") else ""
    lines = [f"### {name} (held-out: {info['held_out']}{size})", "", TABLE_HEADER, "| --- |" + " ---: |" * 7]
    notes = []
    for label, s in rows:
        if "accuracy" not in s:
            failure = s["errors"][0][s["errors"][0].index("failed: "):] if s["errors"] else "no result"
            lines.append(f"| {label} | 0/{s['runs']} | {escape(failure)} | | | | | |")
            continue
        ratios = ["—", "—", "—"] if s is peer else against_peer(s, peer)
        cells = [label, f"{s['ok']}/{s['runs']}", fmt_mean_std(s["accuracy"]), fmt_mean_std(s["macro_f1"]),
                 f"{s['wall_s']:.1f}", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
        if not label.endswith("best epoch"):  # the peer's errors are listed once, under its last-epoch row
            notes += [f"- {label}, {e}" for e in s["errors"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def escape(text: str) -> str:
    return text.replace("|", "\\|")


# --- the run -----------------------------------------------------------------------------------


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor()


def machine() -> dict:
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=False, capture_output=True,
                         text=True)
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "timm": importlib.metadata.version("timm"), "pixclass_commit": git.stdout.strip() or None}


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=comma_list, default=list(DATASETS), help=f"default: {','.join(DATASETS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--variants", type=comma_list, default=list(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--budgets", type=comma_list, default=["10"],
                        help="minutes, one budget variant each (default 10)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the datasets are (NAME/train/...) or get extracted (default: a temp dir)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run folders (default: a temp dir)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--json", type=Path, default=None, help="write every raw measurement to this file")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one command may take (default: no limit)")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        parser.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})" if unknown
                     else "--seeds must be >= 1")
    for budget in args.budgets:
        try:
            float(budget)
        except ValueError:
            parser.error(f"--budgets takes minutes, not {budget!r}")
    return args


def write_json(path: Path | None, document: dict) -> None:
    """Rewritten after every measurement, so an interrupted run keeps what it measured."""
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2))
    tmp.replace(path)


def measure_dataset(root: Path, args, runs: Path, record) -> None:
    """Every asked variant on one dataset; seeds outermost, so a slow drift of the shared machine
    spreads over all variants instead of landing on one."""
    for seed in range(args.seeds):
        if "default" in args.variants:
            record("default", measure_pixclass(root, seed, [], runs, "default", args.timeout))
        if "budget" in args.variants:
            for budget in args.budgets:
                result = measure_pixclass(root, seed, ["--budget", budget], runs, f"budget{budget}", args.timeout)
                record(f"budget-{budget}", result)
        if "peer" in args.variants:
            record("peer", measure_peer(root, seed, runs, args.timeout))
    if "probe" in args.variants:
        record("probe", measure_probe(root, args.timeout))


def progress_line(dataset: str, variant: str, r: dict) -> str:
    head = f"{dataset} {variant}" + (f" seed {r['seed']}" if r["seed"] is not None else "")
    if not r["ok"]:
        return f"{head}: failed: {r['error']} ({r['wall_s']:.1f} s)"
    best = f" (best epoch {r['best_epoch']}: {r['best_accuracy']:.4f})" if r.get("best_epoch") else ""
    f1 = f", macro-F1 {r['macro_f1']:.4f}" if r.get("macro_f1") is not None else ""
    return f"{head}: accuracy {r['accuracy']:.4f}{best}{f1}, {r['wall_s']:.1f} s"


def main() -> None:
    args = parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="pixclass-quality-data-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="pixclass-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # new each time: pixclass never reuses a run folder
    document = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
                "machine": machine(), "seeds": args.seeds, "budgets": args.budgets, "peer_epochs": PEER_EPOCHS,
                "datasets": {}}
    roots = {name: dataset_root(name, data_dir) for name in args.datasets}  # a wrong name stops it before any run
    print(f"runs in {runs}", flush=True)
    for name, root in roots.items():
        info = document["datasets"][name] = {"root": str(root), "held_out": held_out_split(root), "records": {}}

        def record(variant: str, result: dict, name=name, info=info) -> None:
            info["records"].setdefault(variant, []).append(result)
            info["n"] = info.get("n") or result.get("n")
            print(progress_line(name, variant, result), flush=True)
            write_json(args.json, document)

        measure_dataset(root, args, runs, record)
        print("\n" + markdown_table(name, info, args.budgets) + "\n", flush=True)
    document["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(args.json, document)
    m = document["machine"]
    header = (f"Machine: {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}; pixclass {m['pixclass_commit']}; "
              f"{args.seeds} seed(s); started {document['started']}, finished {document['finished']}.")
    tables = [header, "Ratios are against the peer's best epoch (errors: pixclass's error rate / the peer's).", ""]
    tables += [markdown_table(name, info, args.budgets) + "\n" for name, info in document["datasets"].items()]
    markdown = "\n".join(tables)
    if args.markdown:  # the file first: it is what is kept if printing the tables fails
        args.markdown.write_text(markdown)
    print("=" * 80 + "\n" + markdown)


if __name__ == "__main__":
    main()
