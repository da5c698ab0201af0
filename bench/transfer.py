"""Transfer learning on the ants/bees photos: `pixclass train DATA --model efficientnet_lite0`
(whole command, start to saved model) against the peer ../shared/peers/seed_transfer.py for 3
epochs (frozen base recomputed every batch), both on this machine in the same run.

pixclass is timed twice: with an empty feature cache (cold) and again with the cache the first
run left (warm). usage: python bench/transfer.py [--work DIR]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, extract, pixclass_cmd, result_fields, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp dir)")
    parser.add_argument("--peer-epochs", type=int, default=3)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pixclass-bench-"))
    data = extract(SHARED / "datasets" / "hymenoptera.tar.gz", work / "data") / "hymenoptera"
    cache = Path(tempfile.mkdtemp(prefix="pixclass-cache-"))

    peer_s, peer_out = timed([sys.executable, str(SHARED / "peers" / "seed_transfer.py"), str(data), str(args.peer_epochs)])
    peer = result_fields(peer_out)
    runs = {}
    for name in ("cold", "warm"):
        seconds, out = timed(pixclass_cmd("train", data, "--model", "efficientnet_lite0", "--out", work / f"run-{name}",
                                          "--json", "--quiet"), env={"PIXCLASS_CACHE_DIR": str(cache)})
        summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
        runs[name] = (seconds, summary)

    print(f"peer seed_transfer ({args.peer_epochs} epochs): {peer_s:6.1f} s wall, val_acc {float(peer['val_acc']):.4f}")
    for name, (seconds, summary) in runs.items():
        t = summary["timings"]
        print(f"pixclass efficientnet_lite0 ({name} cache): {seconds:6.1f} s wall, val_acc "
              f"{summary['metrics']['accuracy']:.4f}  [features {t['features_s']} s, head {t['head_s']} s, "
              f"fine-tune {t['finetune_s']} s]  speed-up x{peer_s / seconds:.2f} (target >= 5)")


if __name__ == "__main__":
    main()
