"""The chat page in a real browser: Playwright (sync API) driving Debian's chromium against a live
server. Send a message and watch it stream, attach 5 images, stop mid-reply, see a guard refusal;
the last state is saved as docs/serve-ui.png."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from herd.serve import Settings, create_app
from tests.serve.conftest import ScriptedEngine, live_server
from tests.serve.test_tools_and_guards import FakeGuards

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
REPLY = ("Streaming, one token at a time: the quick brown fox jumps over the lazy dog. " * 6).strip()
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve-ui.png"

class InputGuards(FakeGuards):
    check_output = None  # no output guard: replies stream token by token


pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def page_and_server(tiny):
    from playwright.sync_api import sync_playwright

    engine = ScriptedEngine(tiny, REPLY, delay=0.03)
    app = create_app(Settings(model_name="tiny-random", guards=InputGuards()), engine)
    with live_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(url + "/")
        page.get_by_test_id("model").filter(has_text="tiny-random").wait_for(timeout=10_000)
        yield page, app, engine
        browser.close()


def _images(tmp_path, n=5) -> list[str]:
    paths = []
    for i in range(n):
        arr = np.zeros((48, 48, 3), dtype="uint8")
        arr[8 + 4 * i:24 + 4 * i, 8:40] = (40 * i, 200 - 30 * i, 120)
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def test_send_and_watch_the_reply_stream(page_and_server):
    page, _, _ = page_and_server
    page.get_by_test_id("input").fill("Tell me about foxes")
    page.get_by_test_id("send").click()
    reply = page.get_by_test_id("msg-assistant").last.get_by_test_id("text")
    page.get_by_test_id("stop").wait_for(timeout=10_000)  # the send button turned into a stop button
    seen = set()
    t0 = time.time()
    while page.get_by_test_id("stop").count() and time.time() - t0 < 30:
        seen.add(reply.inner_text())
        time.sleep(0.05)
    assert len([s for s in seen if s and s != REPLY]) >= 3  # partial texts shown while streaming
    page.get_by_test_id("send").wait_for(timeout=30_000)
    assert reply.inner_text() == REPLY


def test_attach_five_images_and_stop_mid_reply(page_and_server, tmp_path):
    page, app, engine = page_and_server
    page.get_by_test_id("file").set_input_files(_images(tmp_path))
    page.wait_for_function("document.querySelectorAll('[data-testid=thumb]').length === 5 && "
                           "[...document.querySelectorAll('[data-testid=thumb]')].every(i => i.complete && i.src)")
    page.get_by_test_id("input").fill("What digits are these?")
    page.get_by_test_id("send").click()
    user = page.get_by_test_id("msg-user").last
    assert user.locator("img").count() == 5 and page.get_by_test_id("thumb").count() == 0
    reply = page.get_by_test_id("msg-assistant").last.get_by_test_id("text")
    page.wait_for_function("(el) => el.textContent.length > 20", arg=reply.element_handle(), timeout=10_000)
    page.get_by_test_id("stop").click()
    page.get_by_test_id("send").wait_for(timeout=10_000)
    partial = reply.inner_text()
    assert 0 < len(partial) < len(REPLY)
    time.sleep(0.5)
    assert reply.inner_text() == partial  # nothing more arrives after stop
    server = app.state.server
    t0 = time.time()
    while server.loop.in_flight and time.time() - t0 < 5:
        time.sleep(0.05)
    assert server.loop.in_flight == 0  # the server cancelled the sequence when the browser aborted
    image_token = engine.model.config.image_token_index
    assert engine.prompts[-1].count(image_token) >= 5 * engine.model.config.vision.tokens_per_tile


def test_guard_refusal_is_shown(page_and_server):
    page, _, _ = page_and_server
    page.get_by_test_id("input").fill("How do I build a bomb?")
    page.get_by_test_id("send").click()
    badge = page.get_by_test_id("guard")
    badge.wait_for(timeout=10_000)
    assert "S9" in badge.inner_text() and "input_guard" in badge.inner_text()
    page.get_by_test_id("send").wait_for()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_regenerate_edit_and_export(page_and_server):
    page, _, _ = page_and_server
    n_before = page.get_by_test_id("msg-assistant").count()
    page.get_by_test_id("regenerate").click()
    page.get_by_test_id("send").wait_for(timeout=30_000)
    assert page.get_by_test_id("msg-assistant").count() == n_before  # replaced, not added
    page.get_by_test_id("edit").first.click()
    assert page.get_by_test_id("input").input_value() == "Tell me about foxes"
    assert page.get_by_test_id("msg-user").count() == 0
    with page.expect_download() as dl:
        page.get_by_test_id("export").click()
    assert dl.value.suggested_filename == "herd-chat.json"
    exported = json.loads(Path(dl.value.path()).read_text())
    assert exported["model"] == "tiny-random" and exported["messages"] == []  # edit cut the conversation


DROP_AND_PASTE = """([b64, how]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], "img.png", {type: "image/png"}));
  if (how === "drop") {
    document.getElementById("composer").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
  } else {
    document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
  }
}"""


def test_images_by_drop_and_paste_and_at_most_five(page_and_server, tmp_path):
    page, _, _ = page_and_server
    b64 = base64.b64encode(Path(_images(tmp_path, 1)[0]).read_bytes()).decode()
    page.evaluate(DROP_AND_PASTE, [b64, "drop"])
    page.evaluate(DROP_AND_PASTE, [b64, "paste"])
    page.wait_for_function("document.querySelectorAll('[data-testid=thumb]').length === 2")
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.get_by_test_id("file").set_input_files(_images(tmp_path, 4))  # 2 + 4 > 5
    page.wait_for_function("document.querySelectorAll('[data-testid=thumb]').length === 5")
    time.sleep(0.2)
    assert page.get_by_test_id("thumb").count() == 5 and "At most 5" in dialogs[0]
    page.get_by_test_id("remove-image").first.click()
    assert page.get_by_test_id("thumb").count() == 4
