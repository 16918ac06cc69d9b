from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from parley.agents.base import Turn, UpstreamError
from parley.agents.event_stream import sse_data
from parley.agents.events import (
    Event,
    Reasoning,
    Step,
    ToolCall,
    ToolError,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    Usage,
)
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
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
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
            call = _ModelCall()
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
        self, requests: list[_ToolRequest], tools: Mapping[str, Tool], last: bool
    ) -> list[ToolResult | ToolError]:
        """Runs the calls at once, and returns their outcomes in the calls' order. (No event is yielded while they
        run: the task group must not span a yield.)"""
        outcomes: list[ToolResult | ToolError] = [ToolError(r.id, "not run") for r in requests]

        async def run(index: int, request: _ToolRequest) -> None:
            outcomes[index] = await self._run_tool(request, tools, last)

        async with anyio.create_task_group() as task_group:
            for index, request in enumerate(requests):
                task_group.start_soon(run, index, request)
        return outcomes

    async def _run_tool(self, request: _ToolRequest, tools: Mapping[str, Tool], last: bool) -> ToolResult | ToolError:
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

    async def _model_call(self, payload: dict[str, Any], call: _ModelCall) -> AsyncGenerator[Event, None]:
        """One streamed model call: yields its text, reasoning and tool-input events, and its usage at the end;
        gathers what the next call needs into ``call``."""
        headers = {"accept": "text/event-stream"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        request = self.client.build_request("POST", self.url, json=payload, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _upstream("the model server did not answer in time.") from None
        except httpx.TransportError:
            raise _upstream("could not connect to the model server.") from None
        try:
            if response.status_code >= 300:
                raise _upstream(await self._describe_failure(response))
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

    def _events(self, data: str, call: _ModelCall) -> list[Event]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _upstream("the model server sent something that is not JSON.") from None
        if not isinstance(chunk, dict):
            raise _upstream("the model server sent an unexpected event.")
        if "error" in chunk:
            raise _upstream(self._redact(_error_message(chunk["error"])))
        events: list[Event] = []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            # (Some servers report usage in every chunk, growing: the last one counts.)
            call.usage = _usage(usage)
        choices = chunk.get("choices")
        if not choices:
            return events
        try:
            delta = choices[0]["delta"]
        except (KeyError, IndexError, TypeError):
            raise _upstream("the model server sent an unexpected event.") from None
        if not isinstance(delta, dict):
            return events
        for field_name in ("reasoning_content", "reasoning"):
            reasoning = delta.get(field_name)
            if isinstance(reasoning, str) and reasoning:
                self.reasoning_field = field_name
                call.reasoning.append(reasoning)
                events.append(Reasoning(reasoning))
                break
        content = delta.get("content")
        if isinstance(content, str) and content:
            call.text.append(content)
            events.append(content)
        fragments = delta.get("tool_calls")
        if isinstance(fragments, list):
            for fragment in fragments:
                if isinstance(fragment, dict):
                    call.gather(fragment, events)
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


@dataclass
class _Streaming:
    """A tool call as its fragments arrive."""

    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    started: bool = False

    def start(self, events: list[Event]) -> None:
        self.id = self.id or f"call_{secrets.token_hex(12)}"
        self.started = True
        events.append(ToolInputStart(self.id, self.name or ""))
        if self.arguments:
            events.append(ToolInputDelta(self.id, "".join(self.arguments)))


@dataclass
class _ToolRequest:
    """A tool call whose input is complete. ``error`` says why it will not run (its arguments were no JSON
    object), or is None."""

    id: str
    name: str
    arguments: str
    input: Any
    error: str | None

    def message(self) -> dict[str, Any]:
        # The arguments go back as the model sent them, or as {} when they were not a JSON object: a server that
        # parses them (vLLM does, for its chat templates) must not fail on them; the tool's error says what was
        # wrong.
        arguments = self.arguments if self.error is None and self.arguments.strip() else "{}"
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass
class _ModelCall:
    """What one model call said: its text, its reasoning, its tool calls (by index), its usage."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[_Streaming] = field(default_factory=list)
    usage: Usage | None = None
    _by_index: dict[int, _Streaming] = field(default_factory=dict)

    def gather(self, fragment: dict[str, Any], events: list[Event]) -> None:
        """Adds a ``tool_calls`` fragment: by its ``index``; without one (some servers leave it out), a fragment
        with a new id or a name is a new call, and anything else continues the last one."""
        index, call_id = fragment.get("index"), fragment.get("id")
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        name, arguments = function.get("name"), function.get("arguments")
        call: _Streaming | None = None
        if isinstance(index, int) and not isinstance(index, bool):
            call = self._by_index.get(index)
            if call is None:
                call = self._by_index[index] = self._new()
        elif isinstance(call_id, str) and call_id:
            call = next((c for c in self.tool_calls if c.id == call_id), None) or self._new()
        elif name or not self.tool_calls:
            call = self._new()
        else:
            call = self.tool_calls[-1]
        if isinstance(call_id, str) and call_id and call.id is None and not call.started:
            call.id = call_id
        if isinstance(name, str) and name and not call.name:
            call.name = name
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)  # (a whole call in one delta, with its arguments as an object)
        if isinstance(arguments, str) and arguments:
            call.arguments.append(arguments)
        if not call.started:
            if call.name:  # (some servers send the name after the first arguments: those wait for it)
                call.start(events)
        elif isinstance(arguments, str) and arguments:
            assert call.id is not None
            events.append(ToolInputDelta(call.id, arguments))

    def _new(self) -> _Streaming:
        call = _Streaming()
        self.tool_calls.append(call)
        return call

    def start_unnamed(self) -> list[Event]:
        """The start of any call whose name never came (its error follows, as for any call that cannot run)."""
        events: list[Event] = []
        for call in self.tool_calls:
            if not call.started:
                call.start(events)
        return events

    def finish(self) -> list[_ToolRequest]:
        requests = []
        for call in self.tool_calls:
            assert call.id is not None
            text = "".join(call.arguments)
            value: Any = text
            error = None
            if not call.name:
                error = "The call named no tool."
            elif text.strip():
                try:
                    value = json.loads(text)
                except ValueError as exc:
                    error = f"The arguments were not valid JSON ({exc}); send them as one JSON object."
                else:
                    if not isinstance(value, dict):
                        error = "The arguments must be a JSON object."
            else:
                value = {}  # (no arguments at all: a tool that takes none)
            requests.append(_ToolRequest(call.id, call.name or "", text, value, error))
        return requests


def tool_content(outcome: ToolResult | ToolError) -> str:
    """A tool's outcome as the ``content`` of its ``tool`` message."""
    if isinstance(outcome, ToolError):
        return f"Error: {outcome.error}"
    return outcome.output if isinstance(outcome.output, str) else json.dumps(outcome.output)


def history_messages(parts: Sequence[Mapping[str, Any]], content: str, reasoning_field: str) -> list[dict[str, Any]]:
    """An earlier reply, from its parts, as the messages the model made and was given: one assistant message per
    step, and after one that made tool calls, one ``tool`` message per call, always (a call that never got its
    outcome, because the reply was cancelled, is answered by saying so)."""
    steps: list[list[Mapping[str, Any]]] = [[]]
    for part in parts:
        if part.get("type") == "step-start":
            if steps[-1]:
                steps.append([])
        else:
            steps[-1].append(part)
    messages: list[dict[str, Any]] = []
    for step in steps:
        text = "".join(str(p.get("text", "")) for p in step if p.get("type") == "text")
        reasoning = "".join(str(p.get("text", "")) for p in step if p.get("type") == "reasoning")
        calls = [p for p in step if p.get("type") == "dynamic-tool"]
        if not calls:
            if text:
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
                    last["content"] += text
                else:
                    messages.append({"role": "assistant", "content": text})
            continue
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "tool_calls": []}
        if reasoning:
            message[reasoning_field] = reasoning
        messages.append(message)
        for part in calls:
            call_id, tool_input = str(part.get("toolCallId", "")), part.get("input")
            arguments = json.dumps(tool_input) if isinstance(tool_input, dict) else "{}"
            message["tool_calls"].append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": str(part.get("toolName", "")), "arguments": arguments},
                }
            )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _part_outcome(part)})
    return messages or [{"role": "assistant", "content": content}]


def _part_outcome(part: Mapping[str, Any]) -> str:
    if part.get("state") == "output-available":
        output = part.get("output")
        return output if isinstance(output, str) else json.dumps(output)
    if part.get("state") == "output-error":
        return f"Error: {part.get('errorText') or 'the call failed.'}"
    return "Error: the call was cancelled before it returned."


def _usage(usage: dict[str, Any]) -> Usage:
    def whole(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def detail(name: str, key: str) -> int | None:
        details = usage.get(name)
        return whole(details.get(key)) if isinstance(details, dict) else None

    input_tokens = whole(usage.get("prompt_tokens")) or 0
    output_tokens = whole(usage.get("completion_tokens")) or 0
    total = whole(usage.get("total_tokens"))
    return Usage(
        input_tokens,
        output_tokens,
        total if total is not None else input_tokens + output_tokens,
        detail("completion_tokens_details", "reasoning_tokens"),
        detail("prompt_tokens_details", "cached_tokens"),
    )


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
