"""The chat response driven directly through ASGI with a scripted receive/send: no client buffering in between."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest

from parley.app import create_app
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio


def _scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def call(app: Any, path: str, fields: dict[str, str], disconnect_when: Callable[[list[Any]], bool]) -> list[Any]:
    """Call the app; after the body, ``receive`` reports a disconnect once ``disconnect_when(sent)`` holds."""
    body = urlencode(fields).encode()
    sent: list[Any] = []
    changed = anyio.Event()
    body_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal body_delivered, changed
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not disconnect_when(sent):
            await changed.wait()
            changed = anyio.Event()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        changed.set()

    with anyio.fail_after(10):
        await app(_scope(path, body), receive, send)
    return sent


def _body_chunks(sent: list[Any]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]


def _complete(sent: list[Any]) -> bool:
    return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in sent)


async def _history(app: Any, session_id: str) -> list[Any]:
    parley = await app.state.parley.ready()
    return list(await parley.store.list_messages(session_id))


async def _session(app: Any) -> str:
    parley = await app.state.parley.ready()
    from parley.sessions.store import Session, utcnow

    await parley.store.create_session(Session("ses_scripted", "echo", utcnow()))
    return "ses_scripted"


async def test_a_disconnect_reported_after_the_response_ended_is_not_a_disconnected_reply(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, echo_delay=0.001))
    session_id = await _session(app)
    sent = await call(app, "/api/v1/chat", {"ui_session_id": session_id, "message": "a b c"}, _complete)
    assert sent[0]["status"] == 200
    assert b"".join(_body_chunks(sent)) == b"a b c"
    assert _complete(sent)
    history = await _history(app, session_id)
    assert (history[-1].status, history[-1].content) == ("complete", "a b c")


async def test_one_body_message_per_token(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    session_id = await _session(app)
    sent = await call(app, "/api/v1/chat", {"ui_session_id": session_id, "message": "one two  three\n"}, _complete)
    assert _body_chunks(sent) == [b"one ", b"two  ", b"three\n"]


async def test_a_disconnect_mid_stream_stops_it_and_is_recorded(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, echo_delay=0.01))
    session_id = await _session(app)
    message = " ".join(str(i) for i in range(100))

    def after_three_tokens(sent: list[Any]) -> bool:
        return len(_body_chunks(sent)) >= 3

    sent = await call(app, "/api/v1/chat", {"ui_session_id": session_id, "message": message}, after_three_tokens)
    streamed = b"".join(_body_chunks(sent)).decode()
    assert 3 <= len(streamed.split()) < 100
    history = await _history(app, session_id)
    assert (history[-1].status, history[-1].content) == ("disconnected", streamed)
    assert app.state.parley.interactions.get(session_id) is None


async def test_a_disconnect_before_the_first_token_records_an_empty_disconnected_reply(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, echo_delay=0.5))
    session_id = await _session(app)
    sent = await call(app, "/api/v1/chat", {"ui_session_id": session_id, "message": "slow"}, lambda sent: True)
    assert _body_chunks(sent) == []
    history = await _history(app, session_id)
    assert (history[-1].status, history[-1].content) == ("disconnected", "")
