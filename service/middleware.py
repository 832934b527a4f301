"""ASGI middleware around the routes: RequestMetrics (latency by route, requests in flight) outside
BodySizeLimit (413 before any parsing). Both are plain ASGI, not Starlette's BaseHTTPMiddleware: they
add no task or stream to a request.
"""

from __future__ import annotations

import time

from service import metrics
from service.errors import error_response

# The status recorded when the client leaves before it is answered (nginx's convention); never sent.
CLIENT_CLOSED_REQUEST = 499


class RequestMetrics:
    """ASGI middleware: latency by route template, method and status; requests in flight."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        answered = disconnected = False

        async def send_recording_status(message):
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        async def receive_noting_disconnect():
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive_noting_disconnect, send_recording_status)
        finally:
            metrics.requests_in_flight.dec()
            if disconnected and not answered:
                status = CLIENT_CLOSED_REQUEST  # the client left first (e.g. mid-body): not a server error
            route = scope.get("route")  # set by the router on a match: the template, never the user id
            metrics.http_request_duration.labels(route.path if route else "unmatched", scope["method"],
                                                 str(status)).observe(time.perf_counter() - started)


class BodySizeLimit:
    """ASGI middleware: a request body larger than max_bytes gets 413 before the app parses any of
    it: at once when Content-Length says so, else as soon as a streamed (chunked) body passes the
    limit. Bodies within it are read here and handed on, so no route reads an unbounded body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay():
            nonlocal body_sent
            if body_sent:
                return await receive()  # from now on: the disconnect, when it comes
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        response = error_response(413, "too_large", Exception(
            f"the request body is larger than {self.max_bytes} bytes (CLLM4REC_MAX_BODY_BYTES)"))
        # The rest of the body is never read, so the connection cannot carry another request.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
