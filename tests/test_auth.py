"""Owners: API keys, the host app's users, the open mode, and that no owner ever reaches another's sessions."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Mount

from parley.app import create_app
from parley.auth import Auth, KeyFileError, keys_from
from tests.conftest import LiveServer, Subprocess, eventually, make_settings, messages, pair, start_together

pytestmark = pytest.mark.anyio

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"
KEYS = f"alice:{ALICE},bob:{BOB}"
SLOW = " ".join(f"w{i}" for i in range(60))


def as_(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def create(client: httpx.AsyncClient, headers: dict[str, str], **fields: str) -> str:
    response = await client.post("/api/v1/sessions", json=fields, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["ui_session_id"])


async def upload(client: httpx.AsyncClient, headers: dict[str, str], session_id: str) -> httpx.Response:
    files = {"file": ("notes.txt", b"alice's notes", "text/plain")}
    return await client.post("/api/v1/files", data={"ui_session_id": session_id}, files=files, headers=headers)


def requests_on(session_id: str, file_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every endpoint that names a session (and a file), as (method, path, httpx keyword arguments)."""
    files = {"file": ("x.txt", b"x", "text/plain")}
    ai_sdk_message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    return [
        ("GET", f"/api/v1/sessions/{session_id}", {}),
        ("GET", f"/api/v1/sessions/{session_id}/messages", {}),
        ("POST", "/api/v1/chat", {"data": {"ui_session_id": session_id, "message": "hi"}}),
        (
            "POST",
            "/api/v1/chat",
            {"data": {"ui_session_id": session_id, "message": "hi", "file_ids": f'["{file_id}"]'}},
        ),
        ("POST", "/api/v1/chat", {"json": {"ui_session_id": session_id, "message": "hi"}}),
        ("POST", "/api/v1/chat", {"json": {"id": session_id, "messages": [ai_sdk_message]}}),  # SSE
        ("GET", f"/api/v1/chat/{session_id}/stream", {}),
        ("GET", f"/api/v1/chat/{session_id}/stream", {"headers": {"accept": "text/plain"}}),
        ("POST", "/api/v1/cancel", {"data": {"ui_session_id": session_id}}),
        ("POST", "/api/v1/cancel", {"data": {"ui_session_id": session_id, "interaction_id": "int_x"}}),
        ("POST", "/api/v1/files", {"data": {"ui_session_id": session_id}, "files": files}),
        ("GET", f"/api/v1/files/{session_id}", {}),
        ("GET", f"/api/v1/files/{session_id}/{file_id}", {}),
        ("GET", f"/api/v1/files/{session_id}/{file_id}/content", {}),
        ("DELETE", f"/api/v1/files/{session_id}/{file_id}", {}),
        ("DELETE", f"/api/v1/sessions/{session_id}", {}),
    ]


async def send(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]
) -> httpx.Response:
    rest = {key: value for key, value in kwargs.items() if key != "headers"}
    return await client.request(method, path, headers={**headers, **kwargs.get("headers", {})}, **rest)


async def assert_alike(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    theirs: tuple[str, str],
    missing: tuple[str, str],
    only_files: bool = False,
) -> None:
    """Each request on another owner's session and file is answered exactly as on ones that do not exist."""
    requests = zip(requests_on(*theirs), requests_on(*missing), strict=True)
    for (method, path, kwargs), (_, missing_path, missing_kwargs) in requests:
        if only_files and theirs[1] not in repr((path, kwargs)):
            continue
        answer = await send(client, method, path, headers, kwargs)
        expected = await send(client, method, missing_path, headers, missing_kwargs)
        assert answer.status_code == expected.status_code == 404, (method, path, answer.text)
        unnamed = answer.text.replace(theirs[0], "<session>").replace(theirs[1], "<file>")
        assert unnamed == expected.text.replace(missing[0], "<session>").replace(missing[1], "<file>")
        assert answer.headers["content-type"] == expected.headers["content-type"]


