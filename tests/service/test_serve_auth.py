"""Keys over real HTTP: with a key configured every endpoint but the probes and the scrape endpoint
needs one (reads may be opted out); scoped read, write and admin keys each open their own scope and
CLLM4REC_API_KEY opens all; 401 with WWW-Authenticate; constant-time comparison; no key ever shows."""

from __future__ import annotations

import asyncio
import hmac
import logging

import httpx
import pytest
from pydantic import ValidationError

from service import dependencies
from service.settings import Settings
from serving_helpers import metric_value, running_server, server_settings

KEY = "k3y-for-the-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def user_id(offline) -> str:
    return offline.checkpoint.user_ids[0]


def reads(user_id: str) -> list[tuple[str, str, dict | None]]:
    return [("post", "/recommend", {"user_id": user_id, "k": 3}), ("get", f"/recommend/{user_id}?k=3", None),
            ("post", "/recommend/batch", {"requests": [{"user_id": user_id, "k": 3}]}),
            ("get", f"/users/{user_id}/history", None), ("get", "/items/i1", None)]


def writes(user_id: str) -> list[tuple[str, str, dict | None]]:
    return [("post", "/interactions", {"user_id": user_id, "item_ids": ["i1"]}),
            ("delete", "/users/someone-else/history", None), ("patch", "/items/i1", {"available": True}),
            ("post", "/items", {"item_id": "i1", "title": "exists: 409 once authorised"})]


# A reload with a path that does not exist: authorised, it is a 400 that leaves the model alone.
ADMIN = [("post", "/admin/reload", {"checkpoint": "/no/such/checkpoint"})]
PROBES = ["/healthz", "/readyz", "/metrics"]


def call(client, method, path, body, headers=None):
    return client.request(method, path, json=body, headers=headers)


def assert_unauthorized(response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert message in response.json()["detail"]


def authorised_status(path: str) -> int:
    return {"/admin/reload": 400, "/items": 409}.get(path, 200)


def test_with_a_key_every_endpoint_but_the_probes_needs_it(tiny_checkpoint, user_id, caplog):
    caplog.set_level(logging.DEBUG)
    with running_server(server_settings(tiny_checkpoint, api_key=KEY)) as server, server.client() as client:
        unauthorized_before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="unauthorized")
        endpoints = reads(user_id) + writes(user_id) + ADMIN
        for method, path, body in endpoints:
            assert_unauthorized(call(client, method, path, body), "Authorization: Bearer KEY")
            assert_unauthorized(call(client, method, path, body, {"Authorization": "Bearer not-the-key"}),
                                "wrong key")
            assert_unauthorized(call(client, method, path, body, {"X-API-Key": KEY[:-1]}), "wrong key")
            # another scheme is not a bearer token: as if no key was sent
            assert_unauthorized(call(client, method, path, body, {"Authorization": f"Basic {KEY}"}), "needs a key")
            expected = authorised_status(path)
            assert call(client, method, path, body, {"Authorization": f"Bearer {KEY}"}).status_code == expected, path
            assert call(client, method, path, body, {"X-API-Key": KEY}).status_code == expected, path
        for path in PROBES:
            assert client.get(path).status_code == 200, path
        text = client.get("/metrics").text
        assert metric_value(text, "cllm4rec_errors_total", kind="unauthorized") == \
            unauthorized_before + 4 * len(endpoints)
        assert KEY not in text and KEY not in client.get("/openapi.json").text
    assert KEY not in caplog.text
    assert "reads need a key, writes need a key, admin needs a key" in caplog.text  # the start-up line


def test_auth_reads_false_opens_the_reads_only(tiny_checkpoint, user_id):
    settings = server_settings(tiny_checkpoint, api_key=KEY, auth_reads=False)
    with running_server(settings) as server, server.client() as client:
        for method, path, body in reads(user_id):
            assert call(client, method, path, body).status_code == 200, path
        for method, path, body in writes(user_id) + ADMIN:
            assert_unauthorized(call(client, method, path, body), "needs a key")


