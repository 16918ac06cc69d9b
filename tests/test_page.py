"""The chat page in a real Chromium (Debian's), against a real uvicorn: what a person sees, checked against history."""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, Route, expect
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Mount

from page import UI_DIR
from parley.app import create_app
from tests.conftest import LiveServer, RedisServer, free_port, make_settings
from tests.openai_stub import OpenAIStub

WAIT = 15_000  # ms: generous, the machine may be busy
WORDS = " ".join(f"w{i}" for i in range(120))
expect.set_options(timeout=WAIT)


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """New pages (``open_page(url)``), like tabs of one browser profile: they share localStorage.
    ``open_page(url, new_profile=True)`` starts another profile. Any script error on a page fails the test."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_(url: str | None = None, *, new_profile: bool = False) -> Page:
        if new_profile or not contexts:
            contexts.append(browser.new_context())
            contexts[-1].set_default_timeout(WAIT)
        page = contexts[-1].new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        if url is not None:
            page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == []


def history(server: LiveServer, session_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/v1/sessions/{session_id}/messages", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


def session_of(page: Page) -> str:
    fragment = page.evaluate("location.hash")
    assert isinstance(fragment, str) and fragment.startswith("#")
    return fragment[1:]


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def reply(page: Page, index: int = -1) -> Locator:
    replies = page.locator('[data-role="assistant"]')
    return replies.last if index == -1 else replies.nth(index)


def content(message: Locator) -> str:
    return message.locator("[data-content]").text_content() or ""


def wait_for_words(message: Locator, count: int) -> None:
    deadline = time.monotonic() + WAIT / 1000
    while len(content(message).split()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} words after {WAIT} ms: {content(message)!r}"
        time.sleep(0.02)


def test_send_shows_the_echo_reply_and_history_agrees(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    box = page.get_by_label("Message")
    box.press_sequentially("Hello,  parley!")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("Second line.")
    expect(page.locator("[data-role]")).to_have_count(0)
    box.press("Enter")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    session_id = session_of(page)
    recorded = history(server, session_id)
    assert [(m["role"], m["status"]) for m in recorded] == [("user", "complete"), ("assistant", "complete")]
    assert content(reply(page)) == recorded[1]["content"] == "Hello,  parley!\nSecond line."
    assert content(page.locator('[data-role="user"]')) == recorded[0]["content"]
    expect(reply(page)).to_have_attribute("data-message-id", recorded[1]["id"])  # from the SSE start frame
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_label("Message")).to_have_value("")
    # The session is in the URL and in the list: a reload (or a shared link) opens it from history.
    expect(page.get_by_role("link", name="Hello, parley! Second line.")).to_have_attribute("aria-current", "page")
    page.reload()
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert content(reply(page)) == recorded[1]["content"]


def test_stop_ends_the_reply_at_once_and_history_agrees(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live(echo_delay=0.05)
    page = open_page(server.url + "/")
    send(page, WORDS)
    expect(reply(page)).to_have_attribute("data-status", "streaming")
    wait_for_words(reply(page), 5)
    page.get_by_role("button", name="Stop").click()
    expect(reply(page)).to_have_attribute("data-status", "cancelled")
    expect(reply(page).get_by_text("cancelled", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    recorded = history(server, session_of(page))
    assert recorded[-1]["status"] == "cancelled"
    assert content(reply(page)) == recorded[-1]["content"]
    assert 5 <= len(recorded[-1]["content"].split()) < 120

    # Esc stops too; the history view shows each reply's status.
    send(page, WORDS)
    wait_for_words(reply(page, 1), 3)
    page.keyboard.press("Escape")
    expect(reply(page, 1)).to_have_attribute("data-status", "cancelled")
    recorded = history(server, session_of(page))
    assert content(reply(page, 1)) == recorded[-1]["content"]
    page.reload()
    expect(reply(page, 0)).to_have_attribute("data-status", "cancelled")
    expect(reply(page, 1)).to_have_attribute("data-status", "cancelled")
    assert content(reply(page, 1)) == recorded[-1]["content"]


def test_a_reload_mid_reply_rejoins_it_without_a_gap_or_a_repeat(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(echo_delay=0.05)
    page = open_page(server.url + "/")
    send(page, WORDS)
    wait_for_words(reply(page), 5)
    before = content(reply(page))
    page.reload()
    # The rejoined reply streams on, in one message; every text seen is a prefix of the next one.
    expect(reply(page)).to_have_attribute("data-status", "streaming")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    seen = [content(reply(page))]
    while reply(page).get_attribute("data-status") == "streaming":
        seen.append(content(reply(page)))
        time.sleep(0.02)
    expect(reply(page)).to_have_attribute("data-status", "complete")
    final = content(reply(page))
    recorded = history(server, session_of(page))
    assert final == recorded[-1]["content"] == WORDS
    assert final.startswith(before)
    assert all(final.startswith(text) for text in seen)
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(seen))
    assert len({text for text in seen}) > 3  # it was seen growing after the reload
    expect(page.locator('[data-role="user"]')).to_have_count(1)
    expect(page.locator('[data-role="assistant"]')).to_have_count(1)


def test_another_tab_follows_a_running_reply_and_can_stop_it(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live(echo_delay=0.05)
    first = open_page(server.url + "/")
    send(first, WORDS)
    wait_for_words(reply(first), 3)
    second = open_page(f"{server.url}/#{session_of(first)}")
    expect(reply(second)).to_have_attribute("data-status", "streaming")
    wait_for_words(reply(second), len(content(reply(first)).split()) + 2)
    second.get_by_role("button", name="Stop").click()
    expect(reply(second)).to_have_attribute("data-status", "cancelled")
    expect(reply(first)).to_have_attribute("data-status", "cancelled")
    recorded = history(server, session_of(first))
    assert content(reply(first)) == content(reply(second)) == recorded[-1]["content"]


class CuttingProxy:
    """A TCP proxy in front of a server that cuts the connection carrying the first chat reply once it has passed
    a few text deltas: a network drop, as when a phone changes networks. It keeps what clients sent."""

    def __init__(self, upstream: str, after: int = 5) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.after = after
        self.armed = True
        self.cut = threading.Event()
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            chat = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, chat, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, chat, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, chat: threading.Event, upward: bool) -> None:
        seen = b""
        try:
            while data := source.recv(65536):
                with self.lock:
                    if upward:
                        self.sent += data
                        if self.armed and b"POST /api/v1/chat " in data:
                            chat.set()
                    elif chat.is_set() and self.armed:
                        seen += data
                        if seen.count(b'"text-delta"') >= self.after:
                            self.armed = False
                            self.cut.set()
                            return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_dropped_connection_is_picked_up_after_its_last_frame(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(echo_delay=0.05)
    proxy = CuttingProxy(server.url)
    try:
        page = open_page(proxy.url + "/")
        send(page, WORDS)
        expect(reply(page)).to_have_attribute("data-status", "complete")
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    recorded = history(server, session_of(page))
    assert content(reply(page)) == recorded[-1]["content"] == WORDS
    expect(page.get_by_role("alert")).to_be_hidden()
    # It went on from the last frame that came, not from the start.
    rejoin = bytes(proxy.sent).lower().split(b"get /api/v1/chat/")[1].split(b"\r\n\r\n")[0]
    assert b"\r\nlast-event-id: " in rejoin


def test_leaving_a_reply_lets_it_run_to_its_end(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live(echo_delay=0.02)
    page = open_page(server.url + "/")
    send(page, WORDS)
    wait_for_words(reply(page), 3)
    session_id = session_of(page)
    page.get_by_role("button", name="New session").click()
    expect(page.locator("[data-role]")).to_have_count(0)
    deadline = time.monotonic() + WAIT / 1000
    while (recorded := history(server, session_id))[-1]["status"] == "streaming":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (recorded[-1]["status"], recorded[-1]["content"]) == ("complete", WORDS)


def test_attached_files_show_as_chips_and_reach_the_agent(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    page.get_by_label("Attach").set_input_files(
        [
            {"name": "notes.md", "mimeType": "text/markdown", "buffer": b"# Notes\nhello\n"},
            {"name": "data.bin", "mimeType": "application/octet-stream", "buffer": bytes(300)},
        ]
    )
    expect(page.get_by_role("list", name="Files to send").get_by_role("listitem")).to_have_count(2)
    send(page, "Summarise these")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    chips = page.locator('[data-role="user"] .chip')
    expect(chips).to_have_text(["notes.md", "data.bin"])
    expect(page.get_by_role("list", name="Files to send").get_by_role("listitem")).to_have_count(0)
    text = content(reply(page))
    assert "[file: notes.md, 14 bytes]" in text
    assert "[file: data.bin, 300 bytes]" in text
    recorded = history(server, session_of(page))
    assert text == recorded[1]["content"]
    assert len(recorded[0]["file_ids"]) == 2
    # The history view shows the chips too.
    page.reload()
    expect(page.locator('[data-role="user"] .chip')).to_have_text(["notes.md", "data.bin"])


def test_markup_from_users_and_files_stays_text(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    attack = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    page.get_by_label("Attach").set_input_files(
        [{"name": "<img src=x onerror=alert(3)>.txt", "mimeType": "text/plain", "buffer": b"<b>bold</b>"}]
    )
    send(page, attack)
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert content(page.locator('[data-role="user"]')) == attack
    assert content(reply(page)).startswith(attack)
    expect(page.locator('[data-role="user"] .chip')).to_have_text("<img src=x onerror=alert(3)>.txt")
    page.reload()  # the history view and the session list render the same text
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert content(page.locator('[data-role="user"]')) == attack
    assert page.locator("main img, main script, nav img, nav script").count() == 0
    assert dialogs == []

    script = (UI_DIR / "app.js").read_text()
    assert not any(sink in script for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))
    response = httpx.get(server.url + "/", timeout=10)
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no other origin
    assert directives["connect-src"] == "'self'"
    assert "<script>" not in response.text.replace('<script type="module" src="ui/app.js"></script>', "")


def test_a_busy_session_shows_the_409_in_words(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live(echo_delay=0.05)
    first = open_page(server.url + "/")
    send(first, "start")
    expect(reply(first)).to_have_attribute("data-status", "complete")
    session_id = session_of(first)
    second = open_page(f"{server.url}/#{session_id}")
    expect(reply(second)).to_have_attribute("data-status", "complete")

    send(first, WORDS)
    wait_for_words(reply(first), 2)
    send(second, "me too")
    expect(second.get_by_role("alert")).to_contain_text("This session is busy")
    expect(second.get_by_role("alert")).to_contain_text("in progress")
    # Nothing was recorded, and the message is back in the box to send again.
    expect(second.get_by_label("Message")).to_have_value("me too")
    expect(second.locator("[data-role]")).to_have_count(2)
    first.get_by_role("button", name="Stop").click()
    expect(reply(first)).to_have_attribute("data-status", "cancelled")
    assert [m["content"] for m in history(server, session_id) if m["role"] == "user"] == ["start", WORDS]


def test_too_large_is_said_in_words(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live(max_message_bytes=16)
    page = open_page(server.url + "/")
    send(page, "this message is over sixteen bytes")
    expect(page.get_by_role("alert")).to_contain_text("Too large.")
    expect(page.get_by_label("Message")).to_have_value("this message is over sixteen bytes")


def test_a_failing_model_server_is_said_in_words(live: Callable[..., LiveServer], open_page: Any) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1"  # a closed port: the connection is refused
    server = live(openai_base_url=nobody, agent="openai", openai_connect_timeout=2.0)
    page = open_page(server.url + "/")
    send(page, "hello model")
    expect(page.get_by_role("alert")).to_contain_text("The model server failed.")
    expect(page.get_by_label("Message")).to_have_value("hello model")
    expect(page.locator("[data-role]")).to_have_count(0)


def test_a_model_failing_mid_reply_shows_the_error_and_keeps_the_text(
    live: Callable[..., LiveServer], serve: Callable[..., LiveServer], open_page: Any
) -> None:
    model = serve(OpenAIStub())
    server = live(openai_base_url=model.url + "/v1", openai_model="error-event", agent="openai")
    page = open_page(server.url + "/")
    send(page, "hello model")
    expect(reply(page)).to_have_attribute("data-status", "error")
    expect(page.get_by_role("alert")).to_contain_text("The agent failed:")
    expect(reply(page).get_by_text("error", exact=True)).to_be_visible()
    recorded = history(server, session_of(page))
    assert recorded[-1]["status"] == "error"
    assert content(reply(page)) == recorded[-1]["content"] == "tok0 "


def test_redis_down_is_said_in_words(
    live: Callable[..., LiveServer], open_page: Any, redis_server: RedisServer
) -> None:
    server = live(redis_url=redis_server.url)
    page = open_page(server.url + "/")
    send(page, "before")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    redis_server.stop()
    send(page, "after")
    expect(page.get_by_role("alert")).to_contain_text("parley is unavailable right now.")
    expect(page.get_by_label("Message")).to_have_value("after")


def test_an_unreachable_server_is_said_in_words(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page()
    page.route("**/api/v1/sessions?*", lambda route: route.abort("connectionrefused"))
    page.goto(server.url + "/")
    expect(page.get_by_role("alert")).to_contain_text("Network error: parley could not be reached")


def test_sessions_new_open_and_delete(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    send(page, "first session")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    first = session_of(page)
    page.get_by_role("button", name="New session").click()
    expect(page.locator("[data-role]")).to_have_count(0)
    send(page, "second session")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    second = session_of(page)
    assert first != second
    links = page.get_by_role("navigation", name="Sessions").get_by_role("link")
    expect(links).to_have_count(2)
    expect(links.first).to_contain_text("second session")  # newest first
    expect(links.last).to_contain_text("first session")

    links.last.click()
    expect(page.locator('[data-role="user"] [data-content]')).to_have_text(["first session"])
    assert session_of(page) == first
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete session").click()
    expect(links).to_have_count(1)
    expect(page.locator("[data-role]")).to_have_count(0)
    assert httpx.get(f"{server.url}/api/v1/sessions/{first}", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/api/v1/sessions/{second}", timeout=10).status_code == 200


def test_the_page_works_under_a_mount_prefix(serve: Callable[..., LiveServer], tmp_path: Path, open_page: Any) -> None:
    server = serve(Starlette(routes=[Mount("/chat", app=create_app(make_settings(tmp_path)))]))
    page = open_page(server.url + "/chat/")
    send(page, "mounted")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert content(reply(page)) == "mounted"
    assert httpx.get(server.url + "/", timeout=10).status_code == 404


def test_readable_at_phone_width(live: Callable[..., LiveServer], open_page: Any, tmp_path: Path) -> None:
    server = live()
    page = open_page()
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(server.url + "/")
    send(page, "a long line without spaces: " + "x" * 300)
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for name in ("New session", "Delete session", "Send", "Attach"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, name
    page.screenshot(path=str(tmp_path / "phone.png"))


def test_keyboard_reaches_every_control_and_the_theme_follows_the_system(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live()
    page = open_page(server.url + "/")
    send(page, "hello")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    page.evaluate("document.activeElement.blur()")
    reached = []
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.getAttribute('aria-label') || document.activeElement.id"))
    for control in ("new-session", "delete-session", "attach", "Message", "send"):
        assert control in reached, reached
    background = "getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="light")
    light = page.evaluate(background)
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate(background)
    assert light == "rgb(255, 255, 255)" and dark != light


def test_with_api_keys_the_page_asks_for_one_and_each_key_sees_its_own(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(api_keys="alice:key-of-alice,bob:key-of-bob")
    assert httpx.get(server.url + "/", timeout=10).status_code == 200  # the page itself needs no key
    alice = open_page(server.url + "/")
    alice.get_by_label("API key").fill("key-of-alice")
    alice.get_by_label("API key").press("Enter")
    expect(alice.get_by_label("API key")).to_be_hidden()
    send(alice, "from alice")
    expect(reply(alice)).to_have_attribute("data-status", "complete")
    alice_session = session_of(alice)
    alice_key = {"Authorization": "Bearer key-of-alice"}
    assert content(reply(alice)) == history(server, alice_session, alice_key)[1]["content"] == "from alice"

    bob = open_page(server.url + "/", new_profile=True)
    bob.get_by_label("API key").fill("key-of-bob")
    bob.get_by_role("button", name="Use this key").click()
    expect(bob.get_by_text("No sessions yet.")).to_be_visible()
    send(bob, "from bob")
    expect(reply(bob)).to_have_attribute("data-status", "complete")
    bob_links = bob.get_by_role("navigation", name="Sessions").get_by_role("link")
    expect(bob_links).to_have_text([re.compile("from bob")])
    # A shared link to someone else's session shows nothing of it.
    bob.goto(f"{server.url}/#{alice_session}")
    expect(bob.get_by_role("alert")).to_contain_text(f"There is no session {alice_session}")
    expect(bob.locator("[data-role]")).to_have_count(0)

    # The key is kept: a reload asks nothing and lists alice's sessions only.
    alice.reload()
    alice_links = alice.get_by_role("navigation", name="Sessions").get_by_role("link")
    expect(alice_links).to_have_text([re.compile("from alice")])
    expect(reply(alice)).to_have_attribute("data-status", "complete")
    expect(alice.get_by_label("API key")).to_be_hidden()

    # A key that stops working is asked for again.
    alice.evaluate("localStorage.setItem('parley.apiKey', 'revoked')")
    alice.reload()
    expect(alice.get_by_text("The saved key was refused")).to_be_visible()
    alice.get_by_label("API key").fill("key-of-alice")
    alice.get_by_label("API key").press("Enter")
    expect(alice_links).to_have_text([re.compile("from alice")])


class CookieUsers(AuthenticationBackend):
    """A host app's own sign-in: the user named by a cookie."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.cookies.get("user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name in {"alice", "bob"} else None


