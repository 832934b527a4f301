"""What each failure answers: one table from exception to status, error kind and headers.

Every error answer is JSON `{"detail": message}` and counts in cllm4rec_errors_total by kind. 503s
carry `Retry-After: 1` (the replica is overloaded or its store is away: another try may succeed), 401s
`WWW-Authenticate: Bearer`. An exception nobody expected answers 500 without its message (the log has
it). Request validation keeps FastAPI's 422 body, which names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import metrics
from service.batcher import Overloaded
from service.dependencies import Forbidden, Unauthorized
from service.engine import ItemExists, ReloadFailed, RequestTimeout, UnknownItem
from service.histories import HistoryStoreUnavailable

RETRY_SOON = {"Retry-After": "1"}


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    kind: str  # the cllm4rec_errors_total label
    headers: dict[str, str] = field(default_factory=dict)


ANSWERS: dict[type[Exception], ErrorAnswer] = {
    ReloadFailed: ErrorAnswer(400, "reload_failed"),
    Unauthorized: ErrorAnswer(401, "unauthorized", {"WWW-Authenticate": "Bearer"}),
    Forbidden: ErrorAnswer(403, "forbidden"),
    UnknownItem: ErrorAnswer(404, "unknown_item"),
    ItemExists: ErrorAnswer(409, "item_exists"),
    Overloaded: ErrorAnswer(503, "overloaded", RETRY_SOON),
    HistoryStoreUnavailable: ErrorAnswer(503, "history_store", RETRY_SOON),
    RequestTimeout: ErrorAnswer(504, "timeout"),
}


def error_response(status: int, kind: str, error: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"detail": str(error)}, status_code=status, headers=headers or None)


def answering(answer: ErrorAnswer):
    async def handler(request: Request, error: Exception) -> JSONResponse:
        return error_response(answer.status, answer.kind, error, answer.headers)
    return handler


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    metrics.errors.labels("validation").inc()
    return await request_validation_exception_handler(request, error)


async def on_internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, "internal", Exception("internal error (logged by the server)"))


def install_error_handlers(app: FastAPI) -> None:
    for error_type, answer in ANSWERS.items():
        app.add_exception_handler(error_type, answering(answer))
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_internal_error)
