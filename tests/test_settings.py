from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from parley.app import create_app
from parley.settings import Settings, SettingsError
from tests.conftest import ROOT, free_port


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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_UPLOAD_BYTES", "inf"),
        ("MAX_MESSAGE_BYTES", "nan"),
        ("MAX_MESSAGE_BYTES", "1.5"),
        ("REDIS_LEASE_SECONDS", "nan"),
        ("REDIS_LEASE_SECONDS", "0"),
        ("ECHO_DELAY", "nan"),
        ("ECHO_DELAY", "-inf"),
        ("BODY_TIMEOUT_SECONDS", "inf"),
        ("BODY_TIMEOUT_SECONDS", "0"),
        ("REDIS_MAX_CONNECTIONS", "0"),
        ("REDIS_POOL_TIMEOUT_SECONDS", "-1"),
        ("OPENAI_READ_TIMEOUT", "nan"),
    ],
)
def test_refuses_numbers_out_of_range(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"PARLEY_{name}"):
        Settings.from_env({f"PARLEY_{name}": value})


@pytest.mark.parametrize("variable", ["PARLEY_MAX_UPLOAD_BYTES=inf", "PARLEY_REDIS_LEASE_SECONDS=nan"])
def test_uvicorn_stops_with_one_line_naming_the_variable(tmp_path: Path, variable: str) -> None:
    name, value = variable.split("=")
    env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path), name: value}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"parley: {name} must be a finite number, got {value!r}"]


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


def test_reads_the_busy_policy() -> None:
    assert (Settings().if_busy, Settings().max_queued) == ("reject", 4)
    settings = Settings.from_env({"PARLEY_IF_BUSY": "enqueue", "PARLEY_MAX_QUEUED": "10"})
    assert (settings.if_busy, settings.max_queued) == ("enqueue", 10)
    with pytest.raises(ValueError, match="PARLEY_IF_BUSY"):
        Settings.from_env({"PARLEY_IF_BUSY": "rollback"})
    with pytest.raises(ValueError, match="PARLEY_MAX_QUEUED"):
        Settings.from_env({"PARLEY_MAX_QUEUED": "1.5"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_STREAMS_PER_OWNER", "0"),
        ("MAX_STREAMS_PER_OWNER", "abc"),
        ("MAX_STREAMS_PER_OWNER", "\u00b2"),
        ("METRICS", "maybe"),
        ("API_KEYS", "alice"),
        ("API_KEYS", "alice:"),
        ("API_KEYS", "alice:k bob:k"),
        ("API_KEYS_FILE", "/nonexistent/parley-keys"),
    ],
)
def test_every_bad_setting_is_a_settings_error_of_one_line(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"PARLEY_{name}|API key") as caught:
        create_app(Settings.from_env({f"PARLEY_{name}": value}))
    assert "\n" not in str(caught.value)
    assert value not in str(caught.value) or name != "API_KEYS"  # never a key in a message


def _uvicorn(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """``uvicorn app:app ARGS`` with ``env``; its exit code and stderr lines (it is killed, and fails, after 60 s)."""
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    full = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path), **env}
    with subprocess.Popen(
        command, cwd=ROOT, env=full, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail("uvicorn kept running (restarting its workers) with a bad setting")
    return process.returncode, stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"PARLEY_REDIS_LEASE_SECONDS": "nan"},
            "parley: PARLEY_REDIS_LEASE_SECONDS must be a finite number, got 'nan'",
        ),
        ({"PARLEY_METRICS": "maybe"}, "parley: PARLEY_METRICS must be 1 or 0, got 'maybe'"),
        ({"PARLEY_API_KEYS": "alice:"}, "parley: PARLEY_API_KEYS: entry 1 is not of the form owner:key"),
        ({"PARLEY_API_KEYS_FILE": "KEYS"}, "parley: PARLEY_API_KEYS_FILE: entry 2 is not of the form owner:key"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_uvicorn_with_workers_stops_on_a_bad_setting(
    tmp_path: Path, env: dict[str, str], line: str, workers: str
) -> None:
    if env.get("PARLEY_API_KEYS_FILE") == "KEYS":
        keys = tmp_path / "keys"
        keys.write_text("alice:secret-one\nbob secret-two\n")
        env = {"PARLEY_API_KEYS_FILE": str(keys)}
    code, lines = _uvicorn(tmp_path, env, "--workers", workers)
    # One process exits 3 (uvicorn's STARTUP_FAILURE); under --workers the supervisor, told so by a worker's 3,
    # stops (with uvicorn's own exit code, 0) instead of restarting its workers forever.
    assert code == 3 if workers == "1" else any("failed to start, stopping the parent" in text for text in lines)
    ours = [text for text in lines if text.startswith("parley:")]
    assert ours and set(ours) == {line}  # each worker that started says it, in one line
    assert not any("Traceback" in text or "Error:" in text for text in lines), lines
    assert "secret" not in "\n".join(lines)
