"""The log lines of a real ``uvicorn app:app``, in both formats: what they say, and what they never say."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from parley import logs
from parley.app import create_app
from parley.sessions.sqlite import SQLiteStore
from parley.sessions.store import Session
from tests.conftest import LiveServer, Subprocess, make_settings
from tests.openai_stub import OpenAIStub

KEY = "sk-planted-0123456789abcdef"
MESSAGE = "planted message zebra-quartz-4711"
FILE_TEXT = "planted file content mango-sierra-0815"


def run_a_day(server: Subprocess, stub: OpenAIStub) -> None:
    """A chat with a file, a reply that fails mid-stream, one that fails before it starts (502)."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        echo = client.post("/api/v1/sessions", json={"agent": "echo"}).json()["ui_session_id"]
        upload = client.post(
            "/api/v1/files", data={"ui_session_id": echo}, files={"file": ("notes.txt", FILE_TEXT.encode())}
        )
        file_id = upload.json()["id"]
        form = {"ui_session_id": echo, "message": MESSAGE, "file_ids": json.dumps([file_id])}
        reply = client.post("/api/v1/chat", data=form, headers={"x-request-id": "req-chat-1"})
        assert reply.status_code == 200 and MESSAGE in reply.text
        assert reply.headers["x-request-id"] == "req-chat-1"

        model = client.post("/api/v1/sessions", json={"agent": "openai"}).json()["ui_session_id"]
        stub.behaviour = "error-event"
        with pytest.raises(httpx.RemoteProtocolError):  # the aborted stream: no terminating chunk
            client.post("/api/v1/chat", data={"ui_session_id": model, "message": MESSAGE})
        stub.behaviour = "broken"
        failed = client.post(
            "/api/v1/chat", data={"ui_session_id": model, "message": MESSAGE}, headers={"x-request-id": "req-502"}
        )
        assert failed.status_code == 502
        assert failed.headers["x-request-id"] == "req-502"
        fresh = client.get("/healthz")
        assert re.fullmatch("[0-9a-f]{24,}", fresh.headers["x-request-id"])  # one of parley's own
    server.stop()


@pytest.fixture
def stub_url(serve: Callable[..., LiveServer]) -> tuple[OpenAIStub, str]:
    stub = OpenAIStub(delay=0.001)
    return stub, serve(stub).url + "/v1"


def start(subprocesses: Callable[..., Subprocess], tmp_path: Path, stub_url: str, log_format: str) -> Subprocess:
    env = {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_OPENAI_BASE_URL": stub_url,
        "PARLEY_OPENAI_API_KEY": KEY,
        "PARLEY_LOG_FORMAT": log_format,
    }
    return subprocesses(env, log=tmp_path / "log").start()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_never_hold_content_or_keys(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, stub_url: tuple[OpenAIStub, str], log_format: str
) -> None:
    stub, url = stub_url
    run_a_day(start(subprocesses, tmp_path, url, log_format), stub)
    log = (tmp_path / "log").read_text()
    assert "req-chat-1" in log  # (the log is the one the day was logged in)
    for secret in (KEY, MESSAGE, "zebra-quartz", FILE_TEXT, "mango-sierra"):
        assert secret not in log
    # The mid-stream failure is expected: parley logs it once, in its words, without the server's traceback.
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
    assert log.count("agent failed mid-stream") == 1


def test_text_lines_carry_the_request_id(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, stub_url: tuple[OpenAIStub, str]
) -> None:
    stub, url = stub_url
    run_a_day(start(subprocesses, tmp_path, url, "text"), stub)
    lines = (tmp_path / "log").read_text().splitlines()
    (access,) = [line for line in lines if "POST /api/v1/chat" in line and "req-chat-1" in line]
    assert access.startswith("INFO:") and "200" in access
    (failed,) = [line for line in lines if "request failed" in line]
    assert failed.startswith("ERROR:")
    assert "status=502" in failed and "route=/api/v1/chat" in failed and "request_id=req-502" in failed
    assert "Upstream model error" in failed
    (chat,) = [line for line in lines if "interaction ended" in line and "request_id=req-chat-1" in line]
    assert chat.startswith("INFO:")
    for field in ("session_id=ses_", "interaction_id=int_", "agent=echo", "status=complete", "reason=complete"):
        assert field in chat
    assert re.search(r" tokens=[1-9]", chat) and re.search(r" time_to_first_token=[0-9.]+ duration=[0-9.]+", chat)


