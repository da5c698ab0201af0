"""How long `pixclass suggest`'s ranking takes for many picks (pixclass.suggest_rank.pick_diverse).

Synthetic embeddings shaped like the backbone's (1,280 dimensions, 200 loose groups, unit length)
and random uncertainties: the time to pick n of a pool of POOL images for each n. Only the ranking
is timed; `suggest`'s feature pass over the images is the same for any n.

usage: python bench/suggest_speed.py [--pool 20000] [--picks 50,500,2000] [--dims 1280]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixclass.suggest_rank import pick_diverse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--picks", default="50,500,2000")
    parser.add_argument("--dims", type=int, default=1280)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, args.dims))
    embeddings = (centres[rng.integers(0, 200, args.pool)] + 2 * rng.normal(size=(args.pool, args.dims)))
    embeddings = embeddings.astype(np.float32)
    scores = rng.random(args.pool)
    seconds = {}
    for n in (int(p) for p in args.picks.split(",")):
        started = time.perf_counter()
        picks = pick_diverse(scores, embeddings, n)
        seconds[n] = round(time.perf_counter() - started, 1)
        assert len(set(picks)) == n
    print(json.dumps({"pool": args.pool, "dims": args.dims, "seconds_by_picks": seconds}))


if __name__ == "__main__":
    main()
