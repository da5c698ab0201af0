"""Load test of `pixclass serve`: N concurrent clients post one image each, in a loop, for a fixed
time against a server on 127.0.0.1; prints requests, failures, latency percentiles and
throughput, next to the in-process predictor's throughput on the same images in the same run.

usage: python bench/serve_load.py MODEL_DIR IMAGE_DIR [--clients 32] [--seconds 60]"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(base: str, images: list[tuple[str, bytes]], deadline: float, latencies: list, failures: list, i: int):
    import httpx
    async with httpx.AsyncClient(timeout=60) as client:
        n = i
        while time.perf_counter() < deadline:
            name, data = images[n % len(images)]
            n += 1
            start = time.perf_counter()
            try:
                r = await client.post(f"{base}/v1/predict", files=[("files", (name, data, "image/png"))])
                ok = r.status_code == 200
            except Exception as e:  # a lost request is what this test is about
                ok, r = False, e
            (latencies if ok else failures).append(time.perf_counter() - start if ok else str(r))


async def _health_probe(base: str, deadline: float, worst: list):
    import httpx
    async with httpx.AsyncClient(timeout=10) as client:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            r = await client.get(f"{base}/healthz")
            worst.append((time.perf_counter() - start, r.status_code))
            await asyncio.sleep(0.5)


def in_process_rate(model_dir: Path, paths: list[Path], seconds: float = 10.0) -> float:
    from pixclass.predict import Predictor
    predictor = Predictor.load(model_dir)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        results, _ = predictor.predict_files(paths, batch_size=32)
        n += len(results)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    paths = sorted(p for p in args.image_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:256]
    images = [(p.name, p.read_bytes()) for p in paths]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "pixclass", "serve", str(args.model_dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        latencies, failures, health = [], [], []
        deadline = time.perf_counter() + args.seconds

        async def run():
            await asyncio.gather(*(_client(base, images, deadline, latencies, failures, i) for i in range(args.clients)),
                                 _health_probe(base, deadline, health))
        start = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    local = in_process_rate(args.model_dir, paths)
    lat = np.array(latencies) * 1000
    served = len(latencies) / elapsed
    print(f"{args.clients} clients for {args.seconds:.0f} s: {len(latencies)} ok, {len(failures)} failed")
    if len(lat):
        print(f"latency ms: p50 {np.percentile(lat, 50):.1f}  p90 {np.percentile(lat, 90):.1f}  "
              f"p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}")
    print(f"/healthz during the load: {len(health)} probes, all 200: {all(c == 200 for _, c in health)}, "
          f"slowest {max(t for t, _ in health) * 1000:.1f} ms")
    print(f"throughput: served {served:.0f} img/s, in-process predictor {local:.0f} img/s "
          f"-> {100 * served / local:.0f}% (target >= 80%)")
    if failures:
        print("first failures:", failures[:3])


if __name__ == "__main__":
    main()
