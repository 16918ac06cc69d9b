"""The ``openai`` agent against a real OpenAI-compatible stub server on a loopback port."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from parley.app import create_app
from tests.conftest import LiveServer, eventually, free_port, make_settings, messages, new_session
from tests.openai_stub import OpenAIStub

pytestmark = pytest.mark.anyio


@pytest.fixture
def stub() -> OpenAIStub:
    return OpenAIStub()


@pytest.fixture
def stub_url(serve: Callable[..., LiveServer], stub: OpenAIStub) -> str:
    return serve(stub).url + "/v1"


def parley(
    serve: Callable[..., LiveServer], tmp_path: Path, base_url: str, model: str = "tokens", **kw: Any
) -> LiveServer:
    settings = make_settings(
        tmp_path,
        agent="openai",
        openai_base_url=base_url,
        openai_model=model,
        openai_api_key="sk-test-secret-key",
        **kw,
    )
    return serve(create_app(settings))


def test_the_stub_speaks_the_real_protocol(stub: OpenAIStub, stub_url: str) -> None:
    client = openai.OpenAI(base_url=stub_url, api_key="sk-anything")
    stream = client.chat.completions.create(model="tokens", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "".join(stub.tokens)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="unauthorized", messages=[{"role": "user", "content": "hi"}], stream=True)
    client.close()


async def test_tokens_arrive_in_order_and_history_is_sent(
    serve: Callable[..., LiveServer], tmp_path: Path, stub: OpenAIStub, stub_url: str
) -> None:
    server = parley(serve, tmp_path, stub_url, openai_system_prompt="Be brief.")
    async with server.client() as client:
        session_id = await new_session(client)
        assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["agent"] == "openai"
        chunks = []
        data = {"ui_session_id": session_id, "message": "first"}
        async with client.stream("POST", "/api/v1/chat", data=data) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                chunks.append(chunk)
        assert "".join(chunks) == "".join(stub.tokens)
        assert len(chunks) > 1
        second = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "second"})
        assert second.text == "".join(stub.tokens)
    first_call, second_call = stub.calls
    assert first_call.body["stream"] is True
    assert first_call.body["model"] == "tokens"
    assert first_call.headers["authorization"] == "Bearer sk-test-secret-key"
    assert second_call.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "".join(stub.tokens)},
        {"role": "user", "content": "second"},
    ]


async def test_a_cancel_closes_the_upstream_connection(
    serve: Callable[..., LiveServer], tmp_path: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tokens = [f"t{i} " for i in range(500)]
    stub.delay = 0.02
    server = parley(serve, tmp_path, stub_url)
    async with server.client() as client, server.client() as other:
        session_id = await new_session(client)
        received = ""
        answer: httpx.Response | None = None
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "go"}) as r:
            async for chunk in r.aiter_text():
                received += chunk
                # Once: chunks already buffered after the cancel must not send a second one.
                if received.count("t") >= 3 and answer is None:
                    cancelled_at = time.monotonic()
                    answer = await other.post("/api/v1/cancel", data={"ui_session_id": session_id})
        assert answer is not None and answer.json()["cancelled"] is True
        (call,) = stub.calls

        async def upstream_gone() -> bool:
            return call.client_left_at is not None

        await eventually(upstream_gone)
        assert call.client_left_at is not None
        assert call.client_left_at - cancelled_at < 1.0
        assert not call.finished

        async def stub_stopped() -> bool:
            return call.over

        await eventually(stub_stopped)
        assert call.tokens_sent == call.tokens_when_left  # the model stopped generating when parley left
        history = await messages(client, session_id)
        assert (history[-1]["status"], history[-1]["content"]) == ("cancelled", received)


async def test_a_client_disconnect_closes_the_upstream_connection(
    serve: Callable[..., LiveServer], tmp_path: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tokens = [f"t{i} " for i in range(500)]
    server = parley(serve, tmp_path, stub_url)
    async with server.client() as client:
        session_id = await new_session(client)
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "go"}) as r:
            async for _ in r.aiter_text():
                break
        (call,) = stub.calls

        async def upstream_gone() -> bool:
            return call.client_left_at is not None

        await eventually(upstream_gone)
        assert not call.finished


@pytest.mark.parametrize(
    ("model", "contains"),
    [
        ("unauthorized", "401 Unauthorized"),
        ("broken", "500 Internal Server Error"),
        ("garbage", "not JSON"),
    ],
)
async def test_upstream_failures_before_the_first_token_are_502(
    serve: Callable[..., LiveServer], tmp_path: Path, stub_url: str, model: str, contains: str
) -> None:
    server = parley(serve, tmp_path, stub_url, model=model)
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert response.status_code == 502
        body = response.json()
        assert body["status"] == "error"
        assert body["message"].startswith("Upstream model error: ")
        assert contains in body["message"]
        assert "sk-" not in body["message"] and "Traceback" not in body["message"]
        history = await messages(client, session_id)
        assert [(m["role"], m["status"]) for m in history] == [("user", "complete"), ("assistant", "error")]


async def test_a_refused_connection_is_502(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    server = parley(serve, tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
    assert response.status_code == 502
    assert response.json()["message"] == "Upstream model error: could not connect to the model server."


async def test_a_hang_before_the_first_token_is_502_after_the_read_timeout(
    serve: Callable[..., LiveServer], tmp_path: Path, stub_url: str
) -> None:
    server = parley(serve, tmp_path, stub_url, model="hang-before", openai_read_timeout=0.3)
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
    assert response.status_code == 502
    assert "did not answer in time" in response.json()["message"]


@pytest.mark.parametrize("model", ["hang-mid", "error-event"])
async def test_a_failure_mid_stream_aborts_and_records_error(
    serve: Callable[..., LiveServer], tmp_path: Path, stub: OpenAIStub, stub_url: str, model: str
) -> None:
    server = parley(serve, tmp_path, stub_url, model=model, openai_read_timeout=0.3)
    async with server.client() as client:
        session_id = await new_session(client)
        received = ""
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"}
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    received += chunk
        assert received == "".join(stub.tokens[: 2 if model == "hang-mid" else 1])
        history = await messages(client, session_id)
        assert (history[-1]["status"], history[-1]["content"]) == ("error", received)


async def test_the_agent_is_listed_only_when_configured(
    serve: Callable[..., LiveServer], tmp_path: Path, stub_url: str
) -> None:
    async with parley(serve, tmp_path, stub_url).client() as client:
        names = [a["name"] for a in (await client.get("/api/v1/agents")).json()["agents"]]
    assert names == ["echo", "openai"]
    async with serve(create_app(make_settings(tmp_path / "plain"))).client() as client:
        names = [a["name"] for a in (await client.get("/api/v1/agents")).json()["agents"]]
    assert names == ["echo"]
