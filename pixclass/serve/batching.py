"""Micro-batching: requests that arrive together share one forward pass. The model runs in a
worker thread, so the event loop (and /healthz) keeps answering during heavy load."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch


class Batcher:
    """`predict`: uint8 images N x C x H x W -> N results, one per image (e.g. the rows of a
    backend's `probabilities_uint8`, pixclass.inference); it runs in the batcher's one worker thread."""

    def __init__(self, predict, max_batch: int = 32, max_wait_s: float = 0.005, on_batch=None):
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.on_batch = on_batch or (lambda n, seconds: None)
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixclass-model")
        self.task = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def submit(self, images: list[torch.Tensor]) -> list:
        """uint8 images (C x H x W each) -> their results, batched with other requests."""
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            await self.queue.put((image, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            # one short sleep lets the requests arriving together join, then whatever is queued
            # goes in (a timed wait per queued item measured far costlier under load)
            if self.queue.qsize() < self.max_batch - 1 and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            stacked = torch.stack([image for image, _ in batch])
            start = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self.executor, self.predict, stacked)
            except Exception as e:  # a failed batch fails its requests, not the service
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.on_batch(len(batch), time.perf_counter() - start)
            for (_, future), row in zip(batch, probs):
                if not future.done():
                    future.set_result(row)
