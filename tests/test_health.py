"""/healthz says the process runs; /readyz whether it can serve: its store, and Redis when configured."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import RedisServer, Subprocess


def test_ready_on_the_embedded_store(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}).start()
    response = httpx.get(f"{server.url}/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"store": "ok"}}
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


@pytest.mark.redis
def test_not_ready_while_redis_is_stopped_and_ready_again_after(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_REDIS_URL": redis_server.url}).start()
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ok", "checks": {"store": "ok", "redis": "ok"}}

    redis_server.stop()
    down = httpx.get(f"{server.url}/readyz", timeout=5)
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "error"
    assert body["checks"]["redis"] != "ok" and body["checks"]["store"] != "ok"
    assert "redis is down" in body["message"]
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # alive all the same

    redis_server.start()
    # Ready again without a restart: a pooled connection that died with the old Redis may fail one probe first.
    deadline = time.monotonic() + 10
    while (again := httpx.get(f"{server.url}/readyz", timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.1)
    assert again.json() == {"status": "ok", "checks": {"store": "ok", "redis": "ok"}}
