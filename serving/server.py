"""`rxt serve MODEL`: an HTTP server for RxT conversations (FastAPI + uvicorn).

Each conversation is an STM in a store (`serving.store`: SQLite, Redis or in-memory), never a transcript.
A message is answered by the batching engine (`serving.engine`): messages of different conversations share
one batched `generate()`, the memory update runs after the answer is delivered, and the next message of
the same conversation waits for it.

Endpoints (JSON unless noted; errors are `{"error": {"message", "type", "code"}}`):

| method | path | what |
|---|---|---|
| GET | `/` | the chat page (HTML) |
| GET | `/healthz` | liveness + model / store / queue facts |
| GET | `/metrics` | Prometheus text format |
| GET | `/v1/models` | the served model (OpenAI format) |
| POST | `/v1/conversations` | new conversation (`system_prompt` -> initial STM via `memory_from_prompt`), 201 |
| GET | `/v1/conversations/{id}` | version, turns, timestamps, busy |
| GET | `/v1/conversations/{id}/memory` | the STM as a safetensors file (`model.load_memory` reads it) |
| DELETE | `/v1/conversations/{id}` | forget it, 204 |
| POST | `/v1/conversations/{id}/messages` | answer `content`: server-sent events `queued`, `start`, `token`, `answer`, `memory_update_started`, `memory_updated` (or `error`); `stream: false` gives JSON |
| POST | `/v1/chat/completions` | OpenAI-compatible; needs `conversation_id` or `user`; only the last user message is read |

With API keys (`--api-key`, `--api-keys-file`) every `/v1/` request needs `Authorization: Bearer KEY`; see
`serving.security` for ownership (another key gets 404) and the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
import types
import typing
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rxt_hf.modeling_rxt.format_rxt import stm_to_bytes
from rxt_hf.serving.engine import AsyncEvents, BatchingEngine, EngineConfig, Sampling, Turn, TurnFailed
from rxt_hf.serving.security import (
    ApiError,
    ApiKeys,
    BodySizeLimit,
    ConcurrencyLimit,
    InFlightRequests,
    error_body,
    read_api_keys,
)
from rxt_hf.serving.store import (
    ConversationExists,
    ConversationNotFound,
    IncompatibleMemory,
    StoredMemory,
    STMStore,
    StoreError,
    model_fingerprint,
    open_store,
)

logger = logging.getLogger("rxt.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"


# ------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ServeConfig(EngineConfig):
    """Settings of `rxt serve` (every field is a command-line option: `max_batch_size` -> `--max-batch-size`)."""

    model: str = field(default="", metadata={"help": "saved model folder (with its tokenizer)", "positional": True})
    store: str = field(
        default="memory://",
        metadata={"help": "where conversations live: sqlite:///path.db, redis://host:port/db or memory:// (lost on exit)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    api_key: list[str] = field(
        default_factory=list, metadata={"help": "accepted API key (repeatable); none and no file: open server"}
    )
    api_keys_file: str | None = field(default=None, metadata={"help": "file with one accepted API key per line"})
    max_body_bytes: int = field(default=64 * 1024, metadata={"help": "largest request body (413 above)"})
    max_query_tokens: int | None = field(
        default=None,
        metadata={"help": "longest message in tokens (422 above); default: interaction length - max_new_tokens"},
    )
    max_concurrent_requests: int = field(
        default=64, metadata={"help": "requests in progress per API key (or client address without keys); 429 above"}
    )
    ttl_seconds: float | None = field(
        default=None, metadata={"help": "forget conversations not updated for this long (default: keep)"}
    )
    model_name: str | None = field(
        default=None, metadata={"help": "model name reported by /v1/models and completions (default: folder name)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's default)"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: debug, info, warning, error"})

    def __post_init__(self):
        super().__post_init__()
        checks = {
            "port": (self.port, 0 <= self.port <= 65535, "0..65535"),
            "max_body_bytes": (self.max_body_bytes, self.max_body_bytes >= 256, "at least 256 bytes, e.g. 65536"),
            "max_query_tokens": (
                self.max_query_tokens, self.max_query_tokens is None or self.max_query_tokens >= 4,
                "at least 4 tokens ([BOS][Q] x [A]) or unset",
            ),
            "max_concurrent_requests": (
                self.max_concurrent_requests, self.max_concurrent_requests >= 1, "a positive integer, e.g. 64",
            ),
            "ttl_seconds": (self.ttl_seconds, self.ttl_seconds is None or self.ttl_seconds > 0, "a positive number"),
            "threads": (self.threads, self.threads is None or self.threads >= 1, "a positive integer"),
            "log_level": (
                self.log_level, self.log_level in ("critical", "error", "warning", "info", "debug", "trace"),
                "debug, info, warning or error",
            ),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"ServeConfig.{name}={value!r} is invalid: use {expected}.")


def _option_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) of a ServeConfig field annotation such as `int | None` or `list[str]`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def build_parser(prog: str = "rxt serve") -> argparse.ArgumentParser:
    """The command line of `rxt serve`, one option per `ServeConfig` field (help from the field metadata)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an RxT model over HTTP: conversations with memory, an OpenAI-compatible endpoint and a "
        "chat page at /.",
    )
    hints = typing.get_type_hints(ServeConfig)
    engine_fields = {spec.name for spec in dataclasses.fields(EngineConfig)}
    groups = {
        False: parser.add_argument_group("server"),
        True: parser.add_argument_group("engine (batching and generation)"),
    }
    for spec in sorted(dataclasses.fields(ServeConfig), key=lambda spec: spec.name in engine_fields):
        kind, is_list = _option_type(hints[spec.name])
        help_text = spec.metadata.get("help", "")
        group = groups[spec.name in engine_fields]
        if spec.metadata.get("positional"):
            group.add_argument(spec.name, help=help_text)
            continue
        flag = "--" + spec.name.replace("_", "-")
        if is_list:
            group.add_argument(flag, dest=spec.name, type=kind, action="append", default=[], help=help_text)
        elif kind is bool:
            group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=spec.default, help=help_text)
        else:
            default = spec.default if spec.default is not dataclasses.MISSING else None
            shown = f"{help_text} (default: {default})" if default is not None and "default" not in help_text else help_text
            group.add_argument(flag, dest=spec.name, type=kind, default=default, help=shown)
    return parser


