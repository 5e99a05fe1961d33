"""serve: `rxt serve` throughput (messages/s) and latency (p50 / p99) for 1, 8 and 32 concurrent conversations.

A real server (uvicorn in a thread of this process, the batching engine, a store) answers HTTP clients (httpx,
one asyncio task per conversation). Each client creates its conversation, sends `warmup_messages` untimed
messages, waits for every other client, then sends `messages_per_conversation` timed ones: each message is sent
as soon as the previous answer is complete (the server queues it behind that answer's memory update), with the
answer streamed as server-sent events. Latency is send -> complete answer; time to first token is send -> first
token event; throughput is timed messages / wall time of the timed phase.

The same load at the highest concurrency is also served one message at a time (`max_batch_size=1`): the target
is batched serving >= 4x its messages/s.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from pathlib import Path

from . import timing
from .common import DEFAULT_PRESET, build_rxt, describe_rxt

NAME = "serve"
DESCRIPTION = (
    "rxt serve over HTTP: messages/s and latency p50/p99 for 1, 8 and 32 concurrent conversations (batched engine), "
    "vs the same load served one message at a time."
)
DEFAULTS = dict(
    preset=DEFAULT_PRESET,
    concurrency=(1, 8, 32),
    messages_per_conversation=4,
    warmup_messages=1,
    max_new_tokens=32,
    max_batch_size=32,
    max_wait_ms=5.0,
    store="sqlite",
)
SMOKE = {
    **DEFAULTS,
    "preset": "rxt-tiny",
    "concurrency": (1, 4),
    "messages_per_conversation": 2,
    "max_new_tokens": 4,
    "max_batch_size": 4,
}
TARGET_SPEEDUP = 4.0
STORES = ("sqlite", "memory")

_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
_THINGS = ["apple", "book", "cat", "kite", "lamp", "pen", "ship", "drum"]
_PLACES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def corpus(n: int = 400) -> list[str]:
    """Short synthetic sentences to train the benchmark's tokenizer (the model's weights are random anyway)."""
    return [
        f"{_NAMES[i % 8]} keeps the {_THINGS[(i * 3) % 8]} in {_PLACES[(i * 5) % 6]}. "
        f"Where is the {_THINGS[(i * 7) % 8]} of {_NAMES[(i * 3) % 8]}? It is number {i % 10}."
        for i in range(n)
    ]


def message(conversation: int, turn: int) -> str:
    return f"{_NAMES[conversation % 8]} put the {_THINGS[turn % 8]} in {_PLACES[(conversation + turn) % 6]}. Where is it?"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (`q` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": sum(values) / len(values), "count": len(values)}


class _Barrier:
    """Every client starts its timed messages together (asyncio.Barrier needs Python 3.11)."""

    def __init__(self, parties: int):
        self.parties = parties
        self.arrived = 0
        self.event = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        await self.event.wait()


async def _conversation(client, index: int, warmup: int, timed: int, barrier: _Barrier, record: dict) -> None:
    from rxt_hf.serving.server import aiter_sse

    response = await client.post("/v1/conversations", json={})
    response.raise_for_status()
    conversation_id = response.json()["id"]
    for turn in range(warmup + timed):
        if turn == warmup:
            await barrier.wait()
            record.setdefault("start", time.perf_counter())
        sent = time.perf_counter()
        first = None
        async with client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": message(index, turn)}
        ) as stream:
            if stream.status_code != 200:
                raise RuntimeError(f"message {turn} of conversation {index}: HTTP {stream.status_code}")
            async for event, data in aiter_sse(stream.aiter_lines()):
                if event == "token" and first is None:
                    first = time.perf_counter()
                elif event == "error":
                    raise RuntimeError(f"message {turn} of conversation {index} failed: {data}")
                elif event == "answer":
                    break  # the next message goes out now; the server queues it behind this memory update
        done = time.perf_counter()
        if turn >= warmup:
            record["latency"].append(done - sent)
            record["ttft"].append((first or done) - sent)
            record["end"] = max(record.get("end", 0.0), done)


async def _load(url: str, conversations: int, warmup: int, timed: int) -> dict:
    import httpx

    record: dict = {"latency": [], "ttft": []}
    limits = httpx.Limits(max_connections=conversations + 4, max_keepalive_connections=conversations + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        barrier = _Barrier(conversations)
        await asyncio.gather(*(_conversation(client, i, warmup, timed, barrier, record) for i in range(conversations)))
    wall = record["end"] - record["start"]
    messages = conversations * timed
    return {
        "conversations": conversations,
        "messages": messages,
        "wall_s": wall,
        "messages_per_s": messages / wall,
        "latency_s": latency_summary(record["latency"]),
        "time_to_first_token_s": latency_summary(record["ttft"]),
    }


def _serve_level(model, tokenizer, store_url: str, max_batch_size: int, conversations: int, opts: dict) -> dict:
    """One server (fresh store) under one load; adds the engine's batch statistics."""
    from rxt_hf.serving.server import BackgroundServer, ServeConfig, create_app

    config = ServeConfig(
        store=store_url,
        max_batch_size=max_batch_size,
        max_wait_ms=opts["max_wait_ms"],
        max_new_tokens=opts["max_new_tokens"],
        max_concurrent_requests=max(64, 2 * conversations),
        model_name=opts["preset"],
    )
    app = create_app(config, model, tokenizer)
    with BackgroundServer(app) as running:
        result = asyncio.run(_load(running.url, conversations, opts["warmup_messages"], opts["messages_per_conversation"]))
        stats = app.state.rxt.engine.stats
        result["batches"] = stats.batches_total
        result["mean_batch_size"] = stats.batch_size_sum / max(1, stats.batches_total)
        result["max_batch_size_seen"] = stats.max_batch_size_seen
        result["generate_s"] = stats.generate_seconds_total
        result["memory_update_s"] = stats.memory_update_seconds_total
    return result


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer

    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    if opts["store"] not in STORES:
        raise ValueError(f"store={opts['store']!r}: choose one of {STORES} (redis needs a server; use rxt serve for it).")
    levels = [int(n) for n in opts["concurrency"]]
    with timing.torch_threads(threads), tempfile.TemporaryDirectory() as scratch:
        model = build_rxt(opts["preset"], seed=seed)
        tokenizer = build_tokenizer(corpus(), vocab_size=min(model.config.vocab_size, 1000), model_max_length=512)
        payload = timing.new_payload(
            NAME, DESCRIPTION, smoke,
            {**opts, "seed": seed, "rxt": describe_rxt(model, opts["preset"]), "tokenizer_vocab_size": len(tokenizer)},
        )

        def store_url(tag: str) -> str:
            return f"sqlite:///{Path(scratch) / f'{tag}.db'}" if opts["store"] == "sqlite" else "memory://"

        batched = {
            str(n): _serve_level(model, tokenizer, store_url(f"batched-{n}"), opts["max_batch_size"], n, opts)
            for n in levels
        }
        top = levels[-1]
        single = _serve_level(model, tokenizer, store_url("one-at-a-time"), 1, top, opts)

    speedup = timing.ratio(batched[str(top)]["messages_per_s"], single["messages_per_s"])
    payload["results"] = {
        "concurrency": levels,
        "batched": batched,
        "one_at_a_time": single,
        "speedup_vs_one_at_a_time": speedup,
    }
    payload["targets"] = {
        "batched_vs_one_at_a_time": timing.target(
            f"messages/s with {top} concurrent conversations: batched engine / one message at a time",
            speedup,
            TARGET_SPEEDUP,
        )
    }
    payload["notes"].append(
        "Latency = send -> complete answer (streamed); it includes waiting for the conversation's previous memory "
        "update, since every message is sent as soon as the previous answer is complete."
    )
    if plot:
        written = timing.plot_lines(
            timing.results_dir(output_dir) / f"{NAME}.png",
            {
                f"batched (max_batch_size={opts['max_batch_size']})": (levels, [batched[str(n)]["messages_per_s"] for n in levels]),
                "one at a time": ([top], [single["messages_per_s"]]),
            },
            "rxt serve: messages/s vs concurrent conversations",
            "concurrent conversations",
            "messages/s",
            logx=True,
            subtitle=timing.machine_subtitle(payload["machine"]),
        )
        if written is not None:
            payload["plots"].append(str(Path(written)))
    return timing.finish(NAME, payload, output_dir)
