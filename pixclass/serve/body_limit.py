"""ASGI middleware: refuse a request body over the upload limit with 413, without buffering it.

A body declared too large (Content-Length) is refused before the app runs; a streamed (chunked)
one as soon as it passes the limit, whatever the app then makes of the cut-off body. Either way the
413 is sent first and then the rest of the body is read and thrown away, up to a bound, before the
connection closes: clients such as urllib and requests send the whole body before they read the
answer, and closing on unread data resets the connection, so they would see a broken pipe instead
of the 413."""

from __future__ import annotations

import asyncio

from .errors import send_error

# how much of a refused body is read and discarded so the client can finish sending and read the
# 413: at least this much, or a few times the limit when that is more; and for at most this long
DRAIN_MIN_BYTES = 64 * 2**20
DRAIN_LIMIT_FACTOR = 4
DRAIN_SECONDS = 30.0


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, limit_bytes: int):
        self.app, self.limit = app, limit_bytes
        self.drain_bytes = max(DRAIN_MIN_BYTES, DRAIN_LIMIT_FACTOR * limit_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            # a body that cannot be drained within the bound is not read at all
            return await self._refuse(receive, send, drain=int(declared) <= self.drain_bytes)

        received = 0
        too_large = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            if not too_large:  # once over the limit, whatever the app answers is replaced by the 413
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._refuse(receive, send, drain=True, already=received)

    async def _refuse(self, receive, send, *, drain: bool, already: int = 0) -> None:
        detail = f"upload larger than the limit of {self.limit} bytes"
        await send_error(send, 413, "too_large", detail, more_body=drain)
        if not drain:
            return
        try:
            await asyncio.wait_for(self._discard(receive, self.drain_bytes - already), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _discard(receive, budget: int) -> None:
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
