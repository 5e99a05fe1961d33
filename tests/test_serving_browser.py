"""The chat page of `rxt serve`, driven in headless Chromium by Playwright (skipped without /usr/bin/chromium).

Chromium is the system one (`executable_path`), never a downloaded browser. The server runs in a thread of the
test process; its memory updates are slowed down a little so the page's "memory updating" state is visible.

The recall check (the second answer uses the first message's fact) trains a small model for about a CPU minute,
or uses the folder in `RXT_SERVE_TEST_MODEL`; it sends a held-out fact and question that the model answers right
with memory and wrong without, and expects the page to show exactly the in-process answers.
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
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    from rxt_hf.serving.server import BackgroundServer, ServeConfig, create_app

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


def two_turn_conversations():
    """The embedded plant-then-ask conversations the small model trains on (train) and is checked on (test)."""
    from rxt_hf.trainers.synthetic_data import build_synthetic_dataset

    return build_synthetic_dataset("multi-turn", num_conversations=2000, num_turns=2, max_recall_distance=1, seed=0)


def train_remembering_model(folder: Path) -> None:
    """A small RxT (410k parameters) trained for about a CPU minute on 2-turn embedded conversations (stage 4
    only) into `folder`. Measured: 92% recall one turn back on held-out conversations, 0% with a fresh memory."""
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, build_tokenizer, special_token_ids
    from rxt_hf.trainers.data import ConversationCollator
    from rxt_hf.trainers.smat_trainer import SMATConfig, SMATTrainer

    torch.manual_seed(0)
    data = two_turn_conversations()
    turns = [t for row in data["train"] for t in [row, *row["interactions"]]]
    tokenizer = build_tokenizer([t["query"] + " " + t["answer"] for t in turns], vocab_size=1000, model_max_length=64)
    config = RxTConfig.from_preset(
        "rxt-tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_query_heads=4,
        num_key_value_heads=4, decoder_feed_forward="dense", decoder_intermediate_size=192,
        encoder_intermediate_size=192, stm_size=16, max_position_embeddings=64, memory_attention_variant="simple",
        vocab_size=len(tokenizer), **special_token_ids(tokenizer),
    )
    args = SMATConfig(output_dir=str(folder), max_steps=450, per_device_train_batch_size=32, learning_rate=3e-3,
                      warmup_steps=20, max_length=64, report_to="none", disable_tqdm=True)
    collator = ConversationCollator(tokenizer, max_length=64, recall_weight=3.0)
    trainer = SMATTrainer(RxTForCausalLM(config), args, train_dataset=data["train"], processing_class=tokenizer,
                          data_collator=collator)
    trainer.train()
    trainer.save_rxt_model(str(folder))


@pytest.fixture(scope="module")
def remembering_model(tmp_path_factory) -> str:
    """A trained model folder: `RXT_SERVE_TEST_MODEL`, or one trained here (about a minute)."""
    folder = os.environ.get("RXT_SERVE_TEST_MODEL")
    if folder:
        return folder
    folder = tmp_path_factory.mktemp("remembering-model")
    train_remembering_model(folder)
    return str(folder)


def recalled_fact(model, tokenizer, max_new_tokens: int) -> tuple[list[str], list[str], list[str]]:
    """A held-out (fact, question) pair that the model answers right with memory and wrong with a fresh one:
    the messages, the in-process answers and the answer's key words."""
    from rxt_hf.trainers.evaluation import keywords_match

    for row in two_turn_conversations()["test"]:
        messages = [row["query"], row["interactions"][0]["query"]]
        keywords = row["answer_keywords"][0]
        answers, stm = [], model.init_memory(1)
        for text in messages:
            events = list(model.interact(text, stm_state=stm, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                         do_sample=False))
            answers.append(events[-3].text[0])
            stm = events[-1].stm_state
        alone = list(model.interact(messages[1], tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False))
        if keywords_match(answers[1], keywords) and not keywords_match(alone[-3].text[0], keywords):
            return messages, answers, keywords
    pytest.fail("the trained model recalls none of the held-out facts")


def test_chat_page_second_answer_uses_the_first_fact(remembering_model, monkeypatch):
    from rxt_hf.serving.server import BackgroundServer, ServeConfig, create_app, load_model
    from rxt_hf.trainers.evaluation import keywords_match

    model, tokenizer = load_model(remembering_model)
    messages, expected, keywords = recalled_fact(model, tokenizer, max_new_tokens=24)
    slow_memory_updates(model, monkeypatch)
    app = create_app(ServeConfig(model=remembering_model, max_new_tokens=24, log_level="warning"), model, tokenizer)
    with BackgroundServer(app) as running:
        shown = chat(running.url, messages)
    assert shown["answers"] == expected, (messages, shown["answers"])
    assert keywords_match(shown["answers"][1], keywords), (messages, shown["answers"], keywords)
