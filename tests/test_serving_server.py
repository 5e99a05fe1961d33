"""`rxt serve`: the batching engine, the HTTP API, isolation under load, crash safety, bad input, the benchmark.

Every server here is real: uvicorn on a free loopback port (in a thread of the test process, or a subprocess
for the crash test), with real SQLite files and a real `redis-server` started by the test (skipped if
`redis-server` is not installed). The model is a tiny random-weight RxT with greedy decoding; every answer
and memory state the server produces is compared with a sequential in-process replay of that conversation
alone (`model.interact`, batch 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.serving.engine import BatchingEngine, BatchStreamer, BlockingEvents, EngineConfig, Turn
from rxt_hf.serving.security import hash_api_key, read_api_keys
from rxt_hf.serving.server import BackgroundServer, ServeConfig, aiter_sse, create_app, parse_config
from rxt_hf.serving.store import model_fingerprint, open_store

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 8
STM_ATOL = 1e-5  # batched vs one-at-a-time float math (measured differences are ~1e-9)

_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
_THINGS = ["apple", "book", "cat", "dog", "kite", "lamp", "pen", "ship"]
_PLACES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def message(conversation: int, turn: int) -> str:
    """A distinct, short message per conversation and turn (lengths vary, so batches are padded)."""
    name, thing, place = _NAMES[conversation % 8], _THINGS[(conversation + 3 * turn) % 8], _PLACES[(turn + conversation // 8) % 6]
    variants = [
        f"{name} has a {thing}.",
        f"Where does {name} live? {name} lives in {place}.",
        f"What colour is the {thing} of {name}?",
        f"{name} lives in {place} and likes the number {(conversation + turn) % 10}.",
    ]
    return variants[(conversation + turn) % 4]


def system_prompt(conversation: int) -> str | None:
    return f"{_NAMES[conversation % 8]} lives in {_PLACES[conversation % 6]}." if conversation % 4 == 0 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tiny_tokenizer))).eval()


@pytest.fixture(scope="module")
def model_dir(model, tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-model")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


class Replay:
    """Each conversation alone, in process, batch 1: answers and every memory state, computed on demand."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.answers: dict[int, list[list[int]]] = {}
        self.states: dict[int, list[torch.Tensor]] = {}

    def run(self, conversation: int, turns: int) -> None:
        answers, states = self.answers.setdefault(conversation, []), self.states.setdefault(conversation, [])
        with torch.no_grad():
            if not states:
                prompt = system_prompt(conversation)
                states.append(
                    self.model.memory_from_prompt(prompt, tokenizer=self.tokenizer) if prompt else self.model.init_memory(1)
                )
            while len(answers) < turns:
                events = list(
                    self.model.interact(
                        message(conversation, len(answers)), stm_state=states[-1], tokenizer=self.tokenizer,
                        max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                    )
                )
                answers.append(events[-3].answer_ids[0])
                states.append(events[-1].stm_state)

    def answer(self, conversation: int, turn: int) -> list[int]:
        self.run(conversation, turn + 1)
        return self.answers[conversation][turn]

    def state(self, conversation: int, turns: int) -> torch.Tensor:
        self.run(conversation, turns)
        return self.states[conversation][turns]

    def text(self, conversation: int, turn: int) -> str:
        return self.tokenizer.decode(self.answer(conversation, turn), skip_special_tokens=True)


@pytest.fixture(scope="module")
def replay(model, tiny_tokenizer):
    return Replay(model, tiny_tokenizer)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("redis-server did not start")
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


def serve_config(**overrides) -> ServeConfig:
    return ServeConfig(**{"max_new_tokens": MAX_NEW_TOKENS, "max_batch_size": 16, "log_level": "warning", **overrides})


async def send(client: httpx.AsyncClient, conversation_id: str, text: str, headers=None, until: str = "memory_updated"):
    """POST a message and read its server-sent events up to `until` (or an error); returns {event: data}."""
    seen: dict = {"tokens": []}
    async with client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": text}, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for event, data in aiter_sse(response.aiter_lines()):
            if event == "token":
                seen["tokens"].append(data["token_id"])
            seen[event] = data
            if event in (until, "error"):
                break
    assert "error" not in seen, seen["error"]
    return seen


# ------------------------------------------------------------------------------------------------------
# the engine on its own


def gated(model, monkeypatch) -> threading.Event:
    """Make every memory update of `model` wait until the returned event is set."""
    gate = threading.Event()
    original = model.update_memory

    def update_memory(*args, **kwargs):
        assert gate.wait(30), "the test never opened the memory-update gate"
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "update_memory", update_memory)
    return gate


