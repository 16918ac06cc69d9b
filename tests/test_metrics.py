"""GET /metrics, read with prometheus_client's own parser, on real uvicorn processes (one, or two workers)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer, Subprocess, start_together

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


def settled(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A scrape once no stream is in progress (a turn is counted just after its client has seen the end)."""
    deadline = time.monotonic() + 10
    while value(samples := scrape(None, url), "parley_streams_in_progress") != 0:
        assert time.monotonic() < deadline, "a stream stayed in progress"
        time.sleep(0.02)
    return samples


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
    gone = subprocess.Popen(["true"])  # a process that has exited: its pid names no uvicorn now
    gone.wait()
    left_behind = Path(tempfile.gettempdir()) / f"parley-metrics-{gone.pid}"
    left_behind.mkdir()
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}, ("--workers", "2")).start()
    assert server.process is not None
    shared = Path(tempfile.gettempdir()) / f"parley-metrics-{server.process.pid}"
    assert not left_behind.exists()  # a uvicorn that has exited leaves no directory for long
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


WORDS = " ".join(f"w{i}" for i in range(200))


async def test_a_chat_and_a_cancel_move_the_interaction_metrics(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.02"}).start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        session_id = (await client.post("/api/v1/sessions")).json()["ui_session_id"]
        before = scrape(None, server.url)
        reply = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "one two three"})
        assert reply.text == "one two three"
        after_chat = scrape(None, server.url)

        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}) as r:
            chunks = r.aiter_text()
            await anext(chunks)
            during = scrape(None, server.url)
            rejoin = f"/api/v1/chat/{session_id}/stream"
            async with client.stream("GET", rejoin, headers={"accept": "text/plain"}) as follower:
                assert follower.status_code == 200
                await anext(follower.aiter_text())
            cancel = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
            assert cancel.json()["cancelled"] is True
            async for _ in chunks:
                pass
        idle = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
        assert idle.json()["cancelled"] is False
        after = settled(server.url)

    def moved(name: str, since: dict[tuple[str, frozenset[tuple[str, str]]], float], **labels: str) -> float:
        return value(after, name, **labels) - value(since, name, **labels)

    echo = {"agent": "echo"}
    assert (
        value(after_chat, "parley_interactions_total", status="complete", **echo)
        - value(before, "parley_interactions_total", status="complete", **echo)
        == 1
    )
    assert (
        value(after_chat, "parley_tokens_streamed_total", **echo)
        - value(before, "parley_tokens_streamed_total", **echo)
        == 3
    )
    assert value(during, "parley_streams_in_progress") == 1
    assert value(after, "parley_streams_in_progress") == 0
    assert moved("parley_interactions_total", after_chat, status="cancelled", **echo) == 1
    assert moved("parley_interactions_total", after_chat, status="complete", **echo) == 0
    assert moved("parley_cancel_requests_total", after_chat, result="cancelled_here") == 1
    assert moved("parley_cancel_requests_total", after_chat, result="not_running") == 1
    assert moved("parley_rejoins_total", after_chat) == 1
    route = "/api/v1/chat/{session_id}/stream"
    assert moved("parley_http_requests_total", after_chat, method="GET", route=route, status="200") == 1
    assert moved("parley_time_to_first_token_seconds_count", before, **echo) == 2
    assert moved("parley_interaction_duration_seconds_count", before, **echo) == 2


@pytest.mark.redis
async def test_a_cancel_through_another_process_is_counted_there_as_elsewhere(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.02"}
    a, b = start_together(
        subprocesses({**env, "PARLEY_DATA_DIR": str(tmp_path / "a")}),
        subprocesses({**env, "PARLEY_DATA_DIR": str(tmp_path / "b")}),
    )
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        chat = {"ui_session_id": session_id, "message": WORDS}
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=chat) as response:
            chunks = response.aiter_text()
            await anext(chunks)
            assert value(scrape(None, a.url), "parley_streams_in_progress") == 1
            cancel = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id})
            assert cancel.json()["cancelled"] is True
            async for _ in chunks:
                pass
    on_a, on_b = settled(a.url), scrape(None, b.url)
    assert value(on_b, "parley_cancel_requests_total", result="cancelled_elsewhere") == 1
    assert value(on_a, "parley_interactions_total", agent="echo", status="cancelled") == 1
    assert value(on_a, "parley_streams_in_progress") == 0


async def test_two_workers_count_interactions_and_streams_together(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    # 0.1 s a word: the 50-word reply below streams for 5 s, so that the four scrapes made while it runs find it
    # running even on a loaded machine (at 0.02 s a word, it could end before they were answered).
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.1"}
    server = subprocesses(env, ("--workers", "2")).start()
    sessions = []
    for _ in range(6):  # a new client (so a new connection) each: the workers share them out
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:
            sessions.append((await fresh.post("/api/v1/sessions")).json()["ui_session_id"])
            reply = await fresh.post("/api/v1/chat", data={"ui_session_id": sessions[-1], "message": "a b"})
            assert reply.text == "a b"
    async with httpx.AsyncClient(timeout=10) as client:
        chat = {"ui_session_id": sessions[0], "message": " ".join(WORDS.split()[:50])}
        async with client.stream("POST", f"{server.url}/api/v1/chat", data=chat) as response:
            chunks = response.aiter_text()
            await anext(chunks)
            for _ in range(4):  # whichever worker answers, it sees the stream of the other
                assert value(scrape(None, server.url), "parley_streams_in_progress") == 1
            async for _ in chunks:
                pass
    for _ in range(4):
        samples = settled(server.url)
        assert value(samples, "parley_interactions_total", agent="echo", status="complete") == 7
        assert value(samples, "parley_tokens_streamed_total", agent="echo") == 6 * 2 + 50
        assert value(samples, "parley_streams_in_progress") == 0


@pytest.mark.parametrize("token", [None, "operators-token-0123456789"])
def test_with_api_keys_a_scrape_needs_the_operators_token_not_an_owners_key(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, token: str | None
) -> None:
    # Metrics count every owner's sessions: they are for operators, not for whoever holds a key.
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_API_KEYS": "alice:alice-key,bob:bob-key"}
    if token is not None:
        env["PARLEY_METRICS_TOKEN"] = token
    server = subprocesses(env).start()
    refused = httpx.get(f"{server.url}/metrics")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    for headers in ({"x-api-key": "nobody's"}, {"authorization": "Bearer bob-key"}, {"x-api-key": "alice-key"}):
        answer = httpx.get(f"{server.url}/metrics", headers=headers)
        assert answer.status_code == 401 and "parley_" not in answer.text
    if token is not None:
        for headers in ({"authorization": f"Bearer {token}"}, {"x-api-key": token}):
            scraped = httpx.get(f"{server.url}/metrics", headers=headers)
            assert scraped.status_code == 200 and "parley_http_requests_total" in scraped.text
        # The operators' token is no owner's key.
        assert httpx.get(f"{server.url}/api/v1/sessions", headers={"x-api-key": token}).status_code == 401
    for probe in ("/healthz", "/readyz", "/api/v1/openapi.json"):  # probes and the document stay open
        assert httpx.get(f"{server.url}{probe}").status_code == 200


def test_without_api_keys_a_token_still_guards_the_metrics(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    open_mode = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "open")}).start()
    assert httpx.get(f"{open_mode.url}/metrics").status_code == 200  # open mode: everyone is the operator
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_METRICS_TOKEN": "operators-token"}
    server = subprocesses(env).start()
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer operators-token"}).status_code == 200
    assert httpx.get(f"{server.url}/api/v1/sessions").status_code == 200  # the API itself stays open