def parse_config(argv: Sequence[str]) -> ServeConfig:
    args = build_parser().parse_args(list(argv))
    return ServeConfig(**vars(args))


# ------------------------------------------------------------------------------------------------------
# request bodies


class CreateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = Field(
        default=None, description="written into the initial memory as one interaction (memory_from_prompt)"
    )


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(description="the user's message")
    stream: bool = Field(default=True, description="server-sent events (true) or one JSON answer (false)")
    max_new_tokens: int | None = Field(default=None, ge=1, description="answer length limit (<= the server's)")
    temperature: float | None = Field(default=None, ge=0, description="0 = greedy; default: the server's")
    top_p: float | None = Field(default=None, gt=0, le=1)
    wait_for_memory: bool = Field(default=False, description="with stream=false: answer after the memory update")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    user: str | None = Field(default=None, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=256)


# ------------------------------------------------------------------------------------------------------
# small helpers


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n".encode("utf-8")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """Client side of `sse`: `(event, data)` pairs from the lines of a stream (e.g. httpx's `aiter_lines()`);
    `event` is "message" when unnamed, `data` is parsed JSON (or the raw string, like OpenAI's `[DONE]`)."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                raw = "\n".join(data)
                try:
                    parsed = json.loads(raw)
                except json.JSONDecodeError:
                    parsed = raw
                yield event, parsed
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def message_text(message: ChatMessage) -> str:
    """The text of an OpenAI message (a string or a list of `{"type": "text", "text": ...}` parts)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for index, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400, "unsupported_content",
                f"messages[].content[{index}] has type {part.get('type')!r}: this model reads text parts only.",
            )
        texts.append(part["text"])
    return "".join(texts)


def user_conversation_id(owner: str | None, user: str) -> str:
    """The conversation of OpenAI's `user` field: derived from the key and the user, so keys never share one."""
    return "user-" + hashlib.sha256(f"{owner or ''}\x00{user}".encode("utf-8")).hexdigest()[:32]


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source hashes of the inline `<tag>` blocks of a page."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode('utf-8')).digest()).decode()}'" for b in blocks]


class RequestCounter:
    """HTTP requests by (method, route template, status), thread-safe."""

    def __init__(self):
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self._counts[(method, route, status)] += 1

    def items(self) -> list[tuple[tuple[str, str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


class RequestMetrics:
    """ASGI middleware feeding a `RequestCounter` (the route template keeps label values few)."""

    def __init__(self, app, counter: RequestCounter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.counter.add(scope["method"], route, status)


# ------------------------------------------------------------------------------------------------------
# the server


class RxTServer:
    """The state and handlers behind the app: model, tokenizer, store, engine and keys."""

    def __init__(self, config: ServeConfig, model, tokenizer, store: STMStore):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.keys = ApiKeys(read_api_keys(config.api_key, config.api_keys_file))
        self.engine = BatchingEngine(model, tokenizer, store, config)
        self.model_name = config.model_name or (Path(config.model).name if config.model else "rxt")
        self.started_at = time.time()
        self.page = (STATIC_DIR / "chat.html").read_text(encoding="utf-8")
        self.page_csp = (
            "default-src 'none'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            f"frame-ancestors 'none'; script-src {' '.join(inline_hashes(self.page, 'script'))}; "
            f"style-src {' '.join(inline_hashes(self.page, 'style'))}"
        )
        self.requests = RequestCounter()
        self.in_flight = InFlightRequests()

    # --- access ---------------------------------------------------------------------------------------

    def owner(self, request: Request) -> str | None:
        return self.keys.authenticate(request.headers.get("authorization"))

    @staticmethod
    def not_found(conversation_id: str) -> ApiError:
        return ApiError(404, "not_found", f"No conversation {conversation_id!r} for this API key: check the id, or create one.")

    async def load(self, conversation_id: str, owner: str | None) -> StoredMemory:
        """The conversation if it exists, is readable by this model and belongs to `owner`; else 404 / 409."""
        try:
            memory = await run_in_threadpool(self.store.get, conversation_id)
        except (ConversationNotFound, ValueError):
            raise self.not_found(conversation_id) from None
        except IncompatibleMemory as error:
            differences = "; ".join(error.differences) or str(error)
            raise ApiError(
                409, "incompatible_memory",
                f"Conversation {conversation_id!r} was saved by a different model ({differences}). This server never "
                f"reads it: DELETE /v1/conversations/{conversation_id} and start a new one, or serve the model "
                "that wrote it.",
            ) from None
        if not self.keys.may_access(owner, memory.owner):
            raise self.not_found(conversation_id)
        return memory

    async def create(self, owner: str | None, system_prompt: str | None, conversation_id: str | None = None) -> StoredMemory:
        conversation_id = conversation_id or "conv-" + uuid.uuid4().hex

        def initial_memory() -> torch.Tensor:
            with torch.no_grad():
                if system_prompt is None:
                    stm = self.model.init_memory(1)
                else:
                    stm = self.model.memory_from_prompt(system_prompt, tokenizer=self.tokenizer)
            return stm.detach().to("cpu").clone()

        try:
            stm = await run_in_threadpool(initial_memory)
        except ValueError as error:  # empty or too long prompt
            raise ApiError(422, "invalid_system_prompt", str(error)) from None
        return await run_in_threadpool(self.store.create, conversation_id, stm, owner, {"turns": "0"})

    @staticmethod
    def describe(memory: StoredMemory) -> dict[str, Any]:
        return {
            "id": memory.conversation_id,
            "version": memory.version,
            "turns": int(memory.metadata.get("turns", "0")),
            "created_at": memory.created_at,
            "updated_at": memory.updated_at,
        }

    # --- turns ----------------------------------------------------------------------------------------

    def submit(
        self, conversation_id: str, text: str, max_new_tokens: int | None, temperature: float | None, top_p: float | None
    ) -> tuple[Turn, AsyncEvents]:
        """Render the message, queue it in the engine; ApiError for a bad message or a full queue."""
        config = self.config
        budget = config.max_new_tokens if max_new_tokens is None else max_new_tokens
        sampling = Sampling(
            temperature=config.temperature if temperature is None else temperature,
            top_p=config.top_p if top_p is None else top_p,
        )
        events = AsyncEvents()
        try:
            query_ids = self.engine.render_query(text, config.max_query_tokens)
            turn = Turn(conversation_id, query_ids, events, max_new_tokens=budget, sampling=sampling)
            self.engine.submit(turn)
        except TurnFailed as error:
            headers = {"Retry-After": "1"} if error.status == 503 else None
            raise ApiError(error.status, error.code, error.message, headers) from None
        return turn, events

    @staticmethod
    async def wait_for(events: AsyncEvents, kind: str) -> dict[str, Any]:
        """The data of the turn's first `kind` event; ApiError if the turn fails first."""
        while True:
            event = await events.get()
            if event.kind == "error":
                raise ApiError(event.data["status"], event.data["type"], event.data["message"])
            if event.kind == kind:
                return event.data

    @staticmethod
    async def event_stream(turn: Turn, events: AsyncEvents) -> AsyncIterator[bytes]:
        """The turn's events as server-sent events; events already waiting go out in one write."""
        try:
            while True:
                event = await events.get()
                chunk = [sse(event.kind, event.data)]
                while not event.terminal and (following := events.get_nowait()) is not None:
                    event = following
                    chunk.append(sse(event.kind, event.data))
                yield b"".join(chunk)
                if event.terminal:
                    return
        finally:
            turn.cancel()  # the caller left: drop the turn if it has not started

    # --- OpenAI-compatible ----------------------------------------------------------------------------

    async def openai_conversation(self, body: ChatCompletionRequest, owner: str | None) -> str:
        """The conversation of a chat completion: `conversation_id` (must exist), or the one of `user` (created
        on first use, its system / developer messages written into the initial memory)."""
        if body.conversation_id is not None:
            await self.load(body.conversation_id, owner)
            return body.conversation_id
        if body.user is None:
            raise ApiError(
                400, "missing_conversation",
                "Pass 'conversation_id' (from POST /v1/conversations) or 'user': the conversation so far lives in "
                "the server's memory, only the last user message is read.",
            )
        conversation_id = user_conversation_id(owner, body.user)
        try:
            await self.load(conversation_id, owner)
        except ApiError as error:
            if error.status != 404:
                raise
            system = "\n".join(message_text(m) for m in body.messages if m.role in ("system", "developer"))
            try:
                await self.create(owner, system or None, conversation_id)
            except ConversationExists:  # a concurrent first request created it
                pass
        return conversation_id

    @staticmethod
    async def openai_stream(turn: Turn, events: AsyncEvents, completion: dict, usage) -> AsyncIterator[bytes]:
        """OpenAI `chat.completion.chunk` events, then `[DONE]` once the answer is complete (the memory update
        goes on after the stream ends)."""

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return sse(None, {**completion, "object": "chat.completion.chunk", "choices": [choice], **extra})

        streamed = ""
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event.kind == "token" and event.data["text"]:
                    streamed += event.data["text"]
                    yield chunk({"content": event.data["text"]})
                elif event.kind == "answer":
                    text = event.data["text"]
                    rest = text[len(streamed) :] if text.startswith(streamed) else ""
                    if rest:  # text held back by the incremental detokenizer
                        yield chunk({"content": rest})
                    yield chunk({}, event.data["finish_reason"], usage=usage(event.data))
                    yield sse(None, "[DONE]")
                    return
                elif event.kind == "error":
                    yield sse(None, error_body(event.data["status"], event.data["type"], event.data["message"]))
                    return
        finally:
            turn.cancel()

    # --- metrics --------------------------------------------------------------------------------------

    def metrics_text(self, stored_conversations: int | None) -> str:
        stats = self.engine.stats
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric(
            "rxt_http_requests_total", "counter", "HTTP requests by method, route and status.",
            [(f'{{method="{m}",route="{r}",status="{s}"}}', n) for (m, r, s), n in self.requests.items()],
        )
        metric("rxt_http_requests_in_progress", "gauge", "API requests in progress.", [("", self.in_flight.total())])
        metric("rxt_messages_total", "counter", "Messages answered and committed to memory.", [("", stats.messages_total)])
        metric("rxt_messages_failed_total", "counter", "Messages that ended with an error.", [("", stats.messages_failed)])
        metric("rxt_generated_tokens_total", "counter", "Answer tokens generated.", [("", stats.generated_tokens_total)])
        metric(
            "rxt_batch_size", "summary", "Conversations per batched generate() call.",
            [("_sum", stats.batch_size_sum), ("_count", stats.batches_total)],
        )
        metric("rxt_generate_seconds_total", "counter", "Time in batched generate().", [("", stats.generate_seconds_total)])
        metric(
            "rxt_queue_wait_seconds_total", "counter", "Time messages waited before generation.",
            [("", stats.queue_wait_seconds_total)],
        )
        metric("rxt_memory_updates_total", "counter", "Batched memory updates.", [("", stats.memory_updates_total)])
        metric(
            "rxt_memory_update_seconds_total", "counter", "Time in batched memory updates.",
            [("", stats.memory_update_seconds_total)],
        )
        metric(
            "rxt_version_conflicts_total", "counter", "Memory commits refused by compare-and-set.",
            [("", stats.version_conflicts_total)],
        )
        metric("rxt_queued_messages", "gauge", "Messages waiting for generation.", [("", self.engine.queue_depth())])
        metric(
            "rxt_active_conversations", "gauge", "Conversations with a message in flight.",
            [("", self.engine.active_conversations())],
        )
        if stored_conversations is not None:
            metric("rxt_stored_conversations", "gauge", "Live conversations in the store.", [("", stored_conversations)])
        metric("rxt_uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started_at)])
        return "\n".join(lines) + "\n"


def load_model(folder: str):
    """Model (eval mode) and tokenizer of a saved RxT folder, with a clear error for a wrong path."""
    from transformers import AutoTokenizer

    from rxt_hf.modeling_rxt import RxTForCausalLM

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SystemExit(f"rxt serve: MODEL={folder!r} holds no saved model (config.json missing): pass a model folder.")
    return RxTForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def create_app(config: ServeConfig, model=None, tokenizer=None, store: STMStore | None = None) -> FastAPI:
    """The FastAPI app of `rxt serve`. `model` / `tokenizer` default to loading `config.model`, `store` to opening
    `config.store`; the engine starts and stops with the app (lifespan), and the app closes a store it opened."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model)
    model.eval()
    owns_store = store is None
    if store is None:
        dtype = model.get_input_embeddings().weight.dtype
        store = open_store(config.store, model_fingerprint(model), model.config.stm_shape, dtype, config.ttl_seconds)
    server = RxTServer(config, model, tokenizer, store)

    async def evict_expired_forever():
        interval = min(60.0, max(1.0, config.ttl_seconds / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await run_in_threadpool(store.evict_expired)
                if removed:
                    logger.info("evicted %d expired conversations", removed)
            except Exception:
                logger.exception("evicting expired conversations failed")

    async def lifespan(app: FastAPI):
        server.engine.start()
        evictor = asyncio.create_task(evict_expired_forever()) if config.ttl_seconds else None
        logger.info(
            "RxT server: model %s, store %r, %s, max_batch_size=%d",
            server.model_name, store, f"{len(server.keys)} API key(s)" if server.keys.enabled else "no API keys (open)",
            config.max_batch_size,
        )
        try:
            yield
        finally:
            if evictor is not None:
                evictor.cancel()
            await run_in_threadpool(server.engine.stop)
            if owns_store:
                store.close()

    app = FastAPI(title="RxT server", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.rxt = server

    # --- errors -----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        code = codes.get(error.status_code, "http_error")
        return JSONResponse(error_body(error.status_code, code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        broken = [p for p in problems if p.get("type") == "json_invalid"]
        if broken:
            context = broken[0].get("ctx", {}).get("error", "")
            return JSONResponse(
                error_body(400, "invalid_json", f"The body is not valid JSON ({context}): send a JSON object."),
                status_code=400,
            )
        described = "; ".join(
            f"{'.'.join(str(part) for part in p.get('loc', ()) if part != 'body') or 'body'}: {p.get('msg')}"
            for p in problems
        )
        return JSONResponse(error_body(422, "invalid_request", f"Invalid request: {described}."), status_code=422)

    @app.exception_handler(ConversationNotFound)  # deleted or expired between two steps of a request
    async def vanished(request: Request, error: ConversationNotFound):
        return JSONResponse(RxTServer.not_found(error.conversation_id or "?").body(), status_code=404)

    @app.exception_handler(StoreError)
    async def store_unavailable(request: Request, error: StoreError):
        logger.error("store error on %s %s: %s", request.method, request.url.path, error)
        return JSONResponse(
            error_body(503, "store_unavailable", "The conversation store is unavailable: retry shortly."),
            status_code=503, headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal_error", f"Internal error: {type(error).__name__}."), status_code=500)

    # --- page, health, metrics --------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(
            server.page,
            headers={"Content-Security-Policy": server.page_csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    @app.get("/healthz")
    async def health():
        return {
            "status": "ok" if server.engine.running else "stopping",
            "model": server.model_name,
            "store": store.backend,
            "api_keys": server.keys.enabled,
            "queued_messages": server.engine.queue_depth(),
            "active_conversations": server.engine.active_conversations(),
            "max_batch_size": config.max_batch_size,
            "max_new_tokens": config.max_new_tokens,
            "max_query_tokens": min(config.max_query_tokens or 10**9, server.engine.max_query_tokens),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        try:
            stored = await run_in_threadpool(store.count)
        except Exception:
            stored = None
        return PlainTextResponse(server.metrics_text(stored), media_type="text/plain; version=0.0.4")

    # --- conversations ----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.owner(request)
        return {
            "object": "list",
            "data": [{"id": server.model_name, "object": "model", "created": int(server.started_at), "owned_by": "rxt"}],
        }

    @app.post("/v1/conversations", status_code=201)
    async def create_conversation(request: Request, body: CreateConversation | None = None):
        owner = server.owner(request)
        memory = await server.create(owner, body.system_prompt if body else None)
        return server.describe(memory)

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request):
        memory = await server.load(conversation_id, server.owner(request))
        return {**server.describe(memory), "busy": server.engine.busy(conversation_id)}

    @app.get("/v1/conversations/{conversation_id}/memory")
    async def get_memory(conversation_id: str, request: Request):
        memory = await server.load(conversation_id, server.owner(request))
        blob = stm_to_bytes(
            memory.stm_state, model_fingerprint=store.fingerprint, conversation_version=str(memory.version)
        )
        return Response(
            blob,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{conversation_id}.stm.safetensors"',
                "X-RxT-Version": str(memory.version),
            },
        )

    @app.delete("/v1/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(conversation_id: str, request: Request):
        owner = server.owner(request)
        try:
            await server.load(conversation_id, owner)
        except ApiError as error:
            if error.status != 409:  # a state of another model may still be deleted by its owner
                raise
            if server.keys.enabled:  # ... but its owner cannot be read: only an open server deletes it
                raise server.not_found(conversation_id) from None
        await run_in_threadpool(store.delete, conversation_id)
        return Response(status_code=204)

    @app.post("/v1/conversations/{conversation_id}/messages")
    async def send_message(conversation_id: str, body: SendMessage, request: Request):
        await server.load(conversation_id, server.owner(request))
        turn, events = server.submit(conversation_id, body.content, body.max_new_tokens, body.temperature, body.top_p)
        if body.stream:
            return StreamingResponse(server.event_stream(turn, events), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            answer = await server.wait_for(events, "answer")
            result = {"conversation_id": conversation_id, **answer, "memory": "updating"}
            if body.wait_for_memory:
                result.update(await server.wait_for(events, "memory_updated"), memory="updated")
            return result
        finally:
            turn.cancel()

    # --- OpenAI-compatible ------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        owner = server.owner(request)
        if body.n != 1:
            raise ApiError(400, "unsupported_n", f"n={body.n}: this server returns one choice per request (n=1).")
        user_messages = [m for m in body.messages if m.role == "user"]
        if not user_messages:
            raise ApiError(400, "no_user_message", "messages has no 'user' message: send the user's message last.")
        text = message_text(user_messages[-1])
        conversation_id = await server.openai_conversation(body, owner)
        requested = body.max_completion_tokens or body.max_tokens
        budget = min(requested, config.max_new_tokens) if requested else None
        turn, events = server.submit(conversation_id, text, budget, body.temperature, body.top_p)
        completion = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": server.model_name,
            "conversation_id": conversation_id,
        }
        prompt_tokens = len(turn.query_ids)

        def usage(answer: dict) -> dict[str, int]:
            completion_tokens = len(answer["token_ids"]) - (answer["finish_reason"] == "length")
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if not body.stream:
            try:
                answer = await server.wait_for(events, "answer")
            finally:
                turn.cancel()
            message = {"role": "assistant", "content": answer["text"]}
            return {
                **completion, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": answer["finish_reason"]}],
                "usage": usage(answer),
            }

        stream = server.openai_stream(turn, events, completion, usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)

    # --- middlewares (the last added runs first) --------------------------------------------------

    def oversize(limit: int) -> Exception:
        return StarletteHTTPException(413, f"The request body is larger than max_body_bytes={limit}: send a smaller body.")

    app.add_middleware(ConcurrencyLimit, max_per_key=config.max_concurrent_requests, in_flight=server.in_flight)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes, oversize=oversize)
    app.add_middleware(RequestMetrics, counter=server.requests)
    return app


# ------------------------------------------------------------------------------------------------------
# running


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread (tests, benchmarks, notebooks).

    ```python
    >>> with BackgroundServer(create_app(config, model, tokenizer)) as running:
    ...     httpx.get(running.url + "/healthz")
    ```
    `port=0` picks a free port; `url` is known once `start()` returns.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="rxt-uvicorn", daemon=True)
        self.url: str | None = None

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start: see the log above.")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(config: ServeConfig) -> None:
    """Load the model, open the store and serve until interrupted (what `rxt serve` runs)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    logging.basicConfig(level=logging.DEBUG if config.log_level == "trace" else config.log_level.upper())
    try:
        app = create_app(config)
    except (ValueError, StoreError) as error:  # a bad keys file or store url: say which, no traceback
        raise SystemExit(f"rxt serve: {error}") from None
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    """`rxt serve ...` / `python -m rxt_hf.serving.server ...`."""
    import sys

    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        raise SystemExit(f"rxt serve: {error}") from None
    serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
