"""The OpenAPI document: it names every route and only routes, and Schemathesis holds the running app to it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from parley.app import create_app
from tests.conftest import Subprocess, make_settings

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# `make test` runs a short, repeatable pass; `make fuzz` (PARLEY_FUZZ_EXAMPLES=...) a long one.
EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("PARLEY_FUZZ_SEED", "20261129")


def routes_of(metrics: bool, tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(make_settings(tmp_path, metrics=metrics))
    return {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # (Starlette adds HEAD to every GET)
    }


@pytest.mark.parametrize("metrics", [True, False])
def test_the_document_names_every_route_and_nothing_else(tmp_path: Path, metrics: bool) -> None:
    app = create_app(make_settings(tmp_path, metrics=metrics))
    document = app.state.openapi
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    routes = routes_of(metrics, tmp_path)
    assert routes - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routes == set(), "operations in the OpenAPI document that no route serves"
    assert ("/metrics", "get") in documented if metrics else ("/metrics", "get") not in documented


def test_the_page_is_documented_only_when_it_is_served(tmp_path: Path) -> None:
    without = create_app(make_settings(tmp_path), ui=False)
    documented = set(without.state.openapi["paths"])
    assert "/" not in documented and "/ui/app.js" not in documented
    assert {route.path for route in without.routes if isinstance(route, Route)} == documented


def test_with_api_keys_it_names_the_schemes_and_every_401(tmp_path: Path) -> None:
    document = create_app(make_settings(tmp_path, api_keys="alice:alice-key")).state.openapi
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey", "operatorToken"}
    assert document["security"] == [{"bearer": []}, {"apiKey": []}]
    for path in ("/api/v1/sessions", "/api/v1/chat"):
        for operation in document["paths"][path].values():
            assert "401" in operation["responses"] and "security" not in operation
    # The metrics are the operator's: an owner's key is not what opens them.
    (metrics,) = document["paths"]["/metrics"].values()
    assert (
        metrics["security"] == [{"operatorToken": []}]
        and "PARLEY_METRICS_TOKEN" in metrics["responses"]["401"]["description"]
    )
    for path in ("/healthz", "/readyz", "/api/v1/openapi.json", "/"):
        (operation,) = document["paths"][path].values()
        assert operation["security"] == [] and "401" not in operation["responses"]
    assert "securitySchemes" not in create_app(make_settings(tmp_path)).state.openapi["components"]


def test_with_a_metrics_token_only_the_metrics_need_a_token(tmp_path: Path) -> None:
    document = create_app(make_settings(tmp_path, metrics_token="ops-token")).state.openapi
    assert set(document["components"]["securitySchemes"]) == {"operatorToken"} and "security" not in document
    (metrics,) = document["paths"]["/metrics"].values()
    assert metrics["security"] == [{"operatorToken": []}] and "401" in metrics["responses"]
    for operation in document["paths"]["/api/v1/sessions"].values():
        assert "401" not in operation["responses"] and "security" not in operation


def test_every_operation_has_an_id_and_every_status_a_schema(tmp_path: Path) -> None:
    document = create_app(make_settings(tmp_path)).state.openapi
    assert document["openapi"].startswith("3.1")
    ids = [operation["operationId"] for operations in document["paths"].values() for operation in operations.values()]
    assert len(ids) == len(set(ids))
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                assert response.get("content") or status == "204", (operation["operationId"], status)


def test_it_is_served(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}).start()
    response = httpx.get(f"{server.url}/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == create_app(make_settings(tmp_path)).state.openapi


@pytest.mark.parametrize("keys", [False, True], ids=["open", "api-keys"])
def test_schemathesis_finds_nothing(subprocesses: Callable[..., Subprocess], tmp_path: Path, keys: bool) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data")}
    if keys:
        env["PARLEY_API_KEYS"] = "alice:alice-key"
    server = subprocesses(env).start()
    # Each operation gets EXAMPLES cases in each phase (examples, coverage, fuzzing), then the stateful phase
    # follows the document's links: create a session, chat in it, cancel, upload, read, delete.
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/api/v1/openapi.json",
        "--checks", CHECKS, "--seed", SEED, "--max-examples", str(EXAMPLES), "--workers", "1",
        "--request-timeout", "10", "--suppress-health-check", "too_slow",
        *(("--header", "Authorization: Bearer alice-key") if keys else ()),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    print(result.stdout)  # (shown by `make fuzz`, which runs pytest -s)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 passed" not in result.stdout and "passed" in result.stdout, result.stdout
