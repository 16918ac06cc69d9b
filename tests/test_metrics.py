"""GET /metrics, read with prometheus_client's own parser, on real uvicorn processes (one, or two workers)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Subprocess

pytestmark = pytest.mark.anyio


def scrape(client: httpx.Client | None, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = (client or httpx).get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_are_counted_by_route_template_never_by_path(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}).start()
    with httpx.Client(base_url=server.url) as client:
        session_id = client.post("/api/v1/sessions").json()["ui_session_id"]
        for _ in range(3):
            assert client.get(f"/api/v1/sessions/{session_id}").status_code == 200
        assert client.get("/api/v1/sessions/nope").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        samples = scrape(client, server.url)
    route = "/api/v1/sessions/{session_id}"
    assert value(samples, "parley_http_requests_total", method="GET", route=route, status="200") == 3
    assert value(samples, "parley_http_requests_total", method="GET", route=route, status="404") == 1
    assert value(samples, "parley_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "parley_http_request_duration_seconds_count", method="GET", route=route) == 4
    assert value(samples, "parley_http_requests_total", method="POST", route="/api/v1/sessions", status="201") == 1
    assert not any(session_id in str(labels) or "nope" in str(labels) for _, labels in samples)


def test_two_workers_add_up(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}, ("--workers", "2")).start()
    assert server.process is not None
    shared = Path(tempfile.gettempdir()) / f"parley-metrics-{server.process.pid}"
    requests = 0
    # A new connection for each request, until both workers have served some (each writes its own files).
    while len({path.stem.rsplit("_", 1)[-1] for path in shared.glob("counter_*.db")}) < 2:
        assert requests < 400, "the second worker never got a request"
        assert httpx.get(f"{server.url}/api/v1/agents").status_code == 200
        requests += 1
    for _ in range(4):  # whichever worker answers the scrape, it counts every worker's requests
        samples = scrape(None, server.url)
        count = value(samples, "parley_http_requests_total", method="GET", route="/api/v1/agents", status="200")
        assert count == requests


def test_metrics_can_be_turned_off(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_METRICS": "0"}).start()
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    assert "/metrics" not in httpx.get(f"{server.url}/api/v1/openapi.json").json()["paths"]
