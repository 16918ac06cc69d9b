from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import httpx

from parley.agents.base import Turn, UpstreamError
from parley.agents.event_stream import sse_data
from parley.settings import Settings

_SECRETS = re.compile(r"\b(sk|key|token)[-_][A-Za-z0-9_*-]{6,}", re.IGNORECASE)


class OpenAIAgent:
    """Streams replies from any server that speaks the OpenAI chat-completions API (OpenAI, vLLM, Ollama,
    llama.cpp's server, LM Studio), over one shared ``httpx.AsyncClient``.

    Closing the reply (a cancel, a disconnect, a deleted session) closes the upstream response, and with
    it the connection, so the model server stops generating at once.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        system_prompt: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        history_limit: int = 100,
    ) -> None:
        self.history_limit = history_limit
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.description = f"{model} at {base_url}"
        self._api_key = api_key
        self.system_prompt = system_prompt
        self.timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=None)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Made on first use, so it also works when the app is mounted without its lifespan.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                # Every stream holds a connection: the pool must not make chats queue behind each other.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def payload(self, turn: Turn) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.extend({"role": entry.role, "content": entry.content} for entry in turn.history)
        content = turn.message
        for f in turn.files:
            if f.text is not None:
                content += f"\n\n--- file: {f.filename} ({f.mime_type}, {f.size} bytes) ---\n{f.text}"
            else:
                content += f"\n\n[file: {f.filename} ({f.mime_type}, {f.size} bytes); its content is not text]"
        messages.append({"role": "user", "content": content})
        return {"model": self.model, "messages": messages, "stream": True}

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        headers = {"accept": "text/event-stream"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        request = self.client.build_request("POST", self.url, json=self.payload(turn), headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _upstream("the model server did not answer in time.") from None
        except httpx.TransportError:
            raise _upstream("could not connect to the model server.") from None
        try:
            if response.status_code >= 300:
                raise _upstream(await self._describe_failure(response))
            async with aclosing(sse_data(response.aiter_bytes())) as events:
                async for data in events:
                    if data.strip() == "[DONE]":
                        return
                    token = self._token(data)
                    if token:
                        yield token
        except httpx.TimeoutException:
            raise _upstream("the model server stopped sending.") from None
        except httpx.TransportError:
            raise _upstream("the connection to the model server broke.") from None
        finally:
            # Closing an unfinished response drops its connection: this is what stops the model.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def _token(self, data: str) -> str | None:
        try:
            event = json.loads(data)
        except ValueError:
            raise _upstream("the model server sent something that is not JSON.") from None
        if not isinstance(event, dict):
            raise _upstream("the model server sent an unexpected event.")
        if "error" in event:
            raise _upstream(self._redact(_error_message(event["error"])))
        try:
            content = event["choices"][0]["delta"].get("content") if event.get("choices") else None
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _upstream("the model server sent an unexpected event.") from None
        return content if isinstance(content, str) else None

    async def _describe_failure(self, response: httpx.Response) -> str:
        reason = f"{response.status_code} {response.reason_phrase}".strip()
        body = b""
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > 8192:
                break
        try:
            detail = _error_message(json.loads(body).get("error"))
        except (ValueError, AttributeError):
            detail = ""
        return f"{reason}: {self._redact(detail)}" if detail else reason

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _SECRETS.sub("***", text)[:300]


def _upstream(detail: str) -> UpstreamError:
    return UpstreamError(f"Upstream model error: {detail}")


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "unknown error")
    return str(error) if error else "unknown error"


def from_settings(settings: Settings) -> OpenAIAgent | None:
    """Configured by PARLEY_OPENAI_*: present when PARLEY_OPENAI_BASE_URL is set."""
    if not settings.openai_base_url:
        return None
    return OpenAIAgent(
        settings.openai_base_url,
        settings.openai_model,
        api_key=settings.openai_api_key,
        system_prompt=settings.openai_system_prompt,
        connect_timeout=settings.openai_connect_timeout,
        read_timeout=settings.openai_read_timeout,
        history_limit=settings.openai_history_messages,
    )
