"""ASGI middleware: request counts by route and status, and the latency histogram.

Requests are labelled by the route's template (`/v1/predict`, `/static/{name}`), or `unmatched`
when no route matches, never by the raw path: a label value per distinct path would let anyone
grow /metrics (and the server's memory) without bound by asking for random paths. Plain ASGI
rather than @app.middleware("http"), whose per-request streaming wrapper measured a noticeable
share of a small model's request time."""

from __future__ import annotations

import time

from starlette.routing import Match

UNMATCHED = "unmatched"


class Metrics:
    def __init__(self, app, requests_total, latency, routes):
        self.app, self.requests_total, self.latency, self.routes = app, requests_total, latency, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = self._template(scope)
            self.latency.labels(route).observe(time.perf_counter() - start)
            self.requests_total.labels(route, str(status)).inc()

    def _template(self, scope) -> str:
        route = scope.get("route")  # set by the router when a route (or only its method) matched
        if route is None:  # answered before routing, e.g. a body refused from its Content-Length
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path_format", None) or UNMATCHED