def test_embedded_behind_the_hosts_sign_in_it_uses_the_hosts_cookies(
    serve: Callable[..., LiveServer], tmp_path: Path, open_page: Any
) -> None:
    host = Starlette(
        routes=[Mount("/chat", app=create_app(make_settings(tmp_path)))],
        middleware=[Middleware(AuthenticationMiddleware, backend=CookieUsers())],
    )
    server = serve(host)
    stranger = open_page(server.url + "/chat/")
    expect(stranger.get_by_role("alert")).to_contain_text("You are not signed in.")
    expect(stranger.get_by_label("API key")).to_be_hidden()  # no key would help: the host signs people in

    alice = open_page(new_profile=True)
    alice.context.add_cookies([{"name": "user", "value": "alice", "url": server.url}])
    alice.goto(server.url + "/chat/")
    send(alice, "from alice")
    expect(reply(alice)).to_have_attribute("data-status", "complete")
    assert content(reply(alice)) == "from alice"
    expect(alice.get_by_role("alert")).to_be_hidden()


def test_ui_false_leaves_the_page_out(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    server = serve(create_app(make_settings(tmp_path), ui=False))
    for path in ("/", "/ui/app.js", "/ui/style.css"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 404
        assert response.json()["status"] == "error"
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def acting_parley(serve: Callable[..., LiveServer], tmp_path: Path, delay: float = 0.0) -> tuple[LiveServer, Any]:
    """A parley whose default agent reasons, calls a tool and answers (tests/acting.py), and that agent."""
    from tests import acting

    agents = acting.agents(delay)
    return serve(create_app(make_settings(tmp_path, agent="acting"), agents=agents)), agents["acting"]


def test_reasoning_and_a_tool_card_show_as_they_stream_and_from_history(
    serve: Callable[..., LiveServer], tmp_path: Path, open_page: Any
) -> None:
    from tests import acting

    server, _ = acting_parley(serve, tmp_path, delay=0.3)
    page = open_page(server.url + "/")
    send(page, "what is 2 + 3?")
    reasoning = reply(page).locator('[data-part="reasoning"]')
    expect(reasoning).to_have_attribute("open", "")  # open while it streams
    card = reply(page).locator('[data-part="tool"]')
    expect(card).to_have_attribute("data-tool-name", "add")
    expect(card).to_have_attribute("data-state", "output-available")
    expect(card.locator(".tool-output")).to_contain_text('"sum": 5')
    expect(card.locator(".tool-input")).to_contain_text('"a": 2')
    expect(reply(page)).to_have_attribute("data-status", "complete")
    expect(reasoning).not_to_have_attribute("open", "")  # collapsed once done
    expect(reasoning.locator(".reasoning-text")).to_have_text("".join(acting.REASONING))
    recorded = history(server, session_of(page))
    texts = reply(page).locator('[data-part="text"]')
    assert texts.all_text_contents() == [p["text"] for p in recorded[-1]["parts"] if p["type"] == "text"]
    kinds = reply(page).locator("[data-part]").evaluate_all("elements => elements.map(e => e.dataset.part)")
    assert kinds == ["reasoning", "text", "tool", "text"]
    page.reload()  # from history's parts
    expect(reply(page).locator('[data-part="tool"]')).to_have_attribute("data-state", "output-available")
    kinds = reply(page).locator("[data-part]").evaluate_all("elements => elements.map(e => e.dataset.part)")
    assert kinds == ["reasoning", "text", "tool", "text"]
    assert reply(page).locator('[data-part="text"]').all_text_contents() == texts.all_text_contents()


def test_stop_during_a_tool_call(serve: Callable[..., LiveServer], tmp_path: Path, open_page: Any) -> None:
    server, agent = acting_parley(serve, tmp_path)
    page = open_page(server.url + "/")
    send(page, "a slow sum")
    card = reply(page).locator('[data-part="tool"]')
    expect(card).to_have_attribute("data-state", "input-available")
    page.get_by_role("button", name="Stop").click()
    expect(reply(page)).to_have_attribute("data-status", "cancelled")
    expect(card).to_have_attribute("data-state", "output-error")
    expect(card.locator(".tool-output")).to_contain_text("Cancelled")
    recorded = history(server, session_of(page))[-1]
    assert recorded["status"] == "cancelled" and recorded["parts"][-1]["state"] == "output-error"
    assert agent.tool_runs == ["cancelled"]
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_a_reload_during_a_tool_call_rejoins_it_and_stop_still_works(
    serve: Callable[..., LiveServer], tmp_path: Path, open_page: Any
) -> None:
    from tests import acting

    server, agent = acting_parley(serve, tmp_path)
    page = open_page(server.url + "/")
    send(page, "a slow sum")
    expect(reply(page).locator('[data-part="tool"]')).to_have_attribute("data-state", "input-available")
    page.reload()  # history's parts so far, then the rejoin's replay of every part, then live
    card = reply(page).locator('[data-part="tool"]')
    expect(reply(page)).to_have_attribute("data-status", "streaming")
    expect(card).to_have_attribute("data-state", "input-available")
    expect(reply(page).locator('[data-part="text"]')).to_have_text("".join(acting.BEFORE_TOOL))
    page.get_by_role("button", name="Stop").click()
    expect(reply(page)).to_have_attribute("data-status", "cancelled")
    expect(card).to_have_attribute("data-state", "output-error")
    kinds = reply(page).locator("[data-part]").evaluate_all("elements => elements.map(e => e.dataset.part)")
    assert kinds == ["reasoning", "text", "tool"]
    assert agent.tool_runs == ["cancelled"]


def test_the_session_list_is_titled_with_one_request(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for text in ("  how do   lists work?", "a named one", "the third"):
            session_id = client.post("/api/v1/sessions").json()["ui_session_id"]
            assert client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": text}).status_code == 200
        client.patch(f"/api/v1/sessions/{session_id}", json={"title": "Renamed by its owner"})
    requests: list[str] = []
    page = open_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url + "/")
    links = page.get_by_role("navigation", name="Sessions").get_by_role("link")
    expect(links).to_have_count(3)
    titles = [(links.nth(index).text_content() or "") for index in range(3)]
    # Newest first: the third (renamed), the second, the first (whitespace folded); each with its date after it.
    starts = ("Renamed by its owner", "a named one", "how do lists work?")
    assert all(title.startswith(start) for title, start in zip(titles, starts, strict=True)), titles
    assert [url for url in requests if "/api/v1/sessions" in url] == [server.url + "/api/v1/sessions?limit=100"]


def shown(page: Page) -> list[tuple[str, str, str]]:
    """The page's messages: (id, role, text), as history has them."""
    articles = page.locator("[data-role]")
    return [
        (
            articles.nth(index).get_attribute("data-message-id") or "",
            articles.nth(index).get_attribute("data-role") or "",
            content(articles.nth(index)),
        )
        for index in range(articles.count())
    ]


def kept(server: LiveServer, session_id: str) -> list[tuple[str, str, str]]:
    return [(m["id"], m["role"], m["content"]) for m in history(server, session_id)]


def test_regenerate_and_edit_replace_messages_as_history_does(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    send(page, "one")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    send(page, "two")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    session_id = session_of(page)
    before = kept(server, session_id)
    # Regenerate: only on the last reply; a new reply takes its place.
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)
    expect(page.locator("[data-role]").last.get_by_role("button", name="Regenerate")).to_be_visible()
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator("[data-role]")).to_have_count(4)
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)
    after = kept(server, session_id)
    assert after[:3] == before[:3] and after[3][0] != before[3][0] and after[3][2] == "two"
    expect(page.locator("[data-role]").last).to_have_attribute("data-message-id", after[3][0])
    assert shown(page) == after

    # Edit the first message in place: Enter sends it, and what followed it goes.
    expect(page.get_by_role("button", name="Edit")).to_have_count(2)
    page.get_by_role("button", name="Edit").first.click()
    editor = page.get_by_label("Edit message")
    expect(editor).to_have_value("one")
    editor.fill("one, edited")
    editor.press("Enter")
    expect(page.locator("[data-role]")).to_have_count(2)
    expect(reply(page)).to_have_attribute("data-status", "complete")
    expect(page.get_by_role("button", name="Edit")).to_have_count(1)
    after = kept(server, session_id)
    assert [(role, text) for _, role, text in after] == [("user", "one, edited"), ("assistant", "one, edited")]
    expect(page.locator("[data-role]").first).to_have_attribute("data-message-id", after[0][0])
    assert shown(page) == after
    page.reload()
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert shown(page) == after