def test_scoped_keys_open_their_own_scope_and_the_api_key_all(tiny_checkpoint, user_id):
    keys = {scope: f"{scope}-key-for-the-tests-0123456789" for scope in ("read", "write", "admin")}
    settings = server_settings(tiny_checkpoint, api_key=KEY, read_key=keys["read"], write_key=keys["write"],
                               admin_key=keys["admin"])
    scopes = {"read": reads(user_id), "write": writes(user_id), "admin": ADMIN}
    with running_server(settings) as server, server.client() as client:
        for scope, endpoints in scopes.items():
            for method, path, body in endpoints:
                for key_scope, key in keys.items():
                    response = call(client, method, path, body, {"X-API-Key": key})
                    if key_scope == scope:
                        assert response.status_code == authorised_status(path), (path, key_scope)
                    else:
                        assert_unauthorized(response, f"({scope} scope)")
                assert call(client, method, path, body, {"X-API-Key": KEY}).status_code == authorised_status(path)


def test_a_write_key_without_a_read_key_is_refused_at_start():
    """Writes guarded, reads open by accident: a configuration error that says what to set."""
    with pytest.raises(ValidationError) as error:
        Settings(write_key=KEY)
    assert "CLLM4REC_READ_KEY" in str(error.value) and KEY not in str(error.value)
    assert Settings(write_key=KEY, auth_reads=False).scope_keys("read") == []  # the explicit opt-out


def test_without_a_key_everything_is_open(tiny_checkpoint, user_id):
    with running_server(server_settings(tiny_checkpoint, api_key="")) as server, server.client() as client:
        assert server.app.state.settings.api_key is None  # empty means unset
        for method, path, body in reads(user_id) + writes(user_id):
            assert call(client, method, path, body).status_code == authorised_status(path), path


def from_another_host(app, method: str, path: str, body: dict | None, headers: dict | None = None):
    """A request to the app as a client at a documentation address (RFC 5737) would send it."""
    async def send():
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, json=body, headers=headers)
    return asyncio.run(send())


def test_without_a_key_admin_calls_come_from_this_host_only(tiny_checkpoint, user_id):
    reload = ADMIN[0]
    with running_server(server_settings(tiny_checkpoint, api_key="")) as server, server.client() as client:
        assert call(client, *reload).status_code == 400  # loopback: authorised (a bad path, so 400)
        remote = from_another_host(server.app, *reload)
        assert remote.status_code == 403, remote.text
        assert "the admin endpoints answer this host only" in remote.json()["detail"]
        assert from_another_host(server.app, *writes(user_id)[0]).status_code == 200  # other writes stay open
        assert metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="forbidden") == 1
    with running_server(server_settings(tiny_checkpoint, api_key=KEY)) as server:
        assert_unauthorized(from_another_host(server.app, *reload), "needs a key (admin scope)")
        assert from_another_host(server.app, *reload, headers={"X-API-Key": KEY}).status_code == 400


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """The check goes through hmac.compare_digest on fixed-length digests, whatever is offered."""
    compared = []
    compare_digest = hmac.compare_digest

    def spy(a, b):
        compared.append((len(a), len(b)))
        return compare_digest(a, b)
    monkeypatch.setattr(dependencies.hmac, "compare_digest", spy)
    assert dependencies.keys_match(KEY, KEY)
    assert not dependencies.keys_match("x", KEY)
    assert not dependencies.keys_match(KEY + "-and-more", KEY)
    assert compared == [(32, 32)] * 3


@pytest.mark.parametrize("key", ["too-short", "sixteen chars w/ spaces", "ключ-ключ-ключ-ключ"])
@pytest.mark.parametrize("setting", ["api_key", "read_key", "write_key", "admin_key"])
def test_weak_or_unsendable_keys_are_refused_without_echoing_them(key, setting):
    with pytest.raises(ValidationError) as error:
        Settings(**{setting: key}, auth_reads=False)
    assert "at least 16 printable ASCII characters" in str(error.value)
    assert key not in str(error.value)
