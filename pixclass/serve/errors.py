"""The service's one error shape: every error answer, whatever raised it (our own checks, the
router's 404 and 405, request validation, the multipart parser, an unexpected exception), is a JSON
body `{"error": "<code>", "detail": "<what happened>"}`, documented in the OpenAPI spec as
`ErrorBody`."""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

# the `error` codes for statuses raised outside our own code (router, parser, framework)
_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 500: "internal"}


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_code(status: int) -> str:
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def send_error(send, status: int, error: str, detail: str, *, more_body: bool = False) -> None:
    """The error as raw ASGI messages, for middleware that answers before the app runs; with
    `more_body` the response stays open (the caller finishes it with an empty body message), so
    the connection is not closed while the caller still reads the request."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


def _validation_detail(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts)[:500] or "the request does not match the API"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.error, e.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        # 400, not FastAPI's 422: in this API 422 means "an image that does not decode"
        return error_response(400, "bad_request", _validation_detail(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # router 404/405, multipart parser 400...
        return error_response(e.status_code, error_code(e.status_code), str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # Starlette still re-raises it, so it is logged
        return error_response(500, "internal", "internal server error")


def errors_in_openapi(app: FastAPI) -> None:
    """Replace FastAPI's generated 422 `HTTPValidationError` responses: validation errors are
    answered as documented 400s with `ErrorBody`."""
    generate = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        spec = generate()
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                generated = responses.get("422", {}).get("content", {}).get("application/json", {})
                if generated.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
                    responses.setdefault("400", {"description": "the request does not match the API",
                                                 "content": {"application/json": {
                                                     "schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
        schemas = spec.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
