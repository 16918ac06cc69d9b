"""parley's configuration: every knob is an environment variable with an embedded default."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A PARLEY_* variable with a value parley cannot use; the message names it, in one line."""


@dataclass(frozen=True)
class Settings:
    data_dir: str = "./data"
    agent: str = "echo"
    echo_delay: float = 0.0
    max_message_bytes: int = 256 * 1024
    max_upload_bytes: int = 10 * 1024 * 1024
    body_timeout_seconds: float = 30.0
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_model: str = "gpt-4o-mini"
    openai_system_prompt: str | None = None
    openai_connect_timeout: float = 5.0
    openai_read_timeout: float = 60.0
    openai_history_messages: int = 100
    max_steps: int = 8
    mcp_config: str | None = None
    tool_timeout_seconds: float = 60.0
    database_url: str | None = field(default=None, repr=False)  # (it may carry a password)
    database_max_connections: int = 20
    database_pool_timeout_seconds: float = 5.0
    redis_url: str | None = None
    redis_lease_seconds: float = 10.0
    redis_max_connections: int = 100
    redis_pool_timeout_seconds: float = 10.0
    redis_cluster: bool = False
    redis_socket_timeout_seconds: float = 5.0
    checkpoint_seconds: float = 1.0
    record_before_end_seconds: float = 1.0
    sse_keepalive_seconds: float = 15.0
    on_disconnect: str = "cancel"
    if_busy: str = "reject"  # what a message into a session with a reply in progress does (see IF_BUSY)
    max_queued: int = 4  # messages waiting (if_busy=enqueue) per session
    api_keys: str | None = field(default=None, repr=False)
    api_keys_file: str | None = None
    max_streams_per_owner: int | None = None
    cors_origins: tuple[str, ...] = ()
    metrics: bool = True
    metrics_token: str | None = field(default=None, repr=False)
    log_format: str = "text"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Raises :class:`SettingsError` for a value that is not a finite number in its range."""
        defaults = cls()

        def text(name: str) -> str | None:
            return environ.get(f"PARLEY_{name}", "").strip() or None

        def number(name: str, default: float, *, positive: bool = False) -> float:
            return _number(text(name), default, f"PARLEY_{name}", positive=positive)

        def whole(name: str, default: int, *, positive: bool = False) -> int:
            value = number(name, default, positive=positive)
            if not float(value).is_integer():
                raise SettingsError(f"PARLEY_{name} must be a whole number, got {text(name)!r}")
            return int(value)

        return cls(
            data_dir=text("DATA_DIR") or defaults.data_dir,
            agent=text("AGENT") or defaults.agent,
            echo_delay=number("ECHO_DELAY", defaults.echo_delay),
            max_message_bytes=whole("MAX_MESSAGE_BYTES", defaults.max_message_bytes),
            max_upload_bytes=whole("MAX_UPLOAD_BYTES", defaults.max_upload_bytes),
            body_timeout_seconds=number("BODY_TIMEOUT_SECONDS", defaults.body_timeout_seconds, positive=True),
            openai_base_url=text("OPENAI_BASE_URL"),
            openai_api_key=text("OPENAI_API_KEY"),
            openai_model=text("OPENAI_MODEL") or defaults.openai_model,
            openai_system_prompt=text("OPENAI_SYSTEM_PROMPT"),
            openai_connect_timeout=number("OPENAI_CONNECT_TIMEOUT", defaults.openai_connect_timeout, positive=True),
            openai_read_timeout=number("OPENAI_READ_TIMEOUT", defaults.openai_read_timeout, positive=True),
            openai_history_messages=whole("OPENAI_HISTORY_MESSAGES", defaults.openai_history_messages),
            max_steps=whole("MAX_STEPS", defaults.max_steps, positive=True),
            mcp_config=text("MCP_CONFIG"),
            tool_timeout_seconds=number("TOOL_TIMEOUT_SECONDS", defaults.tool_timeout_seconds, positive=True),
            database_url=_database_url(text("DATABASE_URL")),
            database_max_connections=whole(
                "DATABASE_MAX_CONNECTIONS", defaults.database_max_connections, positive=True
            ),
            database_pool_timeout_seconds=number(
                "DATABASE_POOL_TIMEOUT_SECONDS", defaults.database_pool_timeout_seconds, positive=True
            ),
            redis_url=text("REDIS_URL"),
            redis_lease_seconds=number("REDIS_LEASE_SECONDS", defaults.redis_lease_seconds, positive=True),
            redis_max_connections=whole("REDIS_MAX_CONNECTIONS", defaults.redis_max_connections, positive=True),
            redis_pool_timeout_seconds=number(
                "REDIS_POOL_TIMEOUT_SECONDS", defaults.redis_pool_timeout_seconds, positive=True
            ),
            redis_cluster=_switch(text("REDIS_CLUSTER"), defaults.redis_cluster, "PARLEY_REDIS_CLUSTER"),
            redis_socket_timeout_seconds=number(
                "REDIS_SOCKET_TIMEOUT_SECONDS", defaults.redis_socket_timeout_seconds, positive=True
            ),
            checkpoint_seconds=number("CHECKPOINT_SECONDS", defaults.checkpoint_seconds),
            record_before_end_seconds=number(
                "RECORD_BEFORE_END_SECONDS", defaults.record_before_end_seconds, positive=True
            ),
            sse_keepalive_seconds=number("SSE_KEEPALIVE_SECONDS", defaults.sse_keepalive_seconds),
            on_disconnect=_choice(text("ON_DISCONNECT"), defaults.on_disconnect, "PARLEY_ON_DISCONNECT"),
            if_busy=_choice(text("IF_BUSY"), defaults.if_busy, "PARLEY_IF_BUSY", ("reject", "interrupt", "enqueue")),
            max_queued=whole("MAX_QUEUED", defaults.max_queued),
            api_keys=text("API_KEYS"),
            api_keys_file=text("API_KEYS_FILE"),
            max_streams_per_owner=_positive_int(text("MAX_STREAMS_PER_OWNER"), "PARLEY_MAX_STREAMS_PER_OWNER"),
            cors_origins=tuple(origin for origin in (text("CORS_ORIGINS") or "").replace(",", " ").split()),
            metrics=_switch(text("METRICS"), defaults.metrics, "PARLEY_METRICS"),
            metrics_token=text("METRICS_TOKEN"),
            log_format=_choice(text("LOG_FORMAT"), defaults.log_format, "PARLEY_LOG_FORMAT", ("text", "json")),
        )


def _number(value: str | None, default: float, name: str, *, positive: bool = False) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    if number < 0:
        raise SettingsError(f"{name} must not be negative, got {value!r}")
    if positive and number == 0:
        raise SettingsError(f"{name} must be more than 0, got {value!r}")
    return number


def _database_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("postgresql://", "postgres://")):
        scheme = value.split("://")[0] if "://" in value else value[:20]
        raise SettingsError(f"PARLEY_DATABASE_URL must be a postgresql:// URL, got one that starts {scheme!r}")
    return value


def _switch(value: str | None, default: bool, name: str) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1 or 0, got {value!r}")


def _positive_int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    # isascii: isdigit() alone accepts '²', which int() refuses.
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise SettingsError(f"{name} must be a whole number of 1 or more (unset: no limit), got {value!r}")
    return int(value)


def _choice(value: str | None, default: str, name: str, choices: tuple[str, ...] = ("cancel", "continue")) -> str:
    if value is None:
        return default
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
