"""The chat page of `rxt serve`, driven in headless Chromium by Playwright (skipped without /usr/bin/chromium).

Chromium is the system one (`executable_path`), never a downloaded browser. The server runs in a thread of the
test process; its memory updates are slowed down a little so the page's "memory updating" state is visible.

`RXT_SERVE_TEST_MODEL=<trained model folder>` enables the recall check (the second answer uses the first
message's fact); `RXT_SERVE_TEST_FACT`, `RXT_SERVE_TEST_QUESTION` and `RXT_SERVE_TEST_EXPECT` (a substring of
the expected answer, case-insensitive) override the default fact / question pair.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MEMORY_UPDATE_DELAY_S = 0.6

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


def slow_memory_updates(model, monkeypatch) -> None:
    original = model.update_memory

    def update_memory(*args, **kwargs):
        time.sleep(MEMORY_UPDATE_DELAY_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "update_memory", update_memory)


def chat(url: str, messages: list[str]) -> dict:
    """Send `messages` through the page (each while the previous message's memory update still runs: the
    server makes it wait) and return what the page showed."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            sync_api.expect.set_options(timeout=30_000)
            page.goto(url)
            states = []
            for count, text in enumerate(messages, start=1):
                page.fill("#input", text)
                page.press("#input", "Enter")
                # the indicator while this message's memory update runs (after count - 1 finished updates) ...
                page.wait_for_selector(f"#memory-status[data-state=updating][data-updates='{count - 1}']")
                # ... by which time its answer is complete
                states.append(page.eval_on_selector_all(".message.assistant", "nodes => nodes.map(n => n.dataset.state)"))
            page.wait_for_selector(f"#memory-status[data-state=updated][data-updates='{len(messages)}']")
            bubbles = page.query_selector_all(".message.assistant")
            return {
                "states": states,
                "answers": [bubble.evaluate("node => node.firstChild.textContent") for bubble in bubbles],
                "tokens": [int(bubble.get_attribute("data-tokens") or 0) for bubble in bubbles],
                "notes": [bubble.evaluate("node => node.querySelector('.note').textContent") for bubble in bubbles],
                "memory_log": page.evaluate("window.rxtMemoryLog"),
                "status": page.inner_text("#memory-status"),
                "conversation": page.inner_text("#conversation").removeprefix("conversation "),
            }
        finally:
            browser.close()


def test_chat_page_streams_both_answers_and_shows_memory_updates(tiny_tokenizer, monkeypatch):
    from modeling_rxt import RxTConfig, RxTForCausalLM
    from serving.server import BackgroundServer, ServeConfig, create_app

    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tiny_tokenizer))).eval()
    messages = ["Ann has a red kite.", "What colour is the kite of Ann?"]
    # the answers the page must show: the conversation replayed alone, in process
    expected, stm = [], model.init_memory(1)
    for text in messages:
        events = list(model.interact(text, stm_state=stm, tokenizer=tiny_tokenizer, max_new_tokens=8, do_sample=False))
        expected.append(events[-3].text[0])
        stm = events[-1].stm_state

    slow_memory_updates(model, monkeypatch)
    app = create_app(ServeConfig(max_new_tokens=8, log_level="warning"), model, tiny_tokenizer)
    with BackgroundServer(app) as running:
        shown = chat(running.url, messages)
        stored = app.state.rxt.store.get(shown["conversation"])

    assert shown["answers"] == expected
    assert all(count >= 1 for count in shown["tokens"]), "answers must arrive as streamed token events"
    assert shown["states"] == [["done"], ["done", "done"]]  # each answer was complete before its memory update
    assert shown["memory_log"] == ["memory_update_started", "memory_updated"] * 2
    assert shown["notes"] == ["memory updated", "memory updated"]
    assert shown["status"] == "memory: updated (turn 2)"
    assert stored.metadata["turns"] == "2"
    torch.testing.assert_close(stored.stm_state, stm, atol=1e-5, rtol=1e-4)


def test_chat_page_second_answer_uses_the_first_fact(monkeypatch):
    folder = os.environ.get("RXT_SERVE_TEST_MODEL")
    if not folder:
        pytest.skip(
            "RXT_SERVE_TEST_MODEL is not set: recalling a fact needs a trained model folder (random weights remember "
            "nothing). Set it, and optionally RXT_SERVE_TEST_FACT / _QUESTION / _EXPECT."
        )
    from serving.server import BackgroundServer, ServeConfig, create_app, load_model

    fact = os.environ.get("RXT_SERVE_TEST_FACT", "I put the red lantern in the old mill.")
    question = os.environ.get("RXT_SERVE_TEST_QUESTION", "Where did I put the lantern?")
    expect = os.environ.get("RXT_SERVE_TEST_EXPECT", "old mill")
    model, tokenizer = load_model(folder)
    slow_memory_updates(model, monkeypatch)
    app = create_app(ServeConfig(model=folder, max_new_tokens=48, log_level="warning"), model, tokenizer)
    with BackgroundServer(app) as running:
        shown = chat(running.url, [fact, question])
    assert expect.lower() in shown["answers"][1].lower(), shown["answers"]
