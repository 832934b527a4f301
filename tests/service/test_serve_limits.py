"""Input limits over real HTTP, with limits lowered by settings: body size (413 before parsing, for
a declared length and for a chunked body), history length, k, users per batch, id length and
characters (422 saying what is wrong), and an OpenAPI schema that states the same limits."""

from __future__ import annotations

import socket
import time

import pytest

from serving_helpers import metric_value, running_server, server_settings

LIMITS = dict(max_body_bytes=4000, max_history_items=5, max_k=50, max_batch_users=3, max_id_length=16)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(server_settings(tiny_checkpoint, **LIMITS)) as running:
        yield running


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def detail_of(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " ".join(error["msg"] for error in detail)


def test_body_over_the_limit_is_413_before_parsing(client):
    before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="too_large")
    big = b'{"user_id": "u1", "history": [' + b'"i1",' * 1000 + b'"i1"]}'
    assert len(big) > LIMITS["max_body_bytes"]
    declared = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    # no Content-Length: the body arrives in chunks and is cut off once past the limit
    chunked = client.post("/interactions", content=iter([big[:3000], big[3000:]]),
                          headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert detail_of(response) == "the request body is larger than 4000 bytes (CLLM4REC_MAX_BODY_BYTES)"
    assert metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="too_large") == before + 2
    # within the limit, chunked or not, the body reaches the route
    small = b'{"user_id": "u1", "item_ids": ["i1"]}'
    assert client.post("/interactions", content=iter([small[:10], small[10:]]),
                       headers={"content-type": "application/json"}).status_code == 200


def test_a_client_leaving_mid_body_is_recorded_as_499_not_as_a_server_error(server, client):
    def count(status):
        return metric_value(client.get("/metrics").text, "cllm4rec_http_request_duration_seconds_count",
                            endpoint="unmatched", method="POST", status=status)
    before = count("499")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /interactions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n{\"user_id\": ")
        time.sleep(0.2)  # the server has read the headers and is waiting for the rest of the body
    deadline = time.monotonic() + 5
    while count("499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count("499") == before + 1
    assert count("500") == 0


@pytest.mark.parametrize("method, path, body, message", [
    ("post", "/recommend", {"user_id": "u1", "history": ["i1"] * 6}, "at most 5 items"),
    ("post", "/interactions", {"user_id": "u1", "item_ids": ["i1"] * 6}, "at most 5 items"),
    ("post", "/recommend", {"user_id": "u1", "k": 51}, "less than or equal to 50"),
    ("get", "/recommend/u1?k=51", None, "less than or equal to 50"),
    ("post", "/recommend/batch", {"requests": [{"user_id": "u1"}] * 4}, "at most 3 items"),
    ("post", "/recommend", {"user_id": "u" * 17}, "at most 16 characters"),
    ("get", "/recommend/" + "u" * 17, None, "at most 16 characters"),
    ("post", "/interactions", {"user_id": "u1", "item_ids": ["i" * 17]}, "at most 16 characters"),
    ("post", "/recommend", {"user_id": "u 1"}, "' ' at position 1"),
    ("post", "/recommend", {"user_id": "u1\n"}, "'\\n' at position 2"),
    ("post", "/recommend", {"user_id": "\x00u1"}, "'\\x00' at position 0"),
    ("post", "/interactions", {"user_id": "u1", "item_ids": ["i\u200b1"]}, "'\\u200b' at position 1"),  # zero-width
    ("post", "/recommend", {"user_id": "u\u202e1"}, "'\\u202e' at position 1"),  # right-to-left override
    ("get", "/recommend/u%091", None, "'\\t' at position 1"),
])
def test_over_a_limit_or_a_bad_id_is_422_saying_what_is_wrong(client, method, path, body, message):
    response = client.request(method, path, json=body)
    assert response.status_code == 422, response.text
    assert message in detail_of(response)


def test_ids_may_hold_any_other_printable_character(client):
    for user_id in ("user:42", "a/b", "ユーザー1", "mail@example.org", "ü-ø-ß"):
        response = client.post("/interactions", json={"user_id": user_id, "item_ids": ["i1", "it€m"]})
        assert response.status_code == 200, (user_id, response.text)
        assert client.post("/recommend", json={"user_id": user_id, "k": 50}).status_code == 200


@pytest.mark.parametrize("body", [b"[" * 1500 + b"]" * 1500, b'{"user_id": "\xff\xfe"}'],
                         ids=["nested too deeply", "not UTF-8"])
def test_an_unparsable_body_is_400_as_the_schema_declares(client, body):
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "400" in client.get("/openapi.json").json()["paths"]["/recommend"]["post"]["responses"]


def test_the_openapi_schema_states_the_limits(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    recommend = components["RecommendRequest"]["properties"]
    assert recommend["k"]["maximum"] == 50
    assert recommend["user_id"]["maxLength"] == 16 and recommend["user_id"]["pattern"].startswith("^[^\\x00-\\x20")
    history = next(option for option in recommend["history"]["anyOf"] if option.get("type") == "array")
    assert history["maxItems"] == 5 and history["items"]["maxLength"] == 16
    assert components["BatchRecommendRequest"]["properties"]["requests"]["maxItems"] == 3
    assert components["InteractionsRequest"]["properties"]["item_ids"]["maxItems"] == 5
    path_id = schema["paths"]["/recommend/{user_id}"]["get"]["parameters"][0]["schema"]
    assert path_id["maxLength"] == 16 and "/" in path_id["pattern"]