def test_a_session_can_be_renamed(live: Callable[..., LiveServer], open_page: Any) -> None:
    server = live()
    page = open_page(server.url + "/")
    send(page, "first words")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    page.once("dialog", lambda dialog: dialog.accept("Named by me"))
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_role("heading", name="Named by me")).to_be_visible()
    expect(page.get_by_role("link", name=re.compile("^Named by me"))).to_have_attribute("aria-current", "page")
    assert httpx.get(f"{server.url}/api/v1/sessions/{session_of(page)}", timeout=10).json()["title"] == "Named by me"


def test_sending_while_a_reply_streams_offers_to_stop_it_and_send(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(echo_delay=0.05)
    page = open_page(server.url + "/")
    send(page, WORDS)
    wait_for_words(reply(page), 3)
    asked: list[str] = []

    def accept(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    send(page, "this instead")
    expect(reply(page, 0)).to_have_attribute("data-status", "cancelled")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    assert content(reply(page, 1)) == "this instead"
    assert asked and "Stop it and send" in asked[0]
    recorded = history(server, session_of(page))
    assert [(m["role"], m["status"]) for m in recorded] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert content(reply(page, 0)) == recorded[1]["content"] and len(recorded[1]["content"].split()) < 120


def hold_chats(page: Page, server: LiveServer) -> list[Route]:
    """From now on the page's chat requests wait (the test lets each go with ``route.continue_()``): a Stop can be
    pressed before its reply has started, surely. (test_use_chat's app's too.)"""
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    page.route(f"{server.url}/api/v1/chat", hold)
    return held


def wait_held(page: Page, held: list[Route]) -> Route:
    deadline = time.monotonic() + WAIT / 1000
    while not held:
        assert time.monotonic() < deadline, "the page sent no chat"
        page.wait_for_timeout(20)  # (lets Playwright hand the request to the route)
    return held.pop()


def stop_before_the_start_while_another_reply_runs(
    page: Page, server: LiveServer, session_id: str, send: Callable[[Page, str], None], busy: str
) -> None:
    """Another client's reply runs in the session (ten seconds; it goes on when that client leaves); the page
    sends a message and Stop is pressed before anything of its reply came: the message is refused (``busy``, the
    alert's text), and the other reply, which Stop did not mean, runs to its end. (test_use_chat's app's too.)
    The other reply must outlast the browser's steps: a clean clone's run, loaded, once took over three seconds
    from its start to the page's message, which then found the session free."""
    words = " ".join(f"x{i}" for i in range(200))
    form = {"ui_session_id": session_id, "message": words, "on_disconnect": "continue"}
    with httpx.stream("POST", f"{server.url}/api/v1/chat", data=form, timeout=10) as running:
        next(running.iter_text())
    held = hold_chats(page, server)
    send(page, "me too")
    request = wait_held(page, held)
    page.get_by_role("button", name="Stop").click()
    request.continue_()
    page.unroute(f"{server.url}/api/v1/chat")
    expect(page.get_by_role("alert")).to_contain_text(busy)
    deadline = time.monotonic() + WAIT / 1000
    while (recorded := history(server, session_id))[-1]["status"] == "streaming":
        assert time.monotonic() < deadline, "the other reply did not end"
        time.sleep(0.05)
    assert (recorded[-1]["status"], recorded[-1]["content"]) == ("complete", words)


def test_stop_before_the_reply_starts_stops_that_reply_once_it_has_started(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(echo_delay=0.05)
    page = open_page(server.url + "/")
    held = hold_chats(page, server)
    send(page, WORDS)
    request = wait_held(page, held)
    page.get_by_role("button", name="Stop").click()  # nothing of the reply has come: it has no interaction id yet
    request.continue_()
    expect(reply(page)).to_have_attribute("data-status", "cancelled")
    recorded = history(server, session_of(page))
    assert recorded[-1]["status"] == "cancelled" and len(recorded[-1]["content"].split()) < 120
    assert content(reply(page)) == recorded[-1]["content"]


def test_stop_before_the_reply_starts_never_stops_another_reply(
    live: Callable[..., LiveServer], open_page: Any
) -> None:
    server = live(echo_delay=0.05)
    page = open_page(server.url + "/")
    send(page, "hello")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    session_id = session_of(page)
    stop_before_the_start_while_another_reply_runs(page, server, session_id, send, "This session is busy")
    # Nor is the next reply: the stop went with the message it was for.
    page.get_by_label("Message").fill("")
    send(page, "and now")
    expect(reply(page)).to_have_attribute("data-status", "complete")
    assert content(reply(page)) == "and now"


@pytest.mark.parametrize("fragment", ["%", "%E0%A4%A"])
def test_a_malformed_hash_is_said_in_words(live: Callable[..., LiveServer], open_page: Any, fragment: str) -> None:
    server = live()
    page = open_page(f"{server.url}/#{fragment}")  # (a script error there fails the test: see open_page)
    expect(page.get_by_role("alert")).to_contain_text("not a session id")
    page.evaluate("location.hash = '#%25%'")  # and when the hash changes to one, too
    expect(page.get_by_role("alert")).to_contain_text("not a session id")
    send(page, "still works")
    expect(page.locator(".message.assistant").last).to_contain_text("still works")