def test_engine_orders_turns_of_a_conversation_and_skips_cancelled_ones(model, tiny_tokenizer, monkeypatch):
    store = open_store("memory://", model_fingerprint(model), model.config.stm_shape, torch.float32)
    store.create("a", model.init_memory(1))
    store.create("b", model.init_memory(1))
    engine = BatchingEngine(model, tiny_tokenizer, store, EngineConfig(max_new_tokens=4, max_wait_ms=20)).start()
    gate = gated(model, monkeypatch)
    try:
        def submit(conversation):
            turn = Turn(conversation, engine.render_query("Where does Ann live?"), BlockingEvents(), max_new_tokens=4)
            engine.submit(turn)
            return turn

        first, second_b = submit("a"), submit("b")
        assert first.sink.get(10).kind == "queued"
        kinds = []
        while "answer" not in kinds:
            kinds.append(first.sink.get(10).kind)
        assert kinds[0] == "start" and kinds[-1] == "answer"
        cancelled, third = submit("a"), submit("a")  # queued behind the first turn's memory update
        cancelled.cancel()
        time.sleep(0.1)
        assert not third.started and engine.busy("a")  # the update is gated: the conversation waits
        gate.set()
        events = [event.kind for event in third.sink]
        assert events[:2] == ["queued", "start"] and events[-1] == "memory_updated"
        assert not cancelled.started and cancelled.sink.get(1).kind == "queued"
        with pytest.raises(Exception):
            cancelled.sink.get(0.2)  # nothing after "queued": it never ran
        assert [event.kind for event in second_b.sink][-1] == "memory_updated"
        assert store.get("a").version == 3 and store.get("a").metadata["turns"] == "2"
        assert engine.stats.max_batch_size_seen == 2  # conversations a and b shared the first generate()
    finally:
        gate.set()
        engine.stop()


def test_engine_streams_non_ascii_text_as_whole_characters(tiny_tokenizer):
    """Each row of a batch streams the text its tokens complete: "é", "日", "本" span several byte-level tokens."""
    texts = ["café 日本 ok", "Ann lives in Oslo."]
    ids = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    budgets = [len(row) + 1 for row in ids]
    turns = [Turn(f"c{i}", [0, 5, 6], BlockingEvents(), max_new_tokens=budget) for i, budget in enumerate(budgets)]
    streamer = BatchStreamer(turns, budgets, tiny_tokenizer, eos_token_id=1)
    streamer.put(torch.zeros(2, 3, dtype=torch.long))  # generate() sends the prompt first
    for step in range(max(budgets)):
        streamer.put(torch.tensor([(row + [1] * max(budgets))[step] for row in ids]))  # the answer, then [EOS]
    streamer.end()
    pieces = []
    for turn, text in zip(turns, texts):
        events = [turn.sink.get(1)]
        while events[-1].kind != "answer":
            events.append(turn.sink.get(1))
        pieces.append([event.data["text"] for event in events if event.kind == "token"])
        assert "".join(pieces[-1]) == text == events[-1].data["text"]
        assert not any("\ufffd" in piece for piece in pieces[-1])
    assert {"é", "日", "本"} <= set(pieces[0])  # each character as soon as its last byte is generated


# ------------------------------------------------------------------------------------------------------
# isolation under load


NUM_CONVERSATIONS, NUM_TURNS, NUM_KEYS = 50, 10, 5
KEYS = [f"load-key-{k}-secret" for k in range(NUM_KEYS)]


async def run_client(client: httpx.AsyncClient, conversation: int) -> dict:
    """One user: create the conversation, then NUM_TURNS messages, each sent as soon as the previous answer is
    complete. Three client styles: SSE read to the end, SSE dropped after the answer, OpenAI non-streaming."""
    headers = {"Authorization": f"Bearer {KEYS[conversation % NUM_KEYS]}"}
    prompt = system_prompt(conversation)
    response = await client.post("/v1/conversations", json={"system_prompt": prompt} if prompt else {}, headers=headers)
    assert response.status_code == 201, response.text
    conversation_id = response.json()["id"]
    style = conversation % 3
    answers = []
    for turn in range(NUM_TURNS):
        text = message(conversation, turn)
        if style == 2:
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "rxt", "conversation_id": conversation_id,
                      "messages": [{"role": "user", "content": "earlier turns are ignored"}, {"role": "user", "content": text}]},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
        else:
            seen = await send(client, conversation_id, text, headers, until="memory_updated" if style == 0 else "answer")
            assert seen["tokens"] == seen["answer"]["token_ids"][:-1]  # streamed = the answer before its [EOS]
            answers.append(seen["answer"]["token_ids"])
    return {"id": conversation_id, "answers": answers, "style": style}


