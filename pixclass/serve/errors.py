"""The service's error shape: a JSON body `{"error": "<code>", "detail": "<what happened>"}`."""

from __future__ import annotations

import json

from pydantic import BaseModel


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


async def _send_json(send, status: int, error: str, detail: str) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
