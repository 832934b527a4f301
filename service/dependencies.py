"""FastAPI dependencies of the routes: the engine of the running app, and the API-key check.

With CLLM4REC_API_KEY set, writes (POST /interactions, /admin/*) need the key, and reads
(/recommend*) too when CLLM4REC_AUTH_READS is true; /healthz, /readyz and /metrics never do, so
probes and scrapers need no secret. Without a key, /admin/* answers clients on this host only
(loopback): an admin call makes the server read files, which no one else should be able to ask.
The key comes as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Both security schemes are
declared in the OpenAPI schema.
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
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY` (CLLM4REC_API_KEY)")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: KEY` (CLLM4REC_API_KEY)")


class Unauthorized(Exception):
    """The API key is missing or wrong (401 with WWW-Authenticate: Bearer)."""


class Forbidden(Exception):
    """An admin call from another host while no API key is set (403)."""


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def keys_match(offered: str, key: str) -> bool:
    """Constant time: comparing the SHA-256 digests makes the time independent of where the strings
    differ and of their lengths."""
    return hmac.compare_digest(hashlib.sha256(offered.encode()).digest(), hashlib.sha256(key.encode()).digest())


def check_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None, header_key: str | None,
                  write: bool) -> None:
    settings = request.app.state.settings
    if settings.api_key is None or not (write or settings.auth_reads):
        return
    offered = credentials.credentials if credentials is not None else header_key
    if not offered:
        raise Unauthorized("this endpoint needs the API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    if not keys_match(offered, settings.api_key.get_secret_value()):
        raise Unauthorized("wrong API key")


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
HeaderKey = Annotated[str | None, Depends(api_key_header)]


def require_key_for_writes(request: Request, credentials: BearerCredentials, header_key: HeaderKey) -> None:
    check_api_key(request, credentials, header_key, write=True)


def require_key_for_reads(request: Request, credentials: BearerCredentials, header_key: HeaderKey) -> None:
    check_api_key(request, credentials, header_key, write=False)


def require_key_or_loopback_for_admin(request: Request, credentials: BearerCredentials,
                                      header_key: HeaderKey) -> None:
    check_api_key(request, credentials, header_key, write=True)
    client = request.client.host if request.client else None
    if request.app.state.settings.api_key is None and not is_loopback(client):
        raise Forbidden("without CLLM4REC_API_KEY the admin endpoints answer this host only: set a key to call "
                        "them over the network, or send SIGHUP to the server to reload")


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an IP address (a Unix socket's peer, a test client's name)
        return False