async def assert_isolated(client: httpx.AsyncClient, alice: dict[str, str], bob: dict[str, str]) -> None:
    """Alice's session, history and file, out of Bob's reach on every endpoint, and untouched after he tried."""
    session_id = await create(client, alice)
    reply = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "mine"}, headers=alice)
    assert reply.text == "mine"
    file_id = (await upload(client, alice, session_id)).json()["id"]
    bobs = await create(client, bob)

    await assert_alike(client, bob, (session_id, file_id), ("ses_missing", "file_missing"))
    # Bob's own session, with Alice's file id: exactly a file that does not exist.
    await assert_alike(client, bob, (bobs, file_id), (bobs, "file_missing"), only_files=True)
    listed = (await client.get("/api/v1/sessions", headers=bob)).json()["sessions"]
    assert [s["ui_session_id"] for s in listed] == [bobs]
    taken = await client.post("/api/v1/sessions", json={"ui_session_id": session_id}, headers=bob)
    assert taken.status_code == 409  # ids are global: the one thing another owner can learn

    listed = (await client.get("/api/v1/sessions", headers=alice)).json()["sessions"]
    assert [s["ui_session_id"] for s in listed] == [session_id]
    history = (await client.get(f"/api/v1/sessions/{session_id}/messages", headers=alice)).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [("user", "mine"), ("assistant", "mine")]
    content = await client.get(f"/api/v1/files/{session_id}/{file_id}/content", headers=alice)
    assert content.content == b"alice's notes"


async def test_two_owners_by_api_key_on_every_endpoint(live: Callable[..., LiveServer]) -> None:
    async with live(api_keys=KEYS).client() as client:
        await assert_isolated(client, as_(ALICE), {"x-api-key": BOB})


async def test_another_owners_cancel_does_nothing_to_the_stream(live: Callable[..., LiveServer]) -> None:
    async with live(api_keys=KEYS, echo_delay=0.02).client() as client:
        session_id = await create(client, as_(ALICE))
        data = {"ui_session_id": session_id, "message": SLOW}
        async with client.stream("POST", "/api/v1/chat", data=data, headers=as_(ALICE)) as response:
            interaction_id = response.headers["x-interaction-id"]
            received = ""
            async for chunk in response.aiter_text():
                if not received:
                    for fields in ({}, {"interaction_id": interaction_id}):
                        answer = await client.post(
                            "/api/v1/cancel", data={"ui_session_id": session_id, **fields}, headers=as_(BOB)
                        )
                        assert answer.status_code == 404, answer.text
                    deleted = await client.delete(f"/api/v1/sessions/{session_id}", headers=as_(BOB))
                    assert deleted.status_code == 404
                received += chunk
        assert received == SLOW
        turns = (await client.get(f"/api/v1/sessions/{session_id}/messages", headers=as_(ALICE))).json()["messages"]
        assert (turns[-1]["status"], turns[-1]["content"]) == ("complete", SLOW)


ENDPOINTS = [
    ("GET", "/api/v1/sessions"),
    ("POST", "/api/v1/sessions"),
    ("GET", "/api/v1/sessions/s"),
    ("DELETE", "/api/v1/sessions/s"),
    ("GET", "/api/v1/sessions/s/messages"),
    ("POST", "/api/v1/chat"),
    ("POST", "/api/v1/cancel"),
    ("GET", "/api/v1/chat/s/stream"),
    ("POST", "/api/v1/files"),
    ("GET", "/api/v1/files/s"),
    ("GET", "/api/v1/files/s/f"),
    ("GET", "/api/v1/files/s/f/content"),
    ("DELETE", "/api/v1/files/s/f"),
    ("GET", "/api/v1/agents"),
]
BAD_CREDENTIALS: list[dict[str, str | bytes]] = [
    {},
    {"authorization": "Bearer not-a-key"},
    {"x-api-key": "not-a-key"},
    {"authorization": f"Bearer {ALICE}x"},
    {"authorization": f"Bearer {ALICE[:-1]}"},
    {"authorization": f"Basic {ALICE}"},
    {"authorization": ALICE},
    {"authorization": "Bearer"},
    {"authorization": f"Bearer  {ALICE} {ALICE}"},
    {"authorization": b"Bearer \xff\xfe"},  # not text: raw bytes on the wire
    {"x-api-key": ""},
    {"authorization": f"alice:{ALICE}"},
]


