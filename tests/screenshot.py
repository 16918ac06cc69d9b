"""``make screenshot``: docs/page.png, the chat page in Chromium against a real parley wired as ``make demo`` wires it
(the ``openai`` agent at the scripted model server, the example MCP server's tools), showing a reply that reasoned
and called a tool. Usage: ``python -m tests.screenshot docs/page.png``."""

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
from tests.conftest import CHROMIUM, free_port
from tests.demo import environment, model, serve_in_thread
from tests.test_page import WAIT, reply, send

QUESTION = "What is 2 + 3? Use a tool, please."


def main(output: Path) -> None:
    model_port = free_port()
    stub = serve_in_thread(model(), model_port)
    with tempfile.TemporaryDirectory() as data:
        app = create_app(Settings.from_env(environment(model_port, Path(data))))
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
                send(page, QUESTION)
                expect(reply(page)).to_have_attribute("data-status", "complete")
                # The first reasoning opened, as a reader would to see why the tool was called.
                reply(page).locator('[data-part="reasoning"]').first.locator("summary").click()
                output.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(output))
                browser.close()
        finally:
            server.should_exit = True
            thread.join(10)
            stub.should_exit = True
    print(f"wrote {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/page.png"))
