"""FastAPI dependencies of the routes: the engine of the running app, and the API-key checks.

Each endpoint has a scope: read (/recommend*, GET /users/{id}/history), write (POST /interactions,
DELETE /users/{id}/history) or admin (/admin/*). A request of a scope must carry its scoped key
(CLLM4REC_READ_KEY, _WRITE_KEY, _ADMIN_KEY) or CLLM4REC_API_KEY, whichever are set (Settings.scope_keys);
a scope with neither is open, reads also when CLLM4REC_AUTH_READS is false. /healthz, /readyz and
/metrics never need a key, so probes and scrapers need no secret. With no admin key, /admin/* answers
clients on this host only (loopback): an admin call makes the server read files, which no one else
should be able to ask. The key comes as `Authorization: Bearer KEY` or `X-API-Key: KEY`; both
security schemes are declared in the OpenAPI schema.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine

# auto_error=False: a missing or malformed header reaches the check below, which answers 401 with
# its own message (FastAPI's default would be a bare 403).
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY` (CLLM4REC_API_KEY or the scope's key)")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="`X-API-Key: KEY` (CLLM4REC_API_KEY or the scope's key)")


# The dependencies are coroutines although none of them awaits: FastAPI runs a plain function in its
# thread pool, two thread hops a request (py-spy on the 4-layer server, docs/benchmarks.md).


class Unauthorized(Exception):
    """The API key is missing or wrong (401 with WWW-Authenticate: Bearer)."""


class Forbidden(Exception):
    """An admin call from another host while no API key is set (403)."""


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def keys_match(offered: str, key: str) -> bool:
    """Constant time: comparing the SHA-256 digests makes the time independent of where the strings
    differ and of their lengths."""
    return hmac.compare_digest(hashlib.sha256(offered.encode()).digest(), hashlib.sha256(key.encode()).digest())


def check_key(request: Request, credentials: HTTPAuthorizationCredentials | None, header_key: str | None,
              scope: str) -> None:
    keys = request.app.state.settings.scope_keys(scope)
    if not keys:
        return
    offered = credentials.credentials if credentials is not None else header_key
    if not offered:
        raise Unauthorized(f"this endpoint needs a key ({scope} scope): send 'Authorization: Bearer KEY' or "
                           "'X-API-Key: KEY'")
    # Every configured key is compared (no early exit), so the time does not tell which one was close.
    if not sum(keys_match(offered, key) for key in keys):
        raise Unauthorized(f"wrong key for this endpoint ({scope} scope)")


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
HeaderKey = Annotated[str | None, Depends(api_key_header)]


async def require_read_key(request: Request, credentials: BearerCredentials, header_key: HeaderKey) -> None:
    check_key(request, credentials, header_key, "read")


async def require_write_key(request: Request, credentials: BearerCredentials, header_key: HeaderKey) -> None:
    check_key(request, credentials, header_key, "write")


async def require_admin_key_or_loopback(request: Request, credentials: BearerCredentials,
                                        header_key: HeaderKey) -> None:
    check_key(request, credentials, header_key, "admin")
    client = request.client.host if request.client else None
    if not request.app.state.settings.scope_keys("admin") and not is_loopback(client):
        raise Forbidden("without an admin key (CLLM4REC_ADMIN_KEY or CLLM4REC_API_KEY) the admin endpoints answer "
                        "this host only: set a key to call them over the network, or send SIGHUP to the server to "
                        "reload")


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an IP address (a Unix socket's peer, a test client's name)
        return False
