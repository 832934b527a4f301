"""FastAPI dependencies of the routes: the engine of the running app. (Request-level concerns that
every route shares, such as API-key checks, belong here too.)"""

from __future__ import annotations

from fastapi import Request

from service.engine import Engine


def get_engine(request: Request) -> Engine:
    return request.app.state.engine
