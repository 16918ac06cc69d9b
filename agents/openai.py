from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from parley.agents.base import Turn, UpstreamError
from parley.agents.chat_completions import ModelCall, ToolRequest, history_messages, tool_content
from parley.agents.event_stream import sse_data
from parley.agents.events import Event, Step, ToolCall, ToolError, ToolResult
from parley.agents.tools import Tool, Toolbox, ToolFailed
from parley.settings import Settings, SettingsError

logger = logging.getLogger("parley.agents")

_SECRETS = re.compile(r"\b(sk|key|token)[-_][A-Za-z0-9_*-]{6,}", re.IGNORECASE)


class OpenAIAgent:
    """Streams replies from any server that speaks the OpenAI chat-completions API (OpenAI, vLLM, Ollama,
    llama.cpp's server, LM Studio, DeepSeek), over one shared ``httpx.AsyncClient``: the answer's text, the model's
    reasoning (``delta.reasoning_content`` or ``delta.reasoning``, as the server names it), the usage of each model
    call, and, when it has a toolbox, the tool calls the model makes: it runs them and calls the model again with
    their results, until the model answers without a call or ``max_steps`` model calls have been made.

    Closing the reply (a cancel, a disconnect, a deleted session) closes the upstream response, and with
    it the connection, so the model server stops generating at once; a tool call under way is cancelled where it
    is (the toolbox tells its server).
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
        tools: Toolbox | None = None,
        max_steps: int = 8,
        tool_timeout: float = 60.0,
    ) -> None:
        self.history_limit = history_limit
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.description = f"{model} at {base_url}"
        self._api_key = api_key
        self.system_prompt = system_prompt
        self.timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=None)
        self.toolbox = tools
        self.max_steps = max(1, max_steps)
        self.tool_timeout = tool_timeout
        # The name under which the server sends reasoning, learned from its stream: reasoning goes back to it under
        # the same name (DeepSeek refuses a tool-call turn whose reasoning_content was dropped).
        self.reasoning_field = "reasoning_content"
        # Whether requests ask for usage (stream_options); turned off for a server that refuses it.
        self.asks_usage = True
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

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keeps the toolbox's connections open (MCP servers) until cancelled: the app's lifespan runs it."""
        run = getattr(self.toolbox, "run", None)
        if run is None:
            task_status.started()
            return
        await run(task_status=task_status)

    async def list_tools(self) -> Sequence[Tool]:
        return await self.toolbox.list_tools() if self.toolbox is not None else ()

    def messages(self, turn: Turn) -> list[dict[str, Any]]:
        """The conversation the model is given: the system prompt, the history (tool calls and their results
        included, rebuilt from the messages' parts) and the new message."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        for entry in turn.history:
            if entry.role == "assistant" and entry.parts:
                messages.extend(history_messages(entry.parts, entry.content, self.reasoning_field))
            else:
                messages.append({"role": entry.role, "content": entry.content})
        content = turn.message
        for f in turn.files:
            if f.text is not None:
                content += f"\n\n--- file: {f.filename} ({f.mime_type}, {f.size} bytes) ---\n{f.text}"
            else:
                content += f"\n\n[file: {f.filename} ({f.mime_type}, {f.size} bytes); its content is not text]"
        messages.append({"role": "user", "content": content})
        return messages

    def payload(self, turn: Turn, tools: Sequence[Tool] = ()) -> dict[str, Any]:
        return self._payload(self.messages(turn), tools, last=False)

    def _payload(self, messages: list[dict[str, Any]], tools: Sequence[Tool], *, last: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if self.asks_usage:
            payload["stream_options"] = {"include_usage": True}
        if tools:
            payload["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": dict(t.input_schema)},
                }
                for t in tools
            ]
            if last:
                # The last model call this reply may make: it must answer, not call again.
                payload["tool_choice"] = "none"
        return payload

    async def reply(self, turn: Turn) -> AsyncGenerator[Event, None]:
        messages = self.messages(turn)
        tools = await self.list_tools()
        by_name = {tool.name: tool for tool in tools}
        for step in range(self.max_steps):
            last = step == self.max_steps - 1
            yield Step()
            call = ModelCall()
            async with aclosing(self._model_call(self._payload(messages, tools, last=last), call)) as events:
                async for event in events:
                    yield event
            if not call.tool_calls:
                return
            requests = call.finish()
            assistant: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(call.text) or None,
                "tool_calls": [r.message() for r in requests],
            }
            if call.reasoning:
                assistant[self.reasoning_field] = "".join(call.reasoning)
            messages.append(assistant)
            for request in requests:
                yield ToolCall(request.id, request.name, request.input)
            outcomes = await self._run_tools(requests, by_name, last)
            for request, outcome in zip(requests, outcomes, strict=True):
                yield outcome
                messages.append({"role": "tool", "tool_call_id": request.id, "content": tool_content(outcome)})
            if last:
                return

    async def _run_tools(
        self, requests: list[ToolRequest], tools: Mapping[str, Tool], last: bool
    ) -> list[ToolResult | ToolError]:
        """Runs the calls at once, and returns their outcomes in the calls' order. (No event is yielded while they
        run: the task group must not span a yield.)"""
        outcomes: list[ToolResult | ToolError] = [ToolError(r.id, "not run") for r in requests]

        async def run(index: int, request: ToolRequest) -> None:
            outcomes[index] = await self._run_tool(request, tools, last)

        async with anyio.create_task_group() as task_group:
            for index, request in enumerate(requests):
                task_group.start_soon(run, index, request)
        return outcomes

    async def _run_tool(self, request: ToolRequest, tools: Mapping[str, Tool], last: bool) -> ToolResult | ToolError:
        if request.error is not None:
            return ToolError(request.id, request.error)
        if last:
            return ToolError(
                request.id, f"Not run: this reply has made its {self.max_steps} model calls (PARLEY_MAX_STEPS)."
            )
        if request.name not in tools or self.toolbox is None:
            return ToolError(request.id, f"There is no tool named {request.name!r}.")
        assert isinstance(request.input, dict)
        try:
            with anyio.fail_after(self.tool_timeout):
                output = await self.toolbox.call_tool(request.name, request.input)
        except TimeoutError:
            return ToolError(request.id, f"The tool {request.name!r} did not finish within {self.tool_timeout:g} s.")
        except ToolFailed as exc:
            return ToolError(request.id, str(exc) or f"The tool {request.name!r} failed.")
        except Exception:
            logger.exception("tool %r failed", request.name)
            return ToolError(request.id, f"The tool {request.name!r} failed.")
        return ToolResult(request.id, output)

    async def _model_call(self, payload: dict[str, Any], call: ModelCall) -> AsyncGenerator[Event, None]:
        """One streamed model call: yields its text, reasoning and tool-input events, and its usage at the end;
        gathers what the next call needs into ``call``."""
        response = await self._send(payload)
        try:
            if response.status_code >= 300:
                failure = await self._describe_failure(response)
                if response.status_code == 400 and "stream_options" in failure and self.asks_usage:
                    # A server that does not know stream_options (some older ones): ask it again without, and
                    # from now on; its replies' usage is then unknown (null).
                    logger.warning("the model server refuses stream_options: usage is not asked for (%s)", failure)
                    self.asks_usage = False
                    await response.aclose()
                    response = await self._send({k: v for k, v in payload.items() if k != "stream_options"})
                    failure = await self._describe_failure(response) if response.status_code >= 300 else ""
                if failure:
                    raise _upstream(failure)
            done = False
            async with aclosing(sse_data(response.aiter_bytes())) as events:
                async for data in events:
                    # Read on to the end of the body after [DONE] (it follows at once): an HTTP stream left
                    # unfinished is left to the garbage collector, which trio warns about.
                    if done or data.strip() == "[DONE]":
                        done = True
                        continue
                    for event in self._events(data, call):
                        yield event
            for event in call.start_unnamed():
                yield event
            if call.usage is not None:
                yield call.usage
        except httpx.TimeoutException:
            raise _upstream("the model server stopped sending.") from None
        except httpx.TransportError:
            raise _upstream("the connection to the model server broke.") from None
        finally:
            # Closing an unfinished response drops its connection: this is what stops the model.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _send(self, payload: dict[str, Any]) -> httpx.Response:
        headers = {"accept": "text/event-stream"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        request = self.client.build_request("POST", self.url, json=payload, headers=headers)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _upstream("the model server did not answer in time.") from None
        except httpx.TransportError:
            raise _upstream("could not connect to the model server.") from None

    def _events(self, data: str, call: ModelCall) -> list[Event]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _upstream("the model server sent something that is not JSON.") from None
        if not isinstance(chunk, dict):
            raise _upstream("the model server sent an unexpected event.")
        if "error" in chunk:
            raise _upstream(self._redact(_error_message(chunk["error"])))
        try:
            events = call.take(chunk)
        except ValueError:
            raise _upstream("the model server sent an unexpected event.") from None
        if call.reasoning_field is not None:
            self.reasoning_field = call.reasoning_field
        return events

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
    """Configured by PARLEY_OPENAI_*: present when PARLEY_OPENAI_BASE_URL is set; with the tools of the MCP servers
    that PARLEY_MCP_CONFIG names."""
    if not settings.openai_base_url:
        return None
    tools: Toolbox | None = None
    if settings.mcp_config:
        try:
            from parley.agents.mcp import MCPTools, load_config
        except ImportError:
            raise SettingsError("PARLEY_MCP_CONFIG needs the mcp package: pip install 'parley[mcp]'") from None
        tools = MCPTools(load_config(settings.mcp_config), connect_timeout=settings.tool_timeout_seconds)
    return OpenAIAgent(
        settings.openai_base_url,
        settings.openai_model,
        api_key=settings.openai_api_key,
        system_prompt=settings.openai_system_prompt,
        connect_timeout=settings.openai_connect_timeout,
        read_timeout=settings.openai_read_timeout,
        history_limit=settings.openai_history_messages,
        tools=tools,
        max_steps=settings.max_steps,
        tool_timeout=settings.tool_timeout_seconds,
    )
