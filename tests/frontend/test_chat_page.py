"""The chat page at `/`, in a real headless Chromium against the real stack: it lists the model,
streams an answer, and the stop button ends a long one. The page never gets at the API without the
key; --disable-ui removes it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from e2e_stack import Stack, paused
from frontend_helpers import wait_until

from pagedserve.serve import free_port

KEY = "page-key"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def keyed(backend: Stack, tmp_path_factory: pytest.TempPathFactory):
    backend.check_running()
    stack = backend.sharing(tmp_path_factory.mktemp("page-logs"), api_key=KEY)
    proc = stack.start_frontend("fe-page")
    wait_until(f"{stack.base}/health", proc, timeout=120)
    yield stack
    stack.close()


def test_the_page_and_its_files_are_served_with_a_strict_policy(keyed: Stack):
    page = httpx.get(keyed.base + "/", timeout=10)  # no key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"] and "<title>pagedserve chat" in page.text
    js = httpx.get(keyed.base + "/ui/chat.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for missing in ("/ui/nope.js", "/ui/..%2Fapp.py", "/ui/ui_routes.py"):
        answer = httpx.get(keyed.base + missing, timeout=10)
        assert answer.status_code == 404 and "error" in answer.json(), missing
    assert httpx.get(keyed.base + "/v1/models", timeout=10).status_code == 401  # the API still wants the key
    assert "/" not in httpx.get(keyed.base + "/openapi.json", timeout=10).json()["paths"]


def test_disable_ui_removes_the_page(keyed: Stack):
    port = free_port()
    proc = keyed.start_frontend("fe-noui", "--disable-ui", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{port}/ui/chat.js", timeout=10).status_code == 404


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_a_browser_chats_streams_and_stops(keyed: Stack, backend: Stack, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    artifacts = Path(os.environ.get("PAGEDSERVE_TEST_ARTIFACTS", tmp_path))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(keyed.base + "/")
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        page.wait_for_selector("#model option", state="attached", timeout=30_000)
        assert page.input_value("#model") == str(keyed.model)

        page.fill("#max_tokens", "12")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        expect(page.locator("#speed")).to_contain_text("tokens in", timeout=60_000)
        answer = page.text_content(".msg.assistant")
        # the page appends "Error: ..." on a line of its own; the random model may say "Error" itself
        assert answer and not re.search(r"(^|\n)Error: ", answer), answer
        speed = page.text_content("#speed")
        assert 1 <= int(speed.split(" tokens in ")[0]) <= 12 and speed.endswith("tokens/s"), speed
        page.screenshot(path=str(artifacts / "chat_page.png"))

        # a long answer (EOS ignored, so it runs on) stopped mid-stream by the button
        def long_answer(route):
            body = json.loads(route.request.post_data) | {"ignore_eos": True, "max_tokens": 900}
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", long_answer)
        page.fill("#input", "Tell me a long story")
        page.press("#input", "Enter")
        last = page.locator(".msg.assistant").nth(1)
        # streaming: checked every 10 ms, then the worker is stopped while the button is clicked,
        # so a fast machine cannot finish the 900 tokens first (expect's polls are up to 1 s apart)
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant')[1]?.textContent.length >= 20",
                               polling=10, timeout=60_000)
        with paused(backend.procs[0]):  # the worker
            page.click("#stop")
            expect(page.locator("#stop")).to_be_disabled(timeout=10_000)
        stopped = last.text_content()
        page.wait_for_timeout(1500)
        assert last.text_content() == stopped  # nothing arrives after the stop
        assert "(stopped)" in page.text_content("#speed") and not page.is_disabled("#send")
        browser.close()
    keyed.wait_engine_idle(30)  # the stop reached the engine: the request was aborted, not left running
