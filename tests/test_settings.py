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