@pytest.fixture
async def keyed(live: Callable[..., LiveServer]) -> AsyncIterator[httpx.AsyncClient]:
    async with live(api_keys=KEYS).client() as client:
        yield client


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_401_for_missing_wrong_and_malformed_credentials(
    keyed: httpx.AsyncClient, method: str, path: str
) -> None:
    for headers in BAD_CREDENTIALS:
        response = await keyed.request(method, path, headers=headers, data={"ui_session_id": "s", "message": "m"})
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["status"] == "error"
        assert "API key" in response.json()["message"]
    assert (await keyed.get("/healthz")).json() == {"status": "ok"}


async def test_both_headers_carry_a_key(keyed: httpx.AsyncClient) -> None:
    for headers in (as_(ALICE), {"x-api-key": ALICE}, {"Authorization": f"bearer {ALICE}"}):
        assert (await keyed.get("/api/v1/sessions", headers=headers)).status_code == 200


def test_key_entries_are_checked_and_never_echoed(tmp_path: Path) -> None:
    assert keys_from("alice:k1, bob:k:2\ncarol:k3", None) == [("alice", "k1"), ("bob", "k:2"), ("carol", "k3")]
    for broken in ("alice:k1,secret-without-owner", "alice:k1,:secret-without-owner", "alice:"):
        with pytest.raises(KeyFileError) as raised:
            keys_from(broken, None)
        assert "secret" not in str(raised.value)
        assert "PARLEY_API_KEYS" in str(raised.value)
    with pytest.raises(KeyFileError, match="two owners"):
        Auth(keys_from("alice:same-secret,bob:same-secret", None))
    with pytest.raises(KeyFileError, match="PARLEY_API_KEYS_FILE"):
        keys_from(None, str(tmp_path / "missing"))
    key_file = tmp_path / "keys"
    key_file.write_text("# owner:key, one a line\n\nalice:k1\n  bob : k2  \nbroken-secret\n")
    with pytest.raises(KeyFileError, match="entry 5") as raised:
        keys_from(None, str(key_file))
    assert "secret" not in str(raised.value)


async def test_a_key_file_and_no_key_in_any_response_or_log_line(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# parley's keys\nalice:{ALICE}\n\nbob:{BOB}\n")
    log = tmp_path / "server.log"
    env = {"PARLEY_API_KEYS_FILE": str(key_file), "PARLEY_DATA_DIR": str(tmp_path / "data")}
    server = subprocesses(env, ("--log-level", "debug"), log=log).start()
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await assert_isolated(client, as_(ALICE), as_(BOB))
        wrong = [f"{ALICE}x", ALICE[:-1], f"alice:{ALICE}", BOB.upper()]
        for key in wrong:
            for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}, {"authorization": key}):
                for method, path in ENDPOINTS:
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code == 401
                    seen += [response.text, str(response.headers)]
        for headers in (as_(ALICE), {"x-api-key": BOB}):
            for method, path in ENDPOINTS:
                response = await client.request(method, path, headers=headers)
                assert response.status_code < 500, response.text
                seen += [response.text, str(response.headers)]
    server.stop()
    logged = log.read_text()
    assert "Uvicorn running" in logged or "Application startup complete" in logged  # the log was captured
    for secret in (ALICE, BOB, ALICE[:-1], BOB.upper()):
        assert all(secret not in text for text in seen)
        assert secret not in logged


