"""Uploaded files -> uint8 tensors, never on the event loop.

Decoding cost is not bounded by the upload's size: a 10 KB PNG can hold a 9000 x 9000 1-bit image
that takes most of a second to decode and convert. So every file is decoded in a small pool of
worker threads (its size also bounds how many decoded images are in memory at once), and a
request's images are measured from their headers first: a request whose images add up to more than
`max_request_pixels` is refused with 413 before any pixel is decoded."""

from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import UploadFile

from ..data.decode import decode_image, read_size
from ..data.transforms import image_to_uint8
from ..errors import ImageDecodeError
from .errors import ApiError

_STATUS = {"unsupported": (415, "unsupported_format"), "too_large": (413, "too_large")}


async def read(uploads: list[UploadFile]) -> list[bytes]:
    return [await upload.read() for upload in uploads]


class UploadDecoder:
    def __init__(self, preprocess, max_pixels: int, max_request_pixels: int, workers: int | None = None):
        self.preprocess, self.max_pixels, self.max_request_pixels = preprocess, max_pixels, max_request_pixels
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixclass-decode")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def tensors(self, uploads: list[UploadFile]) -> list[torch.Tensor]:
        """C x size x size uint8 tensors, one per upload; ApiError (413, 415, 422) otherwise."""
        return await self.decode([upload.filename or "<upload>" for upload in uploads], await read(uploads))

    async def decode(self, names: list[str], contents: list[bytes]) -> list[torch.Tensor]:
        """`tensors` for files already read (named for the error messages)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._check_request_pixels, contents)
        results = await asyncio.gather(*(loop.run_in_executor(self.executor, self._decode, name, data)
                                         for name, data in zip(names, contents)), return_exceptions=True)
        for result in results:  # the first bad file in the request's order is the one reported
            if isinstance(result, BaseException):
                raise result
        return results

    def _check_request_pixels(self, contents: list[bytes]) -> None:
        total = 0
        for data in contents:
            try:
                width, height = read_size(io.BytesIO(data))
            except ImageDecodeError:
                continue  # not an image: decoding it says why, with the right status
            if width * height <= self.max_pixels:  # a larger one is refused by itself, with its size
                total += width * height
        if total > self.max_request_pixels:
            raise ApiError(413, "too_large", f"the request's images have {total} pixels together, "
                                             f"limit {self.max_request_pixels}; send fewer or smaller images")

    def _decode(self, name: str, data: bytes) -> torch.Tensor:
        try:
            image = decode_image(data, self.preprocess.channels, self.max_pixels)
        except ImageDecodeError as e:
            status, error = _STATUS.get(e.kind, (422, "undecodable"))
            raise ApiError(status, error, f"{name}: {e.reason}") from None
        return image_to_uint8(image, self.preprocess)
