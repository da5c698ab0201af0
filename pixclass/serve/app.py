"""`pixclass serve`: FastAPI over a saved model.

Routes: POST /v1/predict (one or more files), POST /v1/explain (Grad-CAM overlay PNG),
GET /v1/model, GET /healthz, GET /readyz, GET /metrics (Prometheus), GET / (the upload page); with a
prediction log (`log_db`), POST /v1/feedback and GET /v1/predictions (log_routes.py).
Every error answers with one JSON shape, `{"error": code, "detail": text}` (errors.py): 413 for a
body over the upload limit (body_limit.py), for an image over the pixel limit and for a request
whose images together pass the request's pixel budget (judged from the headers, uploads.py), 415
for files that are not an allowed image format, 422 for an allowed format that does not decode,
400 for a request that does not match the API, 401 without the bearer token, 404/405 for unknown
routes and methods, 503 while the model loads, 500 for anything unexpected.

Predictions run on the fastest backend that answers like the PyTorch model (fastest_backend.py:
ONNX Runtime when the model's export agrees with it, else PyTorch); Grad-CAM needs the PyTorch
model's gradients, so /v1/explain always runs the artifact itself."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path

import numpy as np
import torch
from fastapi import BackgroundTasks, Depends, FastAPI, File, Header, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from ..data.decode import DEFAULT_MAX_PIXELS
from .batching import Batcher
from .body_limit import BodyLimit
from .errors import ApiError, ErrorBody, errors_in_openapi, install_error_handlers
from .metrics import Metrics
from .uploads import UploadDecoder, read

# a request's images may add up to this many times the per-image pixel limit (unless set): room for
# a batch of phone photos, not for dozens of images at the limit
REQUEST_PIXELS_FACTOR = 4
# a request id taken from the client's X-Request-ID header; anything else is replaced by a new one
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class Settings:
    model: str
    token: str | None = None
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    top_k: int = 5
    max_request_pixels: int | None = None  # None: REQUEST_PIXELS_FACTOR x max_pixels
    backend: str = "auto"  # fastest_backend.BACKENDS
    # why `backend` was chosen, when `pixclass serve` resolved "auto" before starting its workers
    # (so each worker reports the reason rather than "asked for")
    backend_reason: str | None = None
    # intra-op threads of the prediction backend; None: every core this process may use. The
    # batcher already gathers concurrent requests into one call, so one call at a time on the
    # cores is what the model needs; `--workers N` gives each worker its share
    model_threads: int | None = None
    # the prediction log (prediction_log.py): a SQLAlchemy URL or a SQLite file; None: no log
    log_db: str | None = None
    log_images: bool = False  # also store each image's bytes, when not over log_image_limit_kb
    log_image_limit_kb: int = 1024
    log_queue: int = 1000  # predictions that may wait for the database; beyond, they are dropped and counted
    abstain: bool = True  # answer "unknown" below the model's abstain threshold (`--abstain off`: never)

    @property
    def request_pixels(self) -> int:
        return self.max_request_pixels or REQUEST_PIXELS_FACTOR * self.max_pixels


class FilePrediction(BaseModel):
    id: str = Field(description="this prediction's id: the key for POST /v1/feedback when the service logs predictions")
    filename: str
    answer: str  # the top class, or "unknown" below the model's abstain threshold
    unknown: bool
    score: float | None  # the abstain score (None: the model has no threshold, or --abstain off)
    top_k: list[dict]
    # a multi-label model's answer: every label whose probability reaches its threshold (then
    # `answer` is them joined by spaces); absent for a single-label model
    labels: list[str] | None = None


class PredictResponse(BaseModel):
    model: str
    version: str
    request_id: str = Field(description="the request's X-Request-ID header when it sent a usable one, else a new id")
    predictions: list[FilePrediction]


def _errors(*codes: int) -> dict:
    text = {400: "the request does not match the API", 401: "missing or wrong bearer token",
            413: "upload, image or the request's images together too large",
            415: "not an allowed image format", 422: "image could not be decoded", 503: "model not loaded yet"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def _description(settings: Settings) -> str:
    return (
        "Image classification with a pixclass model.\n\n"
        "Every error, whatever the route or the cause, is JSON of one shape, `ErrorBody`: "
        '`{"error": "<code>", "detail": "<what happened>"}`. Codes: `bad_request` (400), `unauthorized` (401), '
        "`not_found` (404), `method_not_allowed` (405), `too_large` (413), `unsupported_format` (415), "
        "`undecodable` (422), `not_ready` (503), `internal` (500).\n\n"
        f"Limits: a request body of at most {settings.max_upload_mb:g} MiB (chunked or not; a larger body is "
        f"answered 413 and the rest of it read and discarded, up to a bound, so the client reads the answer); "
        f"at most {settings.max_pixels} pixels per image and {settings.request_pixels} pixels for all the "
        "images of one request, judged from the image headers before anything is decoded (413).")


def create_app(settings: Settings) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from .. import artifact as artifact_io
    from ..predict import answer, per_image

    registry = CollectorRegistry()
    requests_total = Counter("pixclass_requests_total", "requests", ["route", "status"], registry=registry)
    latency = Histogram("pixclass_request_seconds", "request latency", ["route"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    batch_sizes = Histogram("pixclass_batch_size", "images per model call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    state: dict = {"ready": False}
    log = None
    if settings.log_db:
        from .prediction_log import open_for_service
        log = open_for_service(settings.log_db, settings.log_queue, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        art = await loop.run_in_executor(None, artifact_io.load, settings.model)  # for explain and /v1/model
        choice = await loop.run_in_executor(None, open_prediction_backend, settings)
        backend = choice.backend
        weights = Path(settings.model) / artifact_io.WEIGHTS_FILE
        state.update(art=art, backend=backend, backend_reason=settings.backend_reason or choice.reason,
                     version=hashlib.sha256(weights.read_bytes()).hexdigest()[:12],
                     digest=artifact_io.files_digest(settings.model))
        if log is not None:
            await loop.run_in_executor(None, log.start)
        state["batcher"] = Batcher(lambda batch: per_image(*backend.scores_uint8(batch)), settings.max_batch,
                                   settings.batch_wait_ms / 1000, on_batch=lambda n, s: batch_sizes.observe(n))
        state["batcher"].start()
        state["decoder"] = UploadDecoder(art.preprocess, settings.max_pixels, settings.request_pixels)
        pre = art.preprocess
        await state["batcher"].submit([torch.zeros(pre.channels, pre.size, pre.size, dtype=torch.uint8)])  # warm-up
        state["ready"] = True
        yield
        state["ready"] = False
        await state["batcher"].stop()
        state["decoder"].close()
        if log is not None:
            await loop.run_in_executor(None, log.stop)

    app = FastAPI(title="pixclass", version="1", lifespan=lifespan, description=_description(settings))
    install_error_handlers(app)
    errors_in_openapi(app)

    def authorized(authorization: str | None = Header(default=None)):
        if settings.token and authorization != f"Bearer {settings.token}":
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")

    def ready():
        if not state["ready"]:
            raise ApiError(503, "not_ready", "the model is still loading")

    v1 = [Depends(authorized), Depends(ready)]

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=v1,
              responses=_errors(400, 401, 413, 415, 422, 503))
    async def predict(response: Response, background: BackgroundTasks,
                      files: list[UploadFile] = File(..., description="one or more images"),
                      k: int = Query(settings.top_k, ge=1, le=1000, description="how many classes per image"),
                      x_request_id: str | None = Header(None, description="kept as the request's id when usable")):
        start = time.perf_counter()
        names = [f.filename or "" for f in files]
        contents = await read(files)
        scored = await state["batcher"].submit(await state["decoder"].decode([n or "<upload>" for n in names], contents))
        classes = state["art"].classes
        abstain = state["art"].abstain if settings.abstain else None
        records = [answer(p, classes, min(k, len(classes)), abstain, state["art"].thresholds, s) for p, s in scored]
        answers = [r["top_k"] for r in records]  # what the prediction log keeps
        request_id = x_request_id if x_request_id and REQUEST_ID.fullmatch(x_request_id) else uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in files]
        response.headers["X-Request-ID"] = request_id
        if log is not None:  # after the answer is sent: hashing the images is not the client's wait
            background.add_task(log_predictions, ids, request_id, names, contents, answers,
                                1000 * (time.perf_counter() - start))
        return {"model": state["art"].arch["name"], "version": state["version"], "request_id": request_id,
                "predictions": [{"id": i, "filename": n, **r} for i, n, r in zip(ids, names, records)]}

    async def log_predictions(*request) -> None:
        from .prediction_log import prediction_rows
        limit = settings.log_image_limit_kb * 1024 if settings.log_images else None
        rows = await asyncio.get_running_loop().run_in_executor(
            state["decoder"].executor, prediction_rows, *request, state["digest"], limit)
        log.submit(rows)

    @app.post("/v1/explain", dependencies=v1, responses={200: {"content": {"image/png": {}}},
                                                         **_errors(400, 401, 413, 415, 422, 503)})
    async def explain(file: UploadFile = File(...), method: str = Query("gradcam")):
        from ..explain import METHODS, Explainer, overlay
        if method not in METHODS:
            raise ApiError(400, "bad_request", f"method must be one of {', '.join(METHODS)}")
        [tensor] = await state["decoder"].tensors([file])

        def work():
            from PIL import Image
            with Explainer(state["art"], method) as explainer:
                img = Image.fromarray(tensor.permute(1, 2, 0).numpy().squeeze())
                maps, _, batch = explainer.heatmaps([img])
            rgb = (overlay(batch[0], maps[0]) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "PNG")
            return buf.getvalue()
        png = await asyncio.get_running_loop().run_in_executor(state["batcher"].executor, work)
        return Response(png, media_type="image/png")

    @app.get("/v1/model", dependencies=v1, responses=_errors(401, 503))
    async def model_info():
        art = state["art"]
        return {"name": art.arch["name"], "version": state["version"], "digest": state["digest"], "classes": art.classes,
                "preprocess": art.preprocess.to_dict(), "tta": art.tta, "temperature": art.temperature,
                "abstain": art.abstain.to_dict() if art.abstain and settings.abstain else None,
                "task": art.task, "thresholds": art.thresholds, "metrics": art.metrics,
                "versions": art.versions,
                "backend": {"name": state["backend"].name, "reason": state["backend_reason"]}}

    if log is not None:
        from .log_routes import log_router
        app.include_router(log_router(log, lambda: state["art"].classes, v1))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses=_errors(503))
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"error": "not_ready", "detail": "the model is still loading"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    static = package_files("pixclass") / "serve" / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(static.joinpath("index.html").read_text())

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ("app.js", "style.css"):
            raise ApiError(404, "not_found", name)
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(static.joinpath(name).read_text(), media_type=media)

    app.add_middleware(BodyLimit, limit_bytes=int(settings.max_upload_mb * 2**20))
    app.add_middleware(Metrics, requests_total=requests_total, latency=latency, routes=app.router.routes)
    return app


def available_cores() -> int:
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def open_prediction_backend(settings: Settings):
    """The backend predictions run on (a fastest_backend.Choice). ONNX Runtime's threads do not
    spin between calls: on a small machine a spinning thread takes the core that decodes the next
    request's images."""
    from ..fastest_backend import open_fastest
    return open_fastest(settings.model, settings.backend, threads=settings.model_threads or available_cores(),
                        spinning=False)


def create_app_from_env() -> FastAPI:
    """For `uvicorn --workers N --factory`: the settings travel in an environment variable."""
    import json
    import os
    return create_app(Settings(**json.loads(os.environ["PIXCLASS_SERVE_SETTINGS"])))