async def run_load(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=NUM_CONVERSATIONS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(run_client(client, c) for c in range(NUM_CONVERSATIONS)))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_isolation_under_load_equals_sequential_replay(backend, model, tiny_tokenizer, replay, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'stm.db'}" if backend == "sqlite" else request.getfixturevalue("redis_url")
    config = serve_config(store=url, api_key=KEYS, max_concurrent_requests=64)
    app = create_app(config, model, tiny_tokenizer)
    with BackgroundServer(app) as running:
        results = asyncio.run(run_load(running.url))
        engine = app.state.rxt.engine
        deadline = time.monotonic() + 60
        while engine.active_conversations() and time.monotonic() < deadline:  # dropped streams: updates still run
            time.sleep(0.05)
        metrics = httpx.get(running.url + "/metrics").text
    stats = engine.stats
    assert stats.messages_total == NUM_CONVERSATIONS * NUM_TURNS and stats.messages_failed == 0
    assert stats.max_batch_size_seen > 1, "messages of different conversations were never batched"
    assert f"rxt_messages_total {NUM_CONVERSATIONS * NUM_TURNS}" in metrics

    # what the server committed, read back through a fresh store (the server's is closed)
    store = open_store(url, model_fingerprint(model), model.config.stm_shape, torch.float32)
    try:
        for conversation, result in enumerate(results):
            for turn, answer in enumerate(result["answers"]):
                if result["style"] == 2:
                    assert answer == replay.text(conversation, turn), (conversation, turn)
                else:
                    assert answer == replay.answer(conversation, turn), (conversation, turn)
            stored = store.get(result["id"])
            assert stored.version == NUM_TURNS + 1 and stored.metadata["turns"] == str(NUM_TURNS)
            assert stored.owner == hash_api_key(KEYS[conversation % NUM_KEYS])
            torch.testing.assert_close(stored.stm_state, replay.state(conversation, NUM_TURNS), atol=STM_ATOL, rtol=1e-4)
    finally:
        if backend == "redis":
            for result in results:
                store.delete(result["id"])
        store.close()


# ------------------------------------------------------------------------------------------------------
# crash safety

# `rxt serve` (its real command line) with memory updates that sleep first, so SIGKILL lands while they run.
SLOW_SERVER = """
import sys, time
from rxt_hf.modeling_rxt import RxTForCausalLM
from rxt_hf.serving.server import main

delay = float(sys.argv.pop(1))
update_memory = RxTForCausalLM.update_memory

def slow_update_memory(self, *args, **kwargs):
    time.sleep(delay)
    return update_memory(self, *args, **kwargs)

RxTForCausalLM.update_memory = slow_update_memory
main(sys.argv[1:])
"""


def start_server_process(arguments: list[str], port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, *arguments], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("the server did not start within 120 s")


def stored_memory(url: str, conversation_id: str) -> tuple[dict, torch.Tensor]:
    from safetensors.torch import load

    described = httpx.get(f"{url}/v1/conversations/{conversation_id}").json()
    response = httpx.get(f"{url}/v1/conversations/{conversation_id}/memory")
    assert response.status_code == 200 and response.headers["x-rxt-version"] == str(described["version"])
    return described, load(response.content)["stm_state"]


