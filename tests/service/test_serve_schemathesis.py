"""Schemathesis over the OpenAPI schema against a real server (uvicorn, the tiny checkpoint, an API
key on reads and writes): generated valid and invalid requests to every operation never get a 5xx,
and every response has a status code the schema declares and a body that matches it.

The run is bounded (examples per operation, a fixed seed) to about a minute on 2 cores; the same
command against any running server: schemathesis run URL/openapi.json --checks ... (docs/serving.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving_helpers import running_server, server_settings

KEY = "schemathesis-key-0123456789"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


def schemathesis_command() -> str:
    found = shutil.which("schemathesis") or shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return found


@pytest.mark.timeout(300)
def test_no_server_error_and_every_response_matches_the_schema(tiny_checkpoint, tmp_path):
    settings = server_settings(tiny_checkpoint, api_key=KEY, auth_reads=True)
    with running_server(settings) as server:
        result = subprocess.run(
            [schemathesis_command(), "run", f"{server.url}/openapi.json", "--checks", CHECKS,
             "--phases", "examples,coverage,fuzzing", "--max-examples", "100", "--seed", "1", "--workers", "1",
             "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "30", "--no-color"],
            capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