def test_json_lines_are_json_objects_with_the_request_id(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, stub_url: tuple[OpenAIStub, str]
) -> None:
    stub, url = stub_url
    run_a_day(start(subprocesses, tmp_path, url, "json"), stub)
    lines = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert {"uvicorn.error", "uvicorn.access", "parley"} <= {line["logger"] for line in lines}
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access_lines = [line for line in lines if line["logger"] == "uvicorn.access"]
    (access,) = [line for line in access_lines if line.get("request_id") == "req-chat-1"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/api/v1/chat", 200)
    (failed,) = [line for line in lines if line["message"] == "request failed"]
    assert failed["level"] == "ERROR" and failed["request_id"] == "req-502"
    assert (failed["route"], failed["status"]) == ("/api/v1/chat", 502)
    assert failed["error"].startswith("Upstream model error")
    (mid_stream,) = [line for line in lines if "agent failed mid-stream" in line["message"]]
    assert mid_stream["level"] == "WARNING" and mid_stream["request_id"]

    ended = {line["request_id"]: line for line in lines if line["message"] == "interaction ended"}
    assert len(ended) == 3  # the echo chat, the one that failed mid-stream, the 502
    chat = ended["req-chat-1"]
    assert chat["level"] == "INFO" and chat["logger"] == "parley"
    assert (chat["agent"], chat["status"], chat["reason"]) == ("echo", "complete", "complete")
    assert chat["session_id"].startswith("ses_") and chat["interaction_id"].startswith("int_")
    assert chat["tokens"] > 0 and 0 <= chat["time_to_first_token"] <= chat["duration"]
    assert "owner" in chat
    failed_turn = ended["req-502"]
    assert (failed_turn["agent"], failed_turn["status"], failed_turn["tokens"]) == ("openai", "error", 0)
    assert failed_turn["time_to_first_token"] is None and failed_turn["error"].startswith("Upstream model error")
    assert ended[mid_stream["request_id"]]["status"] == "error"


def test_uvicorns_log_level_applies_to_parleys_lines(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, stub_url: tuple[OpenAIStub, str]
) -> None:
    stub, url = stub_url
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_OPENAI_BASE_URL": url}
    server = subprocesses(env, ("--log-level", "warning"), log=tmp_path / "log").start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        echo = client.post("/api/v1/sessions", json={"agent": "echo"}).json()["ui_session_id"]
        assert client.post("/api/v1/chat", data={"ui_session_id": echo, "message": "hi"}).status_code == 200
        model = client.post("/api/v1/sessions", json={"agent": "openai"}).json()["ui_session_id"]
        stub.behaviour = "broken"
        failed = client.post("/api/v1/chat", data={"ui_session_id": model, "message": "hi"})
        assert failed.status_code == 502
    server.stop()
    logged = (tmp_path / "log").read_text()
    assert "request failed" in logged  # an ERROR line still is
    assert "interaction ended" not in logged  # an INFO line is not


class _BuggyStore(SQLiteStore):
    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        raise RuntimeError("a bug")


@pytest.mark.anyio
async def test_a_bug_is_answered_500_with_the_request_id_and_logged_once_with_its_traceback(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    app = create_app(make_settings(tmp_path), store=_BuggyStore(tmp_path / "buggy.db"))
    # As `uvicorn app:app` does: parley's log set-up (a library leaves logging to its host unless asked).
    logs.configure("text")
    server = serve(app)  # (a real uvicorn: its own report of the bug is dropped, parley's line says it all)
    loggers = [logging.getLogger("parley"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        async with server.client() as client:
            response = await client.get("/api/v1/sessions", headers={"x-request-id": "req-bug"})
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert response.status_code == 500
    assert response.json()["message"] == "Internal server error: the request could not be processed."
    assert response.headers.get_list("x-request-id") == ["req-bug"]
    (record,) = [record for record in records if record.levelno >= logging.WARNING]
    assert record.levelname == "ERROR" and record.getMessage() == "request failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert record.fields["status"] == 500 and record.fields["error"] == "RuntimeError: a bug"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_debug_answers_a_bug_with_its_traceback(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), store=_BuggyStore(tmp_path / "buggy.db"), debug=True)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://parley") as client:
        response = await client.get("/api/v1/sessions", headers={"accept": "text/plain"})
    assert response.status_code == 500
    assert "Traceback" in response.text and "RuntimeError: a bug" in response.text
