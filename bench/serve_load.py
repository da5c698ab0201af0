"""Load test of `pixclass serve`: N concurrent clients post images in a loop (K per request,
default 1), for a fixed time, against a server on 127.0.0.1; prints requests, failures, latency
percentiles and throughput, next to the in-process predictor's throughput on the same images in
the same run.

The clients speak HTTP/1.1 keep-alive over raw asyncio streams with the multipart bodies built
once, so the load generator, which shares the machine's cores with the server, costs a few
microseconds per request instead of the ~1 ms of a full HTTP client library.

usage: python bench/serve_load.py MODEL_DIR IMAGE_DIR [--clients 32] [--seconds 60] [--per-request K]"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np



def build_request(port: int, files: list[tuple[str, bytes]]) -> bytes:
    """One POST /v1/predict with `files` as multipart parts, ready to write to the socket."""
    boundary = b"pixclassbench7d1e"
    body = b"".join(b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\""
                    + name.encode() + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
                    for name, data in files) + b"--" + boundary + b"--\r\n"
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def _client(port: int, requests: list[bytes], per_request: int, deadline: float, latencies: list,
                  failures: list, i: int):
    reader = writer = None
    n = i
    while time.perf_counter() < deadline:
        request = requests[n % len(requests)]
        n += 1
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status, body = await _read_response(reader)
            ok = status == 200 and body.count(b'"filename"') == per_request
            problem = f"status {status}: {body[:200]!r}"
        except Exception as e:  # a lost request is what this test is about
            ok, problem = False, repr(e)
            writer = None
        (latencies if ok else failures).append(time.perf_counter() - start if ok else problem)
    if writer is not None:
        writer.close()


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
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    args = parser.parse_args()
    paths = sorted(p for p in args.image_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:256]
    images = [(p.name, p.read_bytes()) for p in paths]
    from pixclass.serve.local import start_local
    server, base = start_local(args.model_dir)
    port = int(base.rsplit(":", 1)[1])
    try:
        latencies, failures, health = [], [], []
        deadline = time.perf_counter() + args.seconds

        k = args.per_request
        requests = [build_request(port, [images[(j + m) % len(images)] for m in range(k)])
                    for j in range(0, len(images), k)]

        async def run():
            await asyncio.gather(*(_client(port, requests, k, deadline, latencies, failures, i)
                                   for i in range(args.clients)), _health_probe(base, deadline, health))
        start = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    local = in_process_rate(args.model_dir, paths)
    lat = np.array(latencies) * 1000
    served = len(latencies) * args.per_request / elapsed
    print(f"{args.clients} clients for {args.seconds:.0f} s, {args.per_request} image(s) per request: "
          f"{len(latencies)} requests ok, {len(failures)} failed")
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