class HeaderBackend(AuthenticationBackend):
    """The host's own sign-in, as small as it gets: the user named in X-User, if it is a known one."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-user")
        if name not in {"alice", "bob"}:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


async def test_embedded_the_host_apps_users_are_the_owners(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    # The host's users decide, even with keys configured: parley adds no auth of its own.
    parley = create_app(make_settings(tmp_path, api_keys=KEYS))
    host = Starlette(
        routes=[Mount("/chat", app=parley)], middleware=[Middleware(AuthenticationMiddleware, backend=HeaderBackend())]
    )
    async with httpx.AsyncClient(base_url=serve(host).url + "/chat", timeout=10) as client:
        await assert_isolated(client, {"x-user": "alice"}, {"x-user": "bob"})
        for headers in ({}, {"x-user": "mallory"}, as_(ALICE)):
            for method, path in ENDPOINTS:
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, response.text
                assert response.json() == {"status": "error", "message": "Authentication required."}
                assert "www-authenticate" not in response.headers
        assert (await client.get("/healthz")).status_code == 200


async def test_open_mode_warns_once_and_serves_everyone_as_one_owner(
    live: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="parley"):
        server = live()
        async with server.client() as client:
            session_id = await create(client, {})
            assert (await client.get(f"/api/v1/sessions/{session_id}", headers=as_("anything"))).status_code == 200
            assert (await client.get("/api/v1/sessions")).json()["sessions"][0]["ui_session_id"] == session_id
    warnings = [r.getMessage() for r in caplog.records if r.name == "parley" and "API is open" in r.getMessage()]
    assert len(warnings) == 1


async def test_cors_lets_the_allowed_origins_read_the_interaction_id(live: Callable[..., LiveServer]) -> None:
    async with live(cors_origins=("http://ui.example",), api_keys=KEYS).client() as client:
        preflight = await client.options(
            "/api/v1/chat",
            headers={
                "origin": "http://ui.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        session_id = await create(client, as_(ALICE))
        headers = {**as_(ALICE), "origin": "http://ui.example"}
        reply = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"}, headers=headers)
        assert reply.text == "hi"
        assert reply.headers["access-control-allow-origin"] == "http://ui.example"
        exposed = {name.strip() for name in reply.headers["access-control-expose-headers"].lower().split(",")}
        assert exposed == {"x-interaction-id", "x-request-id"}
        refused = await client.get("/api/v1/sessions", headers={"origin": "http://ui.example"})
        assert refused.status_code == 401  # a browser can read why
        assert refused.headers["access-control-allow-origin"] == "http://ui.example"
        other = await client.get("/api/v1/sessions", headers={**as_(ALICE), "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_no_cors_headers_unless_configured(live: Callable[..., LiveServer]) -> None:
    async with live().client() as client:
        response = await client.get("/api/v1/sessions", headers={"origin": "http://ui.example"})
        assert "access-control-allow-origin" not in response.headers


async def test_sessions_stored_before_owners_are_served_in_open_mode_on_sqlite(
    live: Callable[..., LiveServer], tmp_path: Path
) -> None:
    from tests.test_store import _old_sqlite_file

    (tmp_path / "data").mkdir()
    _old_sqlite_file(tmp_path / "data" / "parley.db")
    async with live().client() as client:
        await assert_old_session_served(client)


async def test_sessions_stored_before_owners_are_served_in_open_mode_on_redis(
    live: Callable[..., LiveServer], redis_server: Any
) -> None:
    from parley.sessions.redis import connect

    redis = connect(redis_server.url)
    await redis.hset("parley:session:old", mapping={"agent": "echo", "created_at": "2025-01-01T00:00:00Z"})
    await redis.zadd("parley:sessions", {"old": 1735689600.0})
    await redis.hset(
        "parley:msg:msg_1",
        mapping={
            "id": "msg_1",
            "session_id": "old",
            "role": "user",
            "content": "from before",
            "file_ids": "[]",
            "status": "complete",
            "interaction_id": "int_1",
            "created_at": "2025-01-01T00:00:01Z",
        },
    )
    await redis.rpush("parley:messages:old", "msg_1")
    await redis.aclose()
    # Moved to the layout with hash tags by the command the README names, as an operator does once.
    moved = await anyio.run_process([sys.executable, "-m", "parley.sessions.redis_migrate", redis_server.url])
    assert "moved 1 session" in moved.stdout.decode()
    async with live(redis_url=redis_server.url).client() as client:
        await assert_old_session_served(client)


async def assert_old_session_served(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/api/v1/sessions")).json()["sessions"]
    assert [s["ui_session_id"] for s in listed] == ["old"]
    assert (await client.get("/api/v1/sessions/old")).json()["status"] == "idle"
    reply = await client.post("/api/v1/chat", data={"ui_session_id": "old", "message": "after"})
    assert reply.text == "after"
    history = await messages(client, "old")
    assert [m["content"] for m in history] == ["from before", "after", "after"]


# Two workers on the test's redis-server (see conftest.pair), with keys and a slow echo.
_KEYED_WORKERS = {"PARLEY_API_KEYS": KEYS, "PARLEY_ECHO_DELAY": "0.02"}


async def test_two_owners_across_two_workers_on_redis(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: Any
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server, **_KEYED_WORKERS, PARLEY_REDIS_LEASE_SECONDS="10")
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        await assert_isolated(client, as_(ALICE), as_(BOB))
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions", headers=as_(ALICE))).json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": SLOW}
        received = ""
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=data, headers=as_(ALICE)) as response:
            interaction_id = response.headers["x-interaction-id"]
            async for chunk in response.aiter_text():
                if not received:
                    for fields in ({}, {"interaction_id": interaction_id}):
                        answer = await client.post(
                            f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id, **fields}, headers=as_(BOB)
                        )
                        assert answer.status_code == 404, answer.text
                    status = await client.get(f"{b.url}/api/v1/sessions/{session_id}", headers=as_(ALICE))
                    assert status.json()["status"] == "streaming"
                received += chunk
        assert received == SLOW

        async def recorded() -> bool:
            url = f"{b.url}/api/v1/sessions/{session_id}/messages"
            turns = (await client.get(url, headers=as_(ALICE))).json()["messages"]
            return bool((turns[-1]["status"], turns[-1]["content"]) == ("complete", SLOW))

        await eventually(recorded)


async def test_another_owners_cancel_for_a_silent_worker_leaves_nothing(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: Any
) -> None:
    # The owning worker is stopped: nobody answers Bob's cancel on the bus, and a cancel left in Redis would stop
    # Alice's reply when it wakes. Bob hears the 404 of a missing session, and nothing is left.
    import signal

    from redis import Redis

    a, b = pair(subprocesses, tmp_path, redis_server, **_KEYED_WORKERS, PARLEY_REDIS_LEASE_SECONDS="8")
    assert a.process is not None
    redis = Redis.from_url(redis_server.url)
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions", headers=as_(ALICE))).json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": SLOW}
        received = ""
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=data, headers=as_(ALICE)) as response:
            async for chunk in response.aiter_text():
                if not received:
                    a.process.send_signal(signal.SIGSTOP)
                    try:
                        answer = await client.post(
                            f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id}, headers=as_(BOB)
                        )
                        missing = await client.post(
                            f"{b.url}/api/v1/cancel", data={"ui_session_id": "ses_missing"}, headers=as_(BOB)
                        )
                        assert answer.status_code == missing.status_code == 404, answer.text
                        assert answer.text.replace(session_id, "<s>") == missing.text.replace("ses_missing", "<s>")
                        assert redis.keys("parley:{*}:cancel-left:*") == []
                    finally:
                        a.process.send_signal(signal.SIGCONT)
                received += chunk
    redis.close()
    assert received == SLOW


async def test_a_busy_session_of_another_owner_is_a_missing_one(live: Callable[..., LiveServer]) -> None:
    async with live(api_keys=KEYS, echo_delay=0.02).client() as client:
        session_id = await create(client, as_(ALICE))
        data = {"ui_session_id": session_id, "message": SLOW}
        async with client.stream("POST", "/api/v1/chat", data=data, headers=as_(ALICE)) as response:
            async for _ in response.aiter_text():
                busy = await client.post("/api/v1/chat", data={**data, "message": "x"}, headers=as_(ALICE))
                assert busy.status_code == 409  # to its owner, a busy session says so
                theirs = await client.post("/api/v1/chat", data={**data, "message": "x"}, headers=as_(BOB))
                missing = await client.post(
                    "/api/v1/chat", data={"ui_session_id": "ses_missing", "message": "x"}, headers=as_(BOB)
                )
                assert theirs.status_code == missing.status_code == 404
                assert theirs.text.replace(session_id, "<s>") == missing.text.replace("ses_missing", "<s>")
                break


async def test_the_cancel_bus_carries_the_owner(shared_redis_url: str) -> None:
    import secrets

    import anyio

    from parley.sessions.interactions import Interactions
    from parley.sessions.redis import connect
    from parley.sessions.redis_coordinator import RedisCoordinator

    prefix = f"test-{secrets.token_hex(6)}:"
    here = Interactions(RedisCoordinator(connect(shared_redis_url), prefix=prefix))
    there = Interactions(RedisCoordinator(connect(shared_redis_url), prefix=prefix))
    outcomes = []

    async def cancel_as_alice() -> None:
        outcomes.append(await here.cancel("s", owner="alice"))

    async with anyio.create_task_group() as tg:
        await tg.start(there.coordinator.listen, there, tg)  # type: ignore[attr-defined]
        async with anyio.create_task_group() as alice, there.open("s", "alice") as interaction:
            # From another process: Bob's cancel reaches the process, which refuses it; Alice's stops the reply
            # (run in its interaction's scope, as a turn's is), and is answered once the reply is released.
            assert await here.cancel("s", owner="bob") == "not_running"
            assert await here.cancel("s", interaction.id, owner="bob") == "not_running"
            assert interaction.reason is None
            alice.start_soon(cancel_as_alice)
            with interaction.scope:
                await anyio.sleep_forever()
        assert outcomes == ["cancelled_elsewhere"]
        assert interaction.reason == "cancelled"
        tg.cancel_scope.cancel()
    for interactions in (here, there):
        await interactions.coordinator.aclose()  # type: ignore[attr-defined]


async def test_the_streams_per_owner_limit(live: Callable[..., LiveServer]) -> None:
    async with live(api_keys=KEYS, echo_delay=0.02, max_streams_per_owner=1).client() as client:
        first, second = await create(client, as_(ALICE)), await create(client, as_(ALICE))
        bobs = await create(client, as_(BOB))
        await assert_limited(client, client, first, second, bobs)


async def assert_limited(
    a: httpx.AsyncClient, b: httpx.AsyncClient, first: str, second: str, bobs: str, after_words: int = 1
) -> None:
    """With a limit of 1: Alice's second reply (sent to ``b``) is refused while her first (on ``a``) runs."""
    data = {"ui_session_id": first, "message": " ".join(f"w{i}" for i in range(after_words + 60))}
    async with a.stream("POST", "/api/v1/chat", data=data, headers=as_(ALICE)) as response:
        received = ""
        async for chunk in response.aiter_text():
            received += chunk
            if len(received.split()) < after_words:
                continue
            refused = await b.post("/api/v1/chat", data={"ui_session_id": second, "message": "x"}, headers=as_(ALICE))
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["status"] == "error"
            assert "limit is 1" in refused.json()["message"]
            bob = await b.post("/api/v1/chat", data={"ui_session_id": bobs, "message": "bob's"}, headers=as_(BOB))
            assert bob.text == "bob's"  # each owner has a limit of their own
            break
    # The first reply ended (its client went away): the slot is free again, and the refusal recorded nothing.

    async def welcome() -> bool:
        answer = await b.post("/api/v1/chat", data={"ui_session_id": second, "message": "now"}, headers=as_(ALICE))
        assert answer.status_code in (200, 429), answer.text
        return answer.status_code == 200

    await eventually(welcome)
    history = (await b.get(f"/api/v1/sessions/{second}/messages", headers=as_(ALICE))).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [("user", "now"), ("assistant", "now")]


