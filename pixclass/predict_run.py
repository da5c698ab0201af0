"""`pixclass predict ... --out FILE`: any number of files streamed through a Predictor into a
file, continued after a crash with `resume`, split across the ranks of a torchrun launch.

The output is in the order of the file list (inputs as given, folders sorted), whatever happened:
one process appends batches in that order, and a resumed run appends the files the killed one had
not reached, so kill + resume writes what one uninterrupted run writes. Ranks take contiguous runs
of whole batches (so every image is predicted in the same batch as by one process), write part
files beside the output, and rank 0 merges the parts in list order. Parts are read and merged
through the file system: under a multi-node launch the output's folder must be shared."""

from __future__ import annotations

import time
from pathlib import Path

from .data.loaders import default_workers
from .errors import UserError
from .predict import Predictor
from .prediction_files import existing_parts, output_format, part_path
from .progress import Reporter
from .ranks import Ranks


def unique_in_order(files: list[Path]) -> list[Path]:
    """Each file once (a file named twice, or reached through two folders, is predicted once)."""
    seen, kept = set(), []
    for f in files:
        if str(f) not in seen:
            seen.add(str(f))
            kept.append(f)
    return kept


def batch_aligned_shard(n: int, batch_size: int, ranks: Ranks) -> slice:
    """This rank's slice of n files: a contiguous run of whole batches."""
    batches = ranks.shard(-(-n // batch_size))
    return slice(batches.start * batch_size, min(n, batches.stop * batch_size))


def check_output(out: Path, resume: bool):
    """The output's format; a user error for a suffix without one, or a resume it cannot do."""
    fmt = output_format(out)
    if resume and not fmt.resumable:
        raise UserError(f"--resume needs a .csv or .jsonl --out: a Parquet file cut short by a crash cannot be "
                        f"read back (got {out.name})")
    return fmt


def _done(out: Path, fmt, k: int, resume: bool) -> set[str]:
    if not resume:
        return set()
    return {p for source in [out, *existing_parts(out)] for p in fmt.done_paths(source, k)}


def predict_to_file(predictor: Predictor, files: list[Path], out: Path, k: int, batch_size: int, resume: bool,
                    reporter: Reporter, ranks: Ranks = Ranks(), workers: int | None = None) -> dict:
    """Predict `files` into `out` (format by suffix). Returns counts for the summary line: files,
    skipped (already in `out`), predicted, unreadable (by this rank), written (rows in `out`, rank 0)."""
    fmt = check_output(out, resume)
    k = min(k, len(predictor.classes))
    files = unique_in_order(files)
    if not resume and ranks.main:  # a fresh run: nothing of an earlier one may be merged in
        out.unlink(missing_ok=True)
        for stale in existing_parts(out):
            stale.unlink()
    ranks.barrier()
    done = _done(out, fmt, k, resume)
    ranks.barrier()  # every rank has read what is done before any rank writes more
    todo = [f for f in files if str(f) not in done]
    mine = todo[batch_aligned_shard(len(todo), batch_size, ranks)]
    skipped = len(files) - len(todo)
    if skipped:
        reporter.info(f"resuming: {skipped} of {len(files)} files already in {out}")
    target = part_path(out, ranks.rank) if ranks.enabled else out
    if resume:
        fmt.drop_partial_line(target)
    if workers is None and ranks.enabled:  # the processes on one machine share its cores
        workers = max(1, default_workers() // ranks.local_world)
    writer = fmt.open_writer(target, k, append=resume)
    unreadable, finished, started = 0, 0, time.monotonic()
    try:
        with reporter.bar("predicting", len(mine), stats=True) as bar:
            for records in predictor.predict_stream(mine, k=k, batch_size=batch_size, workers=workers):
                writer.write(records)
                unreadable += sum("error" in r for r in records)
                finished += len(records)
                bar.advance(len(records), stats=f"{finished / max(time.monotonic() - started, 1e-9):.1f} files/s")
    finally:
        writer.close()
    ranks.barrier()  # every part is complete before rank 0 merges them
    written = None
    if ranks.main:
        parts = existing_parts(out)
        if parts:
            position = {str(f): i for i, f in enumerate(files)}
            written = fmt.merge([out, *parts] if out.is_file() else parts, out, k, position)
            for part in parts:
                part.unlink()
    ranks.barrier()  # the output is whole before any rank reports success
    return {"files": len(files), "skipped": skipped, "predicted": len(mine), "unreadable": unreadable,
            "written": written}
