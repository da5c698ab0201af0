"""The prediction log's routes, present when the service runs with `--log-db`:
POST /v1/feedback (the correct class of a logged prediction) and GET /v1/predictions (the log,
newest first, a page at a time). Database calls run in threads, never on the event loop; when the
database is away both answer 503 `log_unavailable` while predictions go on."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from .errors import ApiError, ErrorBody

# how long feedback waits for its prediction to leave the writer's queue
FEEDBACK_WAIT_S = 5.0


class FeedbackIn(BaseModel):
    prediction_id: str = Field(..., max_length=32, description="`id` of a prediction answered by /v1/predict")
    label: str = Field(..., description="the correct class, one of the model's classes")


class FeedbackOut(BaseModel):
    prediction_id: str
    label: str
    predicted: str


class LoggedPrediction(BaseModel):
    id: str
    request_id: str
    created_at: str
    model_digest: str
    filename: str
    image_sha256: str
    image_bytes: int
    image_stored: bool
    predicted: str
    top_k: list[dict]
    latency_ms: float
    feedback: str | None


class PredictionsPage(BaseModel):
    predictions: list[LoggedPrediction]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next (older) page; null after the last")


def _responses(*codes: int) -> dict:
    text = {400: "the request does not match the API", 401: "missing or wrong bearer token",
            404: "no such prediction in the log", 422: "not one of the model's classes",
            503: "model not loaded yet, or the prediction log's database is unreachable"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def log_router(log, model_classes, dependencies) -> APIRouter:
    """`model_classes()`: the served model's classes (known once it is loaded)."""
    from . import log_db

    router = APIRouter(dependencies=dependencies)

    async def in_thread(function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, function, *args)
        except Exception as e:
            if log_db.is_transient(e):
                raise ApiError(503, "log_unavailable", "the prediction log's database is unreachable") from None
            raise

    @router.post("/v1/feedback", response_model=FeedbackOut, responses=_responses(400, 401, 404, 422, 503))
    async def feedback(body: FeedbackIn):
        classes = model_classes()
        if body.label not in classes:
            raise ApiError(422, "unknown_class", f"{body.label!r} is not one of the model's classes: {', '.join(classes)}")
        await in_thread(log.wait_written, body.prediction_id, FEEDBACK_WAIT_S)
        predicted = await in_thread(log_db.record_feedback, log.engine, body.prediction_id, body.label)
        if predicted is None:
            raise ApiError(404, "not_found", f"no prediction {body.prediction_id!r} in the log")
        return {"prediction_id": body.prediction_id, "label": body.label, "predicted": predicted}

    @router.get("/v1/predictions", response_model=PredictionsPage, responses=_responses(400, 401, 503))
    async def predictions(limit: int = Query(100, ge=1, le=1000), cursor: str | None = Query(None)):
        if cursor is not None and not cursor.isdigit():
            raise ApiError(400, "bad_request", "cursor: pass the next_cursor of the previous page")
        rows, next_seq = await in_thread(log_db.page, log.engine, limit, int(cursor) if cursor else None)
        return {"predictions": rows, "next_cursor": None if next_seq is None else str(next_seq)}

    return router