@pytest.mark.parametrize("redis", ["redis_server", "redis_cluster"])
async def test_the_streams_per_owner_limit_across_two_workers_on_redis(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis: str, request: pytest.FixtureRequest
) -> None:
    # On one Redis the slot is taken in the claim's script; on a cluster (where the owner's slots and the
    # session's keys live in different hash slots) in a round trip of its own.
    server = request.getfixturevalue(redis)
    env = {
        "PARLEY_API_KEYS": KEYS,
        "PARLEY_REDIS_URL": server.url,
        "PARLEY_REDIS_CLUSTER": "1" if server.cluster else "0",
        "PARLEY_ECHO_DELAY": "0.02",
        "PARLEY_MAX_STREAMS_PER_OWNER": "1",
        "PARLEY_REDIS_LEASE_SECONDS": "1",  # so the slot must be renewed while the reply runs
        "PARLEY_DATA_DIR": str(tmp_path / "shared"),
    }
    one, two = start_together(subprocesses(env), subprocesses(env))
    async with httpx.AsyncClient(base_url=one.url, timeout=10) as a, httpx.AsyncClient(base_url=two.url) as b:
        first, second = await create(a, as_(ALICE)), await create(a, as_(ALICE))
        bobs = await create(a, as_(BOB))
        # 100 words at 0.02 s: past a lease or two, so the slot held only because its worker renewed it.
        await assert_limited(a, b, first, second, bobs, after_words=100)