def test_sigkill_during_memory_updates_keeps_the_last_committed_state(model_dir, replay, tmp_path):
    from rxt_hf.serving.server import load_model

    conversations, committed_turns = 6, 3
    store = f"sqlite:///{tmp_path / 'crash.db'}"
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    port = free_port()
    process, url = start_server_process(
        [str(script), "0.4", str(model_dir), "--store", store, "--port", str(port),
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1", "--log-level", "warning"],
        port,
    )
    observed = {}
    try:
        async def scenario() -> list[str]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                ids = []
                for c in range(conversations):
                    prompt = system_prompt(c)
                    response = await client.post("/v1/conversations", json={"system_prompt": prompt} if prompt else {})
                    ids.append(response.json()["id"])

                async def talk(c: int):
                    for turn in range(committed_turns):
                        observed[c] = (await send(client, ids[c], message(c, turn)))["memory_updated"]["version"]
                    await send(client, ids[c], message(c, committed_turns), until="memory_update_started")

                await asyncio.gather(*(talk(c) for c in range(conversations)))
                return ids

        ids = asyncio.run(scenario())
        process.send_signal(signal.SIGKILL)  # every conversation's next memory update is in progress
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()

    # restart: a new server (in this process) on the same database, the model loaded from its folder again
    restarted, tokenizer = load_model(str(model_dir))
    with BackgroundServer(create_app(serve_config(store=store), restarted, tokenizer)) as running:
        url = running.url
        for c, conversation_id in enumerate(ids):
            described, state = stored_memory(url, conversation_id)
            turns = described["turns"]
            assert described["version"] == turns + 1
            # every commit the client saw survived; the killed update is absent or whole, never torn
            assert observed[c] <= described["version"] <= observed[c] + 1
            torch.testing.assert_close(state, replay.state(c, turns), atol=STM_ATOL, rtol=1e-4)

            async def continue_conversation():
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    return await send(client, conversation_id, message(c, turns))

            seen = asyncio.run(continue_conversation())
            assert seen["answer"]["token_ids"] == replay.answer(c, turns)
            assert seen["memory_updated"]["version"] == described["version"] + 1
            _, state = stored_memory(url, conversation_id)
            torch.testing.assert_close(state, replay.state(c, turns + 1), atol=STM_ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# bad input, keys and limits

KEY_A, KEY_B = "alice-key-0001", "bob-key-00002"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def assert_error(response: httpx.Response, status: int, kind: str, words: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status and error["message"]
    assert words.lower() in error["message"].lower(), error["message"]


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(model, tiny_tokenizer, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'stm.db'}"
    config = serve_config(
        store=url, api_key=[KEY_A], api_keys_file=None, max_body_bytes=2048, max_query_tokens=24, max_concurrent_requests=2
    )
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# team B\n{KEY_B}\n\n")
    config.api_keys_file = str(keys_file)
    app = create_app(config, model, tiny_tokenizer)
    # a conversation written by another model (same geometry, other weights) in the same database
    torch.manual_seed(1)
    other = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tiny_tokenizer))).eval()
    with open_store(url, model_fingerprint(other), other.config.stm_shape, torch.float32) as other_store:
        other_store.create("from-another-model", other.init_memory(1), owner=hash_api_key(KEY_A))

    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        conversation_id = client.post("/v1/conversations", json={}, headers=A).json()["id"]
        messages = f"/v1/conversations/{conversation_id}/messages"

        assert_error(client.post(messages, content=b'{"content": "hi"', headers={**A, "Content-Type": "application/json"}),
                     400, "invalid_json", "not valid JSON")
        assert_error(client.post(messages, json={"text": "hi"}, headers=A), 422, "invalid_request", "content")
        assert_error(client.post(messages, json={"content": "   "}, headers=A), 422, "empty_message")
        assert_error(client.post(messages, json={"content": "Ann has a cat. " * 20}, headers=A), 422, "query_too_long",
                     "limit of 24")
        assert_error(client.post(messages, json={"content": "hi", "max_new_tokens": 999}, headers=A), 422,
                     "invalid_max_new_tokens")
        assert_error(client.post(messages, json={"content": "x" * 5000}, headers=A), 413, "body_too_large", "max_body_bytes")
        chunks = iter([b'{"content": "', b"x" * 3000, b'"}'])  # no Content-Length: counted while it streams in
        assert_error(client.post(messages, content=chunks, headers={**A, "Content-Type": "application/json"}),
                     413, "body_too_large")
        assert_error(client.get("/v1/conversations/conv-does-not-exist", headers=A), 404, "not_found")
        assert_error(client.post("/v1/conversations/conv-nope/messages", json={"content": "hi"}, headers=A), 404, "not_found")

        # keys: none, unknown, and another valid key (404 like an unknown id: ids do not leak)
        assert_error(client.get(f"/v1/conversations/{conversation_id}"), 401, "missing_api_key")
        assert_error(client.get(f"/v1/conversations/{conversation_id}", headers={"Authorization": "Bearer wrong-key-123"}),
                     401, "invalid_api_key")
        assert_error(client.get(f"/v1/conversations/{conversation_id}", headers={"Authorization": "Basic abc"}),
                     401, "invalid_authorization")
        assert_error(client.get(f"/v1/conversations/{conversation_id}", headers=B), 404, "not_found")
        assert_error(client.get(f"/v1/conversations/{conversation_id}/memory", headers=B), 404, "not_found")
        assert_error(client.post(messages, json={"content": "hi"}, headers=B), 404, "not_found")
        assert_error(client.post("/v1/chat/completions", headers=B, json={
            "conversation_id": conversation_id, "messages": [{"role": "user", "content": "hi"}]}), 404, "not_found")
        assert_error(client.delete(f"/v1/conversations/{conversation_id}", headers=B), 404, "not_found")
        assert client.get(f"/v1/conversations/{conversation_id}", headers=A).status_code == 200

        # a state saved by another model is never read
        assert_error(client.get("/v1/conversations/from-another-model", headers=A), 409, "incompatible_memory",
                     "different model")
        assert_error(client.post("/v1/conversations/from-another-model/messages", json={"content": "hi"}, headers=A),
                     409, "incompatible_memory")

        # OpenAI endpoint
        chat = "/v1/chat/completions"
        assert_error(client.post(chat, json={"messages": [{"role": "user", "content": "hi"}]}, headers=A), 400,
                     "missing_conversation", "conversation_id")
        assert_error(client.post(chat, json={"user": "u", "messages": [{"role": "system", "content": "x"}]}, headers=A),
                     400, "no_user_message")
        assert_error(client.post(chat, json={"user": "u", "n": 2, "messages": [{"role": "user", "content": "hi"}]},
                                 headers=A), 400, "unsupported_n")
        assert_error(client.post(chat, json={"user": "u", "messages": []}, headers=A), 422, "invalid_request")
        assert_error(client.post(chat, json={"user": "u", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, headers=A),
            400, "unsupported_content")
        assert_error(client.get("/v1/nothing-here", headers=A), 404, "not_found")

        # concurrent requests per key: two answered streams held open (their memory updates wait on a gate)
        gate = gated(model, monkeypatch)
        second = client.post("/v1/conversations", json={}, headers=A).json()["id"]
        streams = []
        try:
            for target in (conversation_id, second):
                request = client.build_request("POST", f"/v1/conversations/{target}/messages", json={"content": "hi"},
                                               headers=A)
                response = client.send(request, stream=True)
                lines = response.iter_lines()
                streams.append((response, lines))
                for line in lines:
                    if line == "event: answer":  # the stream stays open until its (gated) memory update
                        break
            refused = client.get(f"/v1/conversations/{conversation_id}", headers=A)
            assert_error(refused, 429, "too_many_requests", "max_concurrent_requests=2")
            assert refused.headers["retry-after"] == "1"
            assert client.post("/v1/conversations", json={}, headers=B).status_code == 201  # other keys are not limited
        finally:
            gate.set()
            for response, lines in streams:
                assert "event: memory_updated" in list(lines)
                response.close()

        # still serving
        reply = client.post(messages, json={"content": "Where does Ann live?", "stream": False, "wait_for_memory": True},
                            headers=A)
        assert reply.status_code == 200 and reply.json()["memory"] == "updated" and reply.json()["turns"] == 2
        assert client.get("/healthz").json()["status"] == "ok"


def test_api_surface_openai_memory_file_metrics_page(model, tiny_tokenizer, tmp_path):
    app = create_app(serve_config(store="memory://", model_name="rxt-test"), model, tiny_tokenizer)
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and "RxT chat" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "rxt-test"

        # OpenAI, non-streaming: `user` names a conversation (created on first use, system message -> memory)
        body = {"model": "rxt-test", "user": "carol", "max_tokens": 4,
                "messages": [{"role": "system", "content": "Ann lives in Oslo."}, {"role": "user", "content": "Hi"}]}
        first = client.post("/v1/chat/completions", json=body).json()
        assert first["object"] == "chat.completion" and first["model"] == "rxt-test"
        assert first["choices"][0]["message"]["role"] == "assistant"
        assert first["usage"]["completion_tokens"] <= 4
        conversation_id = first["conversation_id"]
        expected_prompt = model.memory_from_prompt("Ann lives in Oslo.", tokenizer=tiny_tokenizer)
        first_events = list(model.interact("Hi", stm_state=expected_prompt, tokenizer=tiny_tokenizer, max_new_tokens=4))
        assert first["choices"][0]["message"]["content"] == first_events[-3].text[0]

        # OpenAI, streaming: chunks, then [DONE]; same conversation (after the first memory update)
        for _ in range(100):
            if not client.get(f"/v1/conversations/{conversation_id}").json()["busy"]:
                break
            time.sleep(0.02)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["conversation_id"] == conversation_id for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        second_events = list(model.interact("Hi", stm_state=first_events[-1].stm_state, tokenizer=tiny_tokenizer,
                                            max_new_tokens=4))
        assert streamed == second_events[-3].text[0]

        # the memory file loads with model.load_memory; delete forgets the conversation
        for _ in range(100):
            described = client.get(f"/v1/conversations/{conversation_id}").json()
            if described["turns"] == 2:
                break
            time.sleep(0.02)
        memory_file = tmp_path / "conversation.stm.safetensors"
        memory_file.write_bytes(client.get(f"/v1/conversations/{conversation_id}/memory").content)
        torch.testing.assert_close(model.load_memory(memory_file), second_events[-1].stm_state, atol=STM_ATOL, rtol=1e-4)
        assert client.delete(f"/v1/conversations/{conversation_id}").status_code == 204
        assert client.get(f"/v1/conversations/{conversation_id}").status_code == 404

        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in ("rxt_http_requests_total{", "rxt_messages_total 2", "rxt_batch_size_count", "rxt_queued_messages 0",
                     "rxt_memory_update_seconds_total", "rxt_stored_conversations 0"):
            assert name in metrics.text, name


def test_idle_conversations_expire_with_ttl_seconds(model, tiny_tokenizer, tmp_path):
    app = create_app(serve_config(store=f"sqlite:///{tmp_path / 'ttl.db'}", ttl_seconds=1.0), model, tiny_tokenizer)
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        conversation_id = client.post("/v1/conversations", json={}).json()["id"]
        assert client.get(f"/v1/conversations/{conversation_id}").status_code == 200
        time.sleep(2.2)  # expired, and the server's evictor (every ttl/2, at least 1 s) removed it
        assert_error(client.get(f"/v1/conversations/{conversation_id}"), 404, "not_found")
        assert "rxt_stored_conversations 0" in client.get("/metrics").text
        assert app.state.rxt.store.evict_expired() == 0


# ------------------------------------------------------------------------------------------------------
# command line, keys, benchmark


def test_serve_command_line_and_config_errors(tmp_path, capsys):
    from rxt_hf.recipes.cli import main as rxt

    with pytest.raises(SystemExit) as exit_info:
        rxt(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "--store" in capsys.readouterr().out

    config = parse_config(["my-model", "--store", "redis://localhost:6379/0", "--api-key", "first-key-1",
                           "--api-key", "second-key-2", "--max-batch-size", "4", "--ttl-seconds", "3600"])
    assert config.model == "my-model" and config.api_key == ["first-key-1", "second-key-2"]
    assert config.max_batch_size == 4 and config.ttl_seconds == 3600.0 and config.max_query_tokens is None
    with pytest.raises(ValueError, match=r"max_batch_size=0 is invalid: use a positive integer"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeConfig(max_body_bytes=10)
    with pytest.raises(SystemExit, match="holds no saved model"):
        rxt(["serve", str(tmp_path)])

    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nkey-from-file-1\n\n")
    assert read_api_keys(["key-from-cli-1"], keys) == ["key-from-cli-1", "key-from-file-1"]
    keys.write_text("short\n")
    with pytest.raises(ValueError, match=r"keys.txt:1 is invalid"):
        read_api_keys([], keys)
    with pytest.raises(ValueError, match="does not exist"):
        read_api_keys([], tmp_path / "missing.txt")


def test_bench_serve_smoke(tmp_path):
    import rxt_hf.benchmarks.cli  # noqa: F401  (registers `serve`)
    from rxt_hf.benchmarks import BENCHMARKS, run_benchmark

    assert "serve" in BENCHMARKS
    payload = run_benchmark("serve", smoke=True, output_dir=tmp_path, threads=1, plot=False)
    written = json.loads((tmp_path / "serve.json").read_text(encoding="utf-8"))
    assert written["name"] == "serve" and written["smoke"] is True and written["machine"]["torch_threads"] == 1
    results = payload["results"]
    for level in results["concurrency"]:
        record = results["batched"][str(level)]
        assert record["messages"] == level * payload["config"]["messages_per_conversation"]
        assert record["messages_per_s"] > 0 and 0 < record["latency_s"]["p50"] <= record["latency_s"]["p99"]
    assert results["one_at_a_time"]["max_batch_size_seen"] == 1
    assert results["batched"][str(results["concurrency"][-1])]["max_batch_size_seen"] > 1
    row = written["targets"]["batched_vs_one_at_a_time"]
    assert row["target"] == 4.0 and row["comparison"] == ">=" and isinstance(row["met"], bool)
