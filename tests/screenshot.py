"""``make screenshot``: docs/page.png, the chat page in Chromium against a real parley (echo agent), with a
finished reply (and a file) and a cancelled one. Usage: ``python -m tests.screenshot docs/page.png``."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import expect, sync_playwright

from parley.app import create_app
from parley.settings import Settings
from tests.conftest import free_port
from tests.test_page import CHROMIUM, WAIT, reply, send, wait_for_words

FIRST = "Hello! Which agent am I talking to?"
SECOND = (
    "The echo agent repeats each message word by word, slowly enough to watch the reply stream in and to "
    "press Stop halfway: the reply keeps the words that came, and history records it as cancelled."
)


def main(output: Path) -> None:
    with tempfile.TemporaryDirectory() as data:
        app = create_app(Settings(data_dir=data, echo_delay=0.08))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise SystemExit("uvicorn did not start")
            time.sleep(0.01)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1200, "height": 720}, device_scale_factor=1)
                page.set_default_timeout(WAIT)
                page.goto(f"http://127.0.0.1:{port}/")
                send(page, "An earlier conversation")
                expect(reply(page)).to_have_attribute("data-status", "complete")
                page.get_by_role("button", name="New session").click()
                page.get_by_label("Attach").set_input_files(
                    [{"name": "notes.md", "mimeType": "text/markdown", "buffer": b"# Notes\n\nthe chat page\n"}]
                )
                send(page, FIRST)
                expect(reply(page)).to_have_attribute("data-status", "complete")
                send(page, SECOND)
                wait_for_words(reply(page), 18)
                page.get_by_role("button", name="Stop").click()
                expect(reply(page)).to_have_attribute("data-status", "cancelled")
                output.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(output))
                browser.close()
        finally:
            server.should_exit = True
            thread.join(10)
    print(f"wrote {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/page.png"))