class Owners:
    """A turn observer that notes whose turns end."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def turn_started(self, turn: Any) -> None:
        pass

    def first_token(self, turn: Any) -> None:
        pass

    def turn_ended(self, turn: Any) -> None:
        self.ended.append(turn.owner)


async def test_turn_observers_see_the_owner(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    owners = Owners()
    server = serve(create_app(make_settings(tmp_path, api_keys=KEYS), observers=[owners]))
    async with server.client() as client:
        for key in (ALICE, BOB):
            session_id = await create(client, as_(key))
            reply = await client.post(
                "/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"}, headers=as_(key)
            )
            assert reply.text == "hi"
    await eventually(lambda: _equals(owners.ended, ["alice", "bob"]))


async def _equals(value: object, expected: object) -> bool:
    return value == expected


async def assert_bob_changes_nothing(alice_url: str, bob_urls: list[str], chats: int = 12) -> None:
    """Bob posts chats to Alice's session and cancels it, as fast as he can, from every worker, while Alice chats:
    every one of her chats streams in full and is recorded, and every one of his requests is a 404."""
    words = "one two three four five six"
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{alice_url}/api/v1/sessions", headers=as_(ALICE))
        session_id = response.json()["ui_session_id"]
        bob_answers: list[int] = []
        done = False

        async def bob(url: str, path: str, data: dict[str, str]) -> None:
            while not done:
                answer = await client.post(f"{url}{path}", data=data, headers=as_(BOB))
                bob_answers.append(answer.status_code)

        async with anyio.create_task_group() as tg:
            for url in bob_urls:
                tg.start_soon(bob, url, "/api/v1/chat", {"ui_session_id": session_id, "message": "mine now"})
                tg.start_soon(bob, url, "/api/v1/cancel", {"ui_session_id": session_id})
            try:
                for _ in range(chats):
                    data = {"ui_session_id": session_id, "message": words}
                    answer = await client.post(f"{alice_url}/api/v1/chat", data=data, headers=as_(ALICE))
                    assert (answer.status_code, answer.text) == (200, words)
            finally:
                done = True
        url = f"{alice_url}/api/v1/sessions/{session_id}/messages"
        turns = (await client.get(url, headers=as_(ALICE))).json()["messages"]
        assert [(t["role"], t["content"], t["status"]) for t in turns] == chats * [
            ("user", words, "complete"),
            ("assistant", words, "complete"),
        ]
        assert bob_answers and set(bob_answers) == {404}, sorted(set(bob_answers))


async def test_another_owners_chats_and_cancels_change_nothing_for_the_owner(live: Callable[..., LiveServer]) -> None:
    server = live(api_keys=KEYS, echo_delay=0.005)
    await assert_bob_changes_nothing(server.url, [server.url])


async def test_another_owners_chats_and_cancels_change_nothing_for_the_owner_on_redis(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: Any
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server, **{**_KEYED_WORKERS, "PARLEY_ECHO_DELAY": "0.005"})
    await assert_bob_changes_nothing(a.url, [a.url, b.url])
