"""``uvicorn app:app`` as its own process: history survives a restart, and a crash mid-stream is recorded."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Subprocess


def test_sessions_and_history_survive_a_restart(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data")}
    first = subprocesses(env).start()
    session_id = httpx.post(f"{first.url}/api/v1/sessions").json()["ui_session_id"]
    reply = httpx.post(f"{first.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "remember me"})
    assert reply.text == "remember me"
    first.stop()

    second = subprocesses(env).start()
    assert httpx.get(f"{second.url}/api/v1/sessions/{session_id}").status_code == 200
    history = httpx.get(f"{second.url}/api/v1/sessions/{session_id}/messages").json()["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "remember me", "complete"),
        ("assistant", "remember me", "complete"),
    ]
    assert (tmp_path / "data" / "parley.db").exists()


def test_a_crash_mid_stream_is_recorded_as_interrupted(subprocesses: Callable[..., Subprocess], tmp_path: Path) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.05"}
    first = subprocesses(env).start()
    session_id = httpx.post(f"{first.url}/api/v1/sessions").json()["ui_session_id"]
    data = {"ui_session_id": session_id, "message": " ".join(["word"] * 100)}
    with httpx.stream("POST", f"{first.url}/api/v1/chat", data=data) as response:
        # Keep the iterator: a dropped one is closed at once, and closing it closes the connection (httpcore), so
        # the server could record 'disconnected' before the kill.
        chunks = response.iter_raw()
        assert next(chunks)  # the stream had begun
        first.stop(kill=True)  # kill -9, mid-stream, its client still connected: nothing runs after this

    second = subprocesses(env).start()
    history = httpx.get(f"{second.url}/api/v1/sessions/{session_id}/messages").json()["messages"]
    assert [(m["role"], m["status"]) for m in history] == [("user", "complete"), ("assistant", "interrupted")]
    assert httpx.get(f"{second.url}/api/v1/sessions/{session_id}").json()["status"] == "idle"
    started = time.monotonic()
    again = httpx.post(f"{second.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "still here"})
    assert again.text == "still here"
    assert time.monotonic() - started < 5


def test_a_shutdown_that_stops_waiting_records_the_partial_reply(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.05"}
    first = subprocesses(env, ("--timeout-graceful-shutdown", "1")).start()
    session_id = httpx.post(f"{first.url}/api/v1/sessions").json()["ui_session_id"]
    received = b""
    data = {"ui_session_id": session_id, "message": " ".join(["word"] * 200)}
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("POST", f"{first.url}/api/v1/chat", data=data) as r:
        for chunk in r.iter_raw():
            received += chunk
            if received.count(b"word") == 3:
                assert first.process is not None
                first.process.terminate()  # SIGTERM: uvicorn waits 1 s for the stream, then cancels it
    assert first.process is not None
    assert first.process.wait(10) in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal it got

    second = subprocesses(env).start()
    history = httpx.get(f"{second.url}/api/v1/sessions/{session_id}/messages").json()["messages"]
    assert (history[-1]["status"], history[-1]["content"]) == ("interrupted", received.decode())
