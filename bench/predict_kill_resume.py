"""Issue 18, acceptance 3: `pixclass predict MODEL DIR --out FILE` killed with SIGKILL at a random
(seeded) moment, then rerun with `--resume`, must write what one uninterrupted run writes: every
file exactly once, the same bytes. The uninterrupted run is timed too, so the kill lands between
10% and 90% of its length.

    python bench/predict_kill_resume.py MODEL DIR --work /tmp/kill [--reference done.csv] [--seed 0]

`--reference` reuses an uninterrupted run's CSV of the same MODEL and DIR (bench/scale.py writes
one per size) instead of running it again; then the kill moment is drawn within `--expect-s`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import pixclass_cmd


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def paths_in(path: Path) -> Counter:
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)  # the header
        return Counter(row[0] for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--reference", type=Path, help="an uninterrupted run's CSV (skips running one)")
    ap.add_argument("--expect-s", type=float, help="with --reference: how long an uninterrupted run takes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    predict = pixclass_cmd("predict", args.model, args.images)
    reference = args.reference
    if reference is None:
        reference = args.work / "uninterrupted.csv"
        start = time.perf_counter()
        subprocess.run(list(map(str, predict + ["--out", reference])), check=True, stderr=subprocess.DEVNULL)
        expect = time.perf_counter() - start
        print(f"uninterrupted: {expect:.1f} s", flush=True)
    else:
        if args.expect_s is None:
            sys.exit("--reference needs --expect-s (how long the uninterrupted run took)")
        expect = args.expect_s
    kill_at = random.Random(args.seed).uniform(0.1, 0.9) * expect
    out = args.work / "killed.csv"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(list(map(str, predict + ["--out", out])), stderr=subprocess.DEVNULL)
    time.sleep(kill_at)
    if proc.poll() is not None:
        sys.exit(f"the run ended before the kill at {kill_at:.1f} s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_before = sum(paths_in(out).values()) if out.is_file() else 0
    print(f"killed at {kill_at:.1f} s with {rows_before} rows written", flush=True)
    start = time.perf_counter()
    resumed = subprocess.run(list(map(str, predict + ["--out", out, "--resume"])), stderr=subprocess.PIPE, text=True)
    if resumed.returncode != 0:
        sys.exit(f"--resume failed ({resumed.returncode}): {resumed.stderr[-2000:]}")
    print(f"resumed: {time.perf_counter() - start:.1f} s", flush=True)
    counts, wanted = paths_in(out), paths_in(reference)
    twice = sum(1 for c in counts.values() if c > 1)
    missing = len(set(wanted) - set(counts))
    identical = sha256(out) == sha256(reference)
    print(f"files: {len(wanted)} expected, {len(counts)} written, {twice} written more than once, {missing} missing; "
          f"byte-identical to the uninterrupted run: {identical}")
    print(f"RESULT files={len(wanted)} killed_after_rows={rows_before} duplicates={twice} missing={missing} "
          f"identical={identical}")
    sys.exit(0 if identical and not twice and not missing else 1)


if __name__ == "__main__":
    main()
