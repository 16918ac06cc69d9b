from __future__ import annotations

import pytest

from settings import Settings


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.data_dir, settings.agent, settings.max_message_bytes) == ("./data", "echo", 262144)


def test_reads_the_environment() -> None:
    env = {
        "PARLEY_DATA_DIR": ":memory:",
        "PARLEY_ECHO_DELAY": "0.25",
        "PARLEY_MAX_MESSAGE_BYTES": "100",
        "PARLEY_OPENAI_API_KEY": "sk-secret",
        "PARLEY_REDIS_URL": " ",
    }
    settings = Settings.from_env(env)
    assert settings.data_dir == ":memory:"
    assert settings.echo_delay == 0.25
    assert settings.max_message_bytes == 100
    assert settings.redis_url is None
    assert "sk-secret" not in repr(settings)


@pytest.mark.parametrize("value", ["fast", "-1"])
def test_rejects_bad_numbers_with_the_variable_named(value: str) -> None:
    with pytest.raises(ValueError, match="PARLEY_ECHO_DELAY"):
        Settings.from_env({"PARLEY_ECHO_DELAY": value})


def test_reads_the_settings_of_replies_that_outlive_their_connection() -> None:
    env = {"PARLEY_ON_DISCONNECT": "continue", "PARLEY_CHECKPOINT_SECONDS": "0.5", "PARLEY_SSE_KEEPALIVE_SECONDS": "3"}
    settings = Settings.from_env(env)
    assert (settings.on_disconnect, settings.checkpoint_seconds, settings.sse_keepalive_seconds) == ("continue", 0.5, 3)
    assert (Settings().on_disconnect, Settings().checkpoint_seconds, Settings().sse_keepalive_seconds) == (
        "cancel",
        1.0,
        15.0,
    )
    with pytest.raises(ValueError, match="PARLEY_ON_DISCONNECT"):
        Settings.from_env({"PARLEY_ON_DISCONNECT": "later"})


def test_reads_the_owner_settings() -> None:
    env = {
        "PARLEY_API_KEYS": "alice:secret-key",
        "PARLEY_API_KEYS_FILE": "/etc/parley/keys",
        "PARLEY_MAX_STREAMS_PER_OWNER": "3",
        "PARLEY_CORS_ORIGINS": "https://a.example, https://b.example",
    }
    settings = Settings.from_env(env)
    assert settings.api_keys == "alice:secret-key"
    assert settings.api_keys_file == "/etc/parley/keys"
    assert settings.max_streams_per_owner == 3
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert "secret-key" not in repr(settings)
    assert Settings.from_env({}).max_streams_per_owner is None  # no limit


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_rejects_a_bad_stream_limit_with_the_variable_named(value: str) -> None:
    with pytest.raises(ValueError, match="PARLEY_MAX_STREAMS_PER_OWNER"):
        Settings.from_env({"PARLEY_MAX_STREAMS_PER_OWNER": value})
