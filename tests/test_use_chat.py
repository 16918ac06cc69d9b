"""A React app as a newcomer builds it from the README's useChat section (tests/ai-sdk/react-app: ``useChat`` from
``@ai-sdk/react``, ``DefaultChatTransport`` from ``ai``, type-checked by tsc and built by Vite), in a real Chromium
against a real uvicorn, once with the AI SDK 7 and once with 6: what the app shows must be what history says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect

from tests.conftest import AI_SDK, ROOT, LiveServer
from tests.test_page import hold_chats, stop_before_the_start_while_another_reply_runs, wait_held

APP = AI_SDK / "react-app"
VITE = AI_SDK / "node_modules" / "vite" / "bin" / "vite.js"
TSC = AI_SDK / "node_modules" / "typescript" / "bin" / "tsc"
WAIT = 15_000  # ms: generous, the machine may be busy
# 100 words at 50 ms: five seconds, long enough to stop or reload mid-reply on a loaded machine.
WORDS = " ".join(f"w{i}" for i in range(100))
expect.set_options(timeout=WAIT)


def test_the_app_is_the_readmes_code() -> None:
    """The app's part between its two README lines is the README's useChat example, less its closing lines."""
    section = (ROOT / "README.md").read_text().split("#### From a React app: `useChat`\n", 1)[1]
    example = section.split("```tsx\n", 1)[1].split("```", 1)[0].splitlines()
    assert example[-2:] == ["  // ... render messages; message.metadata.status says how each reply ended", "}"]
    lines = (APP / "main.tsx").read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*// =+ README", line)]
    assert len(marks) == 2, marks
    assert lines[marks[0] + 1 : marks[1]] == example[:-2]


def node_version(node: str) -> tuple[int, ...]:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in version.strip().lstrip("v").split("."))


@pytest.fixture(scope="module", params=["ai", "ai6"])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app, type-checked by ``tsc`` and built by ``vite build`` (as Vite's react-ts template builds), against
    the AI SDK 7 (``ai``) or 6 (``ai6``: tsconfig.ai6.json and vite.config.js point the app's imports at the npm
    aliases); skipped without Node or ``npm ci`` (``make test`` runs it), unless PARLEY_REQUIRE_NODE=1 (as .ci/run
    sets), which makes that a failure."""
    package: str = request.param
    node = shutil.which("node")
    if node is None:
        reason = "node is not on PATH (apt-get install npm)"
    elif not VITE.exists() or not TSC.exists():
        reason = f"vite or typescript is not installed (cd {AI_SDK.relative_to(ROOT)} && npm ci; make test does it)"
    elif node_version(node) < (20, 19):
        reason = f"Vite 8 needs Node >= 20.19, and this node is {'.'.join(map(str, node_version(node)))}"
    else:
        out = tmp_path_factory.mktemp(f"use-chat-{package}")
        tsconfig = "tsconfig.ai6.json" if package == "ai6" else "tsconfig.json"
        env = {**os.environ, "PARLEY_AI_SDK": package}
        for command in (
            [node, str(TSC), "-p", tsconfig],
            [node, str(VITE), "build", "--outDir", str(out), "--emptyOutDir"],
        ):
            done = subprocess.run(command, cwd=APP, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        return out
    if os.environ.get("PARLEY_REQUIRE_NODE") == "1":
        pytest.fail(f"PARLEY_REQUIRE_NODE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def open_app(browser: Browser, bundle: Path) -> Iterator[Callable[[LiveServer, str], Page]]:
    """``open_app(server, query)``: the app at ``/app/?query`` of parley's own origin, as a site that serves both
    would (the README's code calls ``/api/v1/...`` on its own origin). The browser gets the app's files from the
    build, and everything else from parley. Any script error on the page fails the test."""
    context = browser.new_context()
    context.set_default_timeout(WAIT)
    errors: list[str] = []

    def files(route: Route) -> None:
        name = urlsplit(route.request.url).path.removeprefix("/app/") or "index.html"
        route.fulfill(path=bundle / name)

    def open_(server: LiveServer, query: str = "") -> Page:
        context.route(re.compile(rf"^{re.escape(server.url)}/app/"), files)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server.url}/app/{query}")
        return page

    yield open_
    context.close()
    assert errors == []


def history(server: LiveServer, session_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/v1/sessions/{session_id}/messages", timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


def session_of(page: Page) -> str:
    expect(page).to_have_url(re.compile(r"[?&]session="))
    return re.findall(r"[?&]session=([^&]+)", page.url)[0]


def shown(page: Page) -> list[tuple[str, str, str]]:
    """Every message on the screen: (id, role, text), in order."""
    rows = page.eval_on_selector_all(
        "[data-role]", "all => all.map(m => [m.dataset.id, m.dataset.role, m.querySelector('[data-text]').textContent])"
    )
    return [tuple(row) for row in rows]


def kept(server: LiveServer, session_id: str) -> list[tuple[str, str, str]]:
    return [(m["id"], m["role"], m["content"]) for m in history(server, session_id)]


def last(page: Page) -> Locator:
    return page.locator("article").last


def text(message: Locator) -> str:
    return message.locator("[data-text]").text_content() or ""


def send(page: Page, message: str) -> None:
    page.get_by_label("Message", exact=True).fill(message)
    page.get_by_role("button", name="Send").click()


def settled(page: Page, *, status: str = "complete", not_id: str | None = None, same_id: str | None = None) -> None:
    """Wait until the chat is ready and its last message is a reply that ended with ``status`` (and is another
    message than ``not_id``, or the same as ``same_id``)."""
    last = 'article:last-of-type[data-role="assistant"]'
    last += f'[data-status="{status}"]'
    last += f':not([data-id="{not_id}"])' if not_id else ""
    last += f'[data-id="{same_id}"]' if same_id else ""
    try:
        expect(page.locator(f'main[data-chat-status="ready"] {last}')).to_have_count(1)
    except AssertionError as error:
        state = page.locator("main").get_attribute("data-chat-status")
        alerts = page.get_by_role("alert").all_text_contents()
        statuses = page.eval_on_selector_all("article", "all => all.map(m => m.dataset.status)")
        raise AssertionError(f"chat {state}, alerts {alerts}, statuses {statuses}: {shown(page)}") from error


def words_in(page: Page, count: int) -> None:
    """Wait until the last message is a reply with at least ``count`` words on the screen."""
    page.wait_for_function(
        """count => {
            const last = [...document.querySelectorAll('article')].at(-1);
            const words = last?.querySelector('[data-text]')?.textContent.split(' ').filter(Boolean) ?? [];
            return last?.dataset.role === 'assistant' && words.length >= count;
        }""",
        arg=count,
    )


def test_send_stop_reload_regenerate_edit_and_reload_show_what_history_keeps(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live(echo_delay=0.05, checkpoint_seconds=0.1)
    page = open_app(server, "")
    # No ?session=: the app made one and put it in the address, as the README's recipe starts.
    session_id = session_of(page)
    expect(page.locator("main")).to_have_attribute("data-chat-status", "ready")

    # Send: the echo, complete; the screen is history (the SDK's id for the question, parley's for the reply).
    send(page, "Hello,  parley!")
    settled(page)
    assert text(last(page)) == "Hello,  parley!"
    assert shown(page) == kept(server, session_id)

    # Stop (wired to POST /api/v1/cancel with the reply's interaction id): the reply ends at once with the words
    # it had, no error in the chat; history says cancelled, with that text.
    send(page, WORDS)
    words_in(page, 5)
    page.get_by_role("button", name="Stop").click()
    settled(page, status="cancelled")
    expect(page.get_by_role("alert")).to_have_count(0)
    stopped = text(last(page))
    assert WORDS.startswith(stopped) and len(stopped.split()) >= 5 and stopped != WORDS
    recorded = history(server, session_id)[-1]
    assert (recorded["status"], recorded["content"]) == ("cancelled", stopped)
    assert shown(page) == kept(server, session_id)

    # Reload mid-reply: the page loads the history (the question and every earlier turn) and rejoins the reply
    # that runs on (on_disconnect: continue), to its end: the same message, the whole text, as history has it.
    send(page, WORDS)
    words_in(page, 5)
    running = last(page).get_attribute("data-id")
    page.reload()
    expect(page.locator("main")).to_have_attribute("data-chat-status", "streaming")  # rejoined, not 204
    settled(page, same_id=running)
    assert text(last(page)) == WORDS
    assert shown(page) == kept(server, session_id)
    assert [role for _, role, _ in shown(page)] == ["user", "assistant"] * 3

    # Stop after a reload: the rejoined reply's interaction id came with the history's metadata.
    send(page, WORDS)
    words_in(page, 5)
    page.reload()
    expect(page.locator("main")).to_have_attribute("data-chat-status", "streaming")
    words_in(page, 10)
    page.get_by_role("button", name="Stop").click()
    settled(page, status="cancelled", not_id=running)
    stopped = text(last(page))
    assert WORDS.startswith(stopped) and len(stopped.split()) >= 10 and stopped != WORDS
    assert history(server, session_id)[-1]["status"] == "cancelled"
    assert shown(page) == kept(server, session_id)
    running = last(page).get_attribute("data-id")

    # Regenerate the last reply (of a short question, to be quick): a new reply in its place, after the same
    # question, on the screen and in history.
    send(page, "Once more?")
    settled(page, not_id=running)
    answered = last(page).get_attribute("data-id")
    page.get_by_role("button", name="Regenerate").click()
    settled(page, not_id=answered)
    assert shown(page) == kept(server, session_id)
    assert [(role, words) for _, role, words in shown(page)[-2:]] == [
        ("user", "Once more?"),
        ("assistant", "Once more?"),
    ]
    assert len(shown(page)) == 10

    # Edit the second question: it and everything after it give way to the new text and its reply.
    regenerated = shown(page)[-1][0]
    page.locator('article[data-role="user"]').nth(1).get_by_role("button", name="Edit").click()
    page.get_by_label("Edited message").fill("an edited question")
    page.get_by_label("Edited message").press("Enter")
    settled(page, not_id=regenerated)
    assert [(role, words) for _, role, words in shown(page)] == [
        ("user", "Hello,  parley!"),
        ("assistant", "Hello,  parley!"),
        ("user", "an edited question"),
        ("assistant", "an edited question"),
    ]
    assert shown(page) == kept(server, session_id)

    # Reload: the same conversation, from history alone.
    before = shown(page)
    page.reload()
    settled(page)
    assert shown(page) == before == kept(server, session_id)


def test_a_reply_that_ends_between_the_history_and_the_rejoin_shows_its_end(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live(echo_delay=0.05, checkpoint_seconds=0.1)
    page = open_app(server, "")
    session_id = session_of(page)
    send(page, WORDS)
    words_in(page, 5)
    running = last(page).get_attribute("data-id")

    # The reload reads the history while the reply runs; its rejoin reaches parley only once the reply ended.
    loaded: list[str] = []

    def read_history(route: Route) -> None:
        response = route.fetch()
        loaded.append(response.json()["messages"][-1]["metadata"]["status"])
        route.fulfill(response=response)

    def rejoin_late(route: Route) -> None:
        deadline = time.monotonic() + WAIT / 1000
        while history(server, session_id)[-1]["status"] == "streaming":
            assert time.monotonic() < deadline, "the reply did not end"
            time.sleep(0.02)
        route.continue_()

    page.route(f"{server.url}/api/v1/sessions/{session_id}/messages", read_history)
    page.route(f"{server.url}/api/v1/chat/{session_id}/stream", rejoin_late)
    page.reload()
    # 204: nothing to rejoin, and the half reply marked streaming; the README's recipe loads the history again.
    settled(page, same_id=running)
    assert loaded == ["streaming", "complete"]
    assert text(last(page)) == WORDS
    assert shown(page) == kept(server, session_id)


def test_an_error_shows_parleys_sentence(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live()
    page = open_app(server, "")
    session_id = session_of(page)
    expect(page.locator("main")).to_have_attribute("data-chat-status", "ready")
    assert httpx.delete(f"{server.url}/api/v1/sessions/{session_id}", timeout=10).status_code == 200
    send(page, "anyone there?")
    # The README's line turns the error's message (parley's JSON body) into its sentence.
    expect(page.get_by_role("alert")).to_have_text(f"Session not found: {session_id}")
    expect(page.locator("main")).to_have_attribute("data-chat-status", "error")


def test_stop_before_a_regenerated_reply_starts_stops_that_reply(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live(echo_delay=0.05)
    page = open_app(server, "")
    session_id = session_of(page)
    question = " ".join(WORDS.split()[:40])
    send(page, question)
    settled(page)
    # After a reload the question comes from history, with the metadata of the turn that answered it.
    page.reload()
    settled(page)
    answered = last(page).get_attribute("data-id")
    held = hold_chats(page, server)
    page.get_by_role("button", name="Regenerate").click()
    request = wait_held(page, held)
    page.get_by_role("button", name="Stop").click()  # nothing of the new reply has come: no interaction id yet
    request.continue_()
    settled(page, status="cancelled", not_id=answered)
    stopped = text(last(page))
    assert question.startswith(stopped) and stopped != question
    assert history(server, session_id)[-1]["status"] == "cancelled"
    assert shown(page) == kept(server, session_id)


def test_stop_before_the_reply_starts_never_stops_another_reply(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live(echo_delay=0.05)
    page = open_app(server, "")
    session_id = session_of(page)
    expect(page.locator("main")).to_have_attribute("data-chat-status", "ready")
    stop_before_the_start_while_another_reply_runs(
        page, server, session_id, send, "already has an interaction in progress"
    )
    # Nor is the next reply: the stop went with the message it was for.
    send(page, "and now")
    settled(page)
    assert text(last(page)) == "and now"


def test_files_sent_with_a_message_reach_the_agent_and_a_reload_shows_them(
    live: Callable[..., LiveServer], open_app: Callable[[LiveServer, str], Page]
) -> None:
    server = live()
    page = open_app(server, "")
    session_id = session_of(page)
    notes = b"# notes\nsome words\n"
    page.get_by_label("Attach").set_input_files(
        [
            {"name": "notes.md", "mimeType": "text/markdown", "buffer": notes},
            {"name": "data.bin", "mimeType": "application/octet-stream", "buffer": bytes(range(256))},
        ]
    )
    send(page, "look at these")
    settled(page)
    # sendMessage({text, files}) with the input's FileList: the echo names each file it was given.
    assert text(last(page)) == f"look at these\n[file: notes.md, {len(notes)} bytes]\n[file: data.bin, 256 bytes]"
    user = page.locator('article[data-role="user"]')
    expect(user.locator("[data-file]")).to_have_text(["notes.md", "data.bin"])
    assert shown(page) == kept(server, session_id)

    # A reload: the message's files come from history, each a link to its bytes in parley.
    page.reload()
    settled(page)
    expect(user.locator("[data-file]")).to_have_text(["notes.md", "data.bin"])
    links = [link.get_attribute("href") or "" for link in user.locator("[data-file]").all()]
    assert all(link.startswith(f"/api/v1/files/{session_id}/") for link in links), links
    assert [httpx.get(f"{server.url}{link}", timeout=10).content for link in links] == [notes, bytes(range(256))]
    assert shown(page) == kept(server, session_id)
