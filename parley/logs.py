"""parley's log lines, and uvicorn's, in one of two formats: human-readable (the default) or one JSON object
a line (``PARLEY_LOG_FORMAT=json``). Every line logged while a request is served carries its request id.

What is logged: one INFO line per finished interaction, one line per request that failed with a 5xx.
What never is: a message's content, a file's content, a key. Lines name sessions, interactions and files by id.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parley.sessions.turns import TurnReport

REQUEST_ID: ContextVar[str | None] = ContextVar("parley_request_id", default=None)

logger = logging.getLogger("parley")

_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _Expected(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for failures parley has logged itself: a bug (see
    :func:`logged_here`), an agent that fails mid-stream (raising is the only way to make the server abort the
    response)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and getattr(record.exc_info[1], "logged_by_parley", False))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, "fields", None) or {}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, version, status = record.args
        fields = {"client": client, "method": method, "path": path, "http_version": version, "status": status}
    return fields


# Made once: json.dumps(..., default=str) would build an encoder for every line.
_JSON = json.JSONEncoder(default=str)


@functools.lru_cache(maxsize=4)  # lines come many to a second: strftime once a second, not once a line
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, and the line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": f"{_utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _JSON.encode(line)


class TextFormatter(logging.Formatter):
    """``LEVEL: message key=value ... request_id=...``, around the formatter a handler had (uvicorn's colours)."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("%(levelname)s:     %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        extra = [f"{key}={_text(value)}" for key, value in getattr(record, "fields", {}).items()]
        request_id = getattr(record, "request_id", None)
        if request_id:
            extra.append(f"request_id={request_id}")
        if not extra:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} {' '.join(extra)}{newline}{rest}"


def _text(value: object) -> str:
    if type(value) is str:  # most fields (ids, names): first, since this runs for every field of every line
        text = value
    elif isinstance(value, float):
        return f"{value:.6f}"  # seconds, to the microsecond (never 6.4e-05)
    else:
        text = "-" if value is None else str(value)
    # Quoted when empty or holding a space, a quote, an "=" or anything unprintable (a newline, a control
    # character, Unicode spaces): str methods, much cheaper than a regex over every character.
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return json.dumps(text)


def configure(log_format: str) -> None:
    """Give parley's logger a level (uvicorn's ``--log-level``, else INFO) and a handler (on stderr) unless the
    host set up logging, and set the format of uvicorn's handlers.

    Idempotent: every app made in a process calls it. uvicorn configures its loggers before it imports the
    app (in each worker, too), so this runs after it and its handlers are there to be changed."""
    if not any(isinstance(f, _RequestId) for f in logger.filters):
        logger.addFilter(_RequestId())  # the request id on parley's records, whoever formats them
    if logger.level == logging.NOTSET:
        # Under uvicorn, its --log-level (set on uvicorn.error before the app is imported) is the server's level:
        # `--log-level warning` leaves out the INFO line of every interaction too.
        logger.setLevel(logging.getLogger("uvicorn.error").level or logging.INFO)
    handler = next((h for h in logger.handlers if getattr(h, "parley", False)), None)
    if handler is None and not logging.getLogger().handlers:
        # Nobody configured logging (uvicorn sets up its own loggers only): parley's lines go to stderr.
        handler = logging.StreamHandler(sys.stderr)
        handler.parley = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    if handler is not None:
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for name in _UVICORN:
        uvicorn_logger = logging.getLogger(name)
        if name == "uvicorn.error" and not any(isinstance(f, _Expected) for f in uvicorn_logger.filters):
            uvicorn_logger.addFilter(_Expected())
        for uvicorn_handler in uvicorn_logger.handlers:
            if not any(isinstance(f, _RequestId) for f in uvicorn_handler.filters):
                uvicorn_handler.addFilter(_RequestId())
            current = uvicorn_handler.formatter
            if isinstance(current, TextFormatter):
                current = current.inner
            if log_format == "json":
                uvicorn_handler.setFormatter(JsonFormatter())
            elif not isinstance(current, JsonFormatter):
                uvicorn_handler.setFormatter(TextFormatter(current))


def logged_here(exc: BaseException) -> None:
    """Mark ``exc`` as logged by parley: the server's own report of it ("Exception in ASGI application") is dropped."""
    with contextlib.suppress(AttributeError):  # (an exception class with __slots__ cannot be marked)
        exc.logged_by_parley = True  # type: ignore[attr-defined]


def failed_request(method: str, route: str, status: int, error: str, exc: BaseException | None = None) -> None:
    """The one line for a request that failed with a 5xx."""
    fields = {"method": method, "route": route, "status": status, "error": error}
    logger.error("request failed", exc_info=exc, extra={"fields": fields})


class InteractionLog:
    """A turn observer (:class:`sessions.turns.TurnObserver`): the one INFO line of each finished interaction."""

    def turn_started(self, turn: TurnReport) -> None:
        pass

    def first_token(self, turn: TurnReport) -> None:
        pass

    def turn_ended(self, turn: TurnReport) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        ended = turn.ended_at if turn.ended_at is not None else time.monotonic()
        first = turn.first_token_at
        fields = {
            "session_id": turn.session_id,
            "interaction_id": turn.interaction_id,
            "owner": turn.owner,
            "agent": turn.agent,
            "status": turn.status,
            "reason": turn.reason,
            "tokens": turn.tokens,
            "time_to_first_token": None if first is None else round(first - turn.started, 6),
            "duration": round(ended - turn.started, 6),
        }
        if turn.error is not None:
            fields["error"] = turn.error
        # Made by hand rather than with logger.info(): that would look up the caller's frame, a cost paid
        # once per interaction for a line whose origin is always this one.
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "interaction ended", (), None)
        record.fields = fields
        logger.handle(record)
