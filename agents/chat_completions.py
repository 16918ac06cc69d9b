"""The chat-completions API's shapes, apart from the HTTP: a streamed model call gathered into parley's events
(:class:`ModelCall`), and an earlier reply's parts made back into the messages the model made and was given
(:func:`history_messages`)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from parley.agents.events import Event, Reasoning, ToolError, ToolInputDelta, ToolInputStart, ToolResult, Usage


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
class ToolRequest:
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
class ModelCall:
    """What one model call said: its text, its reasoning, its tool calls (by index), its usage."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[_Streaming] = field(default_factory=list)
    usage: Usage | None = None
    reasoning_field: str | None = None  # the name the server sends reasoning under, once it has sent some
    _by_index: dict[int, _Streaming] = field(default_factory=dict)

    def take(self, chunk: dict[str, Any]) -> list[Event]:
        """A chunk of the stream: what it adds to the reply, as events. Raises ValueError for a chunk of the wrong
        shape."""
        events: list[Event] = []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            # (Some servers report usage in every chunk, growing: the last one counts.)
            self.usage = usage_of(usage)
        choices = chunk.get("choices")
        if not choices:
            return events
        try:
            delta = choices[0]["delta"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("a choice without a delta") from None
        if not isinstance(delta, dict):
            return events
        for name in ("reasoning_content", "reasoning"):
            reasoning = delta.get(name)
            if isinstance(reasoning, str) and reasoning:
                self.reasoning_field = name
                self.reasoning.append(reasoning)
                events.append(Reasoning(reasoning))
                break
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.text.append(content)
            events.append(content)
        fragments = delta.get("tool_calls")
        if isinstance(fragments, list):
            for fragment in fragments:
                if isinstance(fragment, dict):
                    self.gather(fragment, events)
        return events

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

    def finish(self) -> list[ToolRequest]:
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
            requests.append(ToolRequest(call.id, call.name or "", text, value, error))
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


def usage_of(usage: dict[str, Any]) -> Usage:
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
