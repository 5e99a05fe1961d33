"""The serving engine: many conversations, one model, batched interactions.

An RxT interaction has two phases (see `modeling_rxt.interaction_rxt`): the decoder answers one query reading
the conversation's STM, then the encoder and memory attention write `query + answer` into a new STM. The
engine runs both phases for many conversations at once, with the same rules as [`RxTChat`] for one:

- **per-conversation order**: a conversation has at most one turn in flight; its next message waits until
  the previous turn's new STM is committed to the store (FIFO);
- **cross-conversation batching**: a generation thread collects ready turns of *different* conversations
  (up to `max_batch_size`, waiting at most `max_wait_ms` for more), stacks their STMs and runs one
  left-padded `generate()`, streaming each row's tokens to its own caller;
- **background memory update**: the finished batch goes to a memory thread that runs one batched
  `update_memory()` and commits every row with compare-and-set on the version it read, while the
  generation thread already serves other conversations. When conversations of the updating batch already
  have their next message queued, the generation thread waits for that update so they join the next batch
  (otherwise concurrent conversations split into groups taking turns with half-full batches).

Both phases are those of `modeling_rxt.conversation_rxt.ConversationBatch`, the turn loop of chat, training and
evaluation: a batch's STMs become one `ConversationBatch`, the generation thread calls its `generate` and the memory
thread its `write`. The engine does not use `ConversationBatch.play` (whole conversations turn by turn) because its
continuous batching regroups conversations at every turn: a batch is whichever conversations have a message ready
(their next messages are not known yet, and arrive at different times), with per-row answer budgets and sampling
settings, and its memory update runs on another thread while the next batch, of other conversations, generates.
So the engine plays exactly one turn per batch, and the store, not a batch object, carries the STM between turns.

Callers talk to the engine with [`Turn`]s: `engine.submit(turn)`, then read the turn's events
(`start`, `token`, `answer`, `memory_update_started`, then `memory_updated` or `error`) from its sink.
The engine knows nothing about HTTP; failures carry an HTTP-like `status` so a server can map them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from rxt_hf.modeling_rxt.conversation_rxt import ConversationBatch, close_answer
from rxt_hf.modeling_rxt.format_rxt import IncrementalDetokenizer, pad_rows, render_interaction
from rxt_hf.serving.store import ConversationNotFound, IncompatibleMemory, VersionConflict

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = ("memory_updated", "error")


# ------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class EngineConfig:
    """How the engine batches and generates (the generation part of [`ServeConfig`])."""

    max_batch_size: int = field(
        default=16, metadata={"help": "most conversations answered by one batched generate() call"}
    )
    max_wait_ms: float = field(
        default=5.0,
        metadata={"help": "how long a ready message may wait for others to join its batch (milliseconds)"},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "answer length limit; a request may ask for less, never for more"}
    )
    temperature: float = field(
        default=0.0, metadata={"help": "default sampling temperature of requests that set none (0 = greedy)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "default nucleus sampling mass (with temperature > 0)"})
    max_queued_messages: int = field(
        default=1024, metadata={"help": "messages waiting in the engine before new ones get 503 (overloaded)"}
    )

    def __post_init__(self):
        checks = {
            "max_batch_size": (self.max_batch_size, self.max_batch_size >= 1, "a positive integer, e.g. 16"),
            "max_wait_ms": (self.max_wait_ms, self.max_wait_ms >= 0, "0 or more milliseconds, e.g. 5"),
            "max_new_tokens": (self.max_new_tokens, self.max_new_tokens >= 1, "a positive integer, e.g. 64"),
            "temperature": (self.temperature, self.temperature >= 0, "0 (greedy) or a positive number"),
            "top_p": (self.top_p, 0 < self.top_p <= 1, "a number in (0, 1]"),
            "max_queued_messages": (
                self.max_queued_messages, self.max_queued_messages >= 1, "a positive integer, e.g. 1024",
            ),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: use {expected}.")

    def engine_config(self) -> EngineConfig:
        """Only the engine's fields (a subclass such as `ServeConfig` carries more)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one turn; only turns with equal settings share a `generate()` call."""

    temperature: float = 0.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


# ------------------------------------------------------------------------------------------------------
# turns and their events


class TurnFailed(Exception):
    """A turn (or its submission) failed; `status` is the HTTP status a server should answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TurnEvent:
    """One event of a turn: `kind` and a JSON-serialisable `data` dict."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_EVENTS


class EventSink(Protocol):
    def put(self, event: TurnEvent) -> None: ...


class BlockingEvents:
    """A sink for synchronous callers: `for event in sink` until the turn's last event."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, event: TurnEvent) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> TurnEvent:
        return self._queue.get(timeout=timeout)

    def __iter__(self) -> Iterator[TurnEvent]:
        while True:
            event = self._queue.get()
            yield event
            if event.terminal:
                return


class _LoopDelivery:
    """Hands events from engine threads to one event loop, waking the loop once per burst (a batched decoding
    step produces one event per row) instead of once per event."""

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # a strong reference would keep the registry's key alive
        self.pending: list[tuple[asyncio.Queue, TurnEvent]] = []
        self.lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopDelivery:
        with cls._registry_lock:
            delivery = cls._by_loop.get(loop)
            if delivery is None:
                delivery = cls._by_loop[loop] = cls(loop)
            return delivery

    def put(self, target: asyncio.Queue, event: TurnEvent) -> None:
        with self.lock:
            self.pending.append((target, event))
            if len(self.pending) > 1:  # a flush is already scheduled
                return
        loop = self.loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the loop is closed: nobody listens any more
            with self.lock:
                self.pending.clear()

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for target, event in pending:
            target.put_nowait(event)


class AsyncEvents:
    """A sink for asyncio callers (create it inside the event loop): `await sink.get()`."""

    def __init__(self):
        self._delivery = _LoopDelivery.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: TurnEvent) -> None:
        self._delivery.put(self._queue, event)

    async def get(self) -> TurnEvent:
        return await self._queue.get()

    def get_nowait(self) -> TurnEvent | None:
        """The next event if one is already there, else None."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None


@dataclass(eq=False)
class Turn:
    """One message of one conversation: the rendered query `[BOS][Q] ... [A]` and where its events go."""

    conversation_id: str
    query_ids: list[int]
    sink: EventSink
    max_new_tokens: int
    sampling: Sampling = Sampling()
    submitted_at: float = field(default_factory=time.perf_counter)
    started: bool = False
    cancelled: bool = False

    def emit(self, kind: str, **data) -> None:
        self.sink.put(TurnEvent(kind, data))

    def fail(self, error: TurnFailed) -> None:
        self.emit("error", status=error.status, type=error.code, message=error.message)

    def cancel(self) -> None:
        """Drop the turn if it has not started yet (its caller went away); a started turn runs to the end."""
        self.cancelled = True


# ------------------------------------------------------------------------------------------------------
# generation helpers


class RowBudget(StoppingCriteria):
    """Per-row `max_new_tokens`: row `i` stops after `budgets[i]` new tokens (others may go on)."""

    def __init__(self, prompt_length: int, budgets: list[int]):
        self.prompt_length = prompt_length
        self.budgets = torch.tensor(budgets)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        return (generated >= self.budgets).to(input_ids.device)


class BatchStreamer(BaseStreamer):
    """Fans the rows of a batched `generate()` out to their turns: `token` events, then `answer` as soon as
    a row is finished (its `[EOS]` or its budget), even while other rows still generate."""

    def __init__(self, turns: list[Turn], budgets: list[int], tokenizer, eos_token_id: int,
                 pad_token_id: int | None = None):
        self.turns = turns
        self.budgets = budgets
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.texts = [IncrementalDetokenizer(tokenizer) for _ in turns]
        self.generated: list[list[int]] = [[] for _ in turns]
        self.done = [False] * len(turns)
        self.prompt_seen = False
        self.tokenizer = tokenizer

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() sends the prompt first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.generated[row].append(token)
            if token != self.eos_token_id:
                self.turns[row].emit("token", token_id=token, text=self.texts[row].add(token))
            if token == self.eos_token_id or len(self.generated[row]) >= self.budgets[row]:
                self.finish(row)

    def finish(self, row: int) -> None:
        self.done[row] = True
        ids = close_answer(self.generated[row][: self.budgets[row]], self.eos_token_id, self.pad_token_id)
        finished = self.eos_token_id in self.generated[row][: self.budgets[row]]
        self.turns[row].emit(
            "answer",
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            token_ids=ids,
            finish_reason="stop" if finished else "length",
        )

    def end(self) -> None:
        for row, done in enumerate(self.done):
            if not done:
                self.finish(row)


@dataclass
class _UpdateJob:
    """A generated batch waiting for its memory update."""

    turns: list[Turn]
    versions: list[int]
    metadata: list[dict[str, str]]
    conversations: ConversationBatch  # the STMs [B, L, S, D] as read
    answers: list[list[int]]


@dataclass
class EngineStats:
    """Counters of an engine since it started (read by the server's /metrics)."""

    messages_total: int = 0
    messages_failed: int = 0
    batches_total: int = 0
    batch_size_sum: int = 0
    generated_tokens_total: int = 0
    generate_seconds_total: float = 0.0
    memory_updates_total: int = 0
    memory_update_seconds_total: float = 0.0
    version_conflicts_total: int = 0
    queue_wait_seconds_total: float = 0.0
    max_batch_size_seen: int = 0


# ------------------------------------------------------------------------------------------------------
# the engine


class BatchingEngine:
    """Answers turns of many conversations with one model (see the module docstring).

    Args:
        model: an `RxTForCausalLM` in eval mode.
        tokenizer: its tokenizer (chat template + decoding).
        store: an `STMStore` (`get` / `replace` with compare-and-set); the engine reads a conversation's STM
            when its turn starts and commits the new one after the memory update.
        config: an [`EngineConfig`] (or a `ServeConfig`).
    """

    def __init__(self, model, tokenizer, store, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.config = (config or EngineConfig()).engine_config()
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._ready: deque[Turn] = deque()
        self._waiting: dict[str, deque[Turn]] = {}  # conversation -> turns queued behind its turn in flight
        self._queued = 0  # turns submitted and not started
        self._updates: queue.Queue = queue.Queue()
        self._updating: set[str] = set()  # conversations generated, memory not yet committed
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._dtype = model.get_input_embeddings().weight.dtype

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> BatchingEngine:
        if self._threads:
            raise RuntimeError("BatchingEngine.start(): the engine is already running.")
        self._stopping = False
        threads = torch.get_num_threads()  # the caller's setting (torch's OpenMP setting is per thread)

        def run(loop):
            torch.set_num_threads(threads)
            loop()

        self._threads = [
            threading.Thread(target=run, args=(self._generation_loop,), name="rxt-engine-generate", daemon=True),
            threading.Thread(target=run, args=(self._memory_loop,), name="rxt-engine-memory", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress and commit its memory; refuse queued turns with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        with self._cond:
            leftovers = list(self._ready) + [t for waiting in self._waiting.values() for t in waiting]
            self._ready.clear()
            self._waiting.clear()
            self._queued = 0
        for turn in leftovers:
            turn.fail(TurnFailed(503, "shutting_down", "The server is shutting down: send the message again later."))

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopping

    # --- requests -----------------------------------------------------------------------------------

    def render_query(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids `[BOS][Q] text [A]` of a user message; `TurnFailed(422)` when empty or too long.

        `max_tokens` caps the query (e.g. the server's per-query limit); the model's interaction length
        always caps query + answer.
        """
        if not isinstance(text, str) or not text.strip():
            raise TurnFailed(422, "empty_message", "The message is empty: send some text.")
        ids = render_interaction(self.tokenizer, text)
        if max_tokens is not None and max_tokens < self.max_query_tokens:
            limit, reason = max_tokens, f"max_query_tokens={max_tokens}"
        else:
            limit = self.max_query_tokens
            reason = (
                f"interaction length {self.model.config.max_position_embeddings} - max_new_tokens="
                f"{self.config.max_new_tokens}"
            )
        if len(ids) > limit:
            raise TurnFailed(
                422,
                "query_too_long",
                f"The message has {len(ids)} tokens with its template, more than the limit of {limit} ({reason}): "
                "shorten it.",
            )
        return ids

    @property
    def max_query_tokens(self) -> int:
        """The longest query that leaves room for a full answer in one interaction."""
        return max(1, self.model.config.max_position_embeddings - self.config.max_new_tokens)

    def submit(self, turn: Turn) -> None:
        """Queue a turn behind its conversation's turn in flight (if any); events go to `turn.sink`.

        Raises `TurnFailed(503)` when the engine is stopping or `max_queued_messages` are waiting.
        """
        if not 1 <= turn.max_new_tokens <= self.config.max_new_tokens:
            raise TurnFailed(
                422,
                "invalid_max_new_tokens",
                f"max_new_tokens={turn.max_new_tokens} is out of range: use 1..{self.config.max_new_tokens}.",
            )
        with self._cond:
            if self._stopping or not self._threads:
                raise TurnFailed(503, "shutting_down", "The engine is not running: send the message again later.")
            if self._queued >= self.config.max_queued_messages:
                raise TurnFailed(
                    503,
                    "overloaded",
                    f"{self._queued} messages are already waiting (max_queued_messages="
                    f"{self.config.max_queued_messages}): retry shortly.",
                )
            self._queued += 1
            waiting = self._waiting.get(turn.conversation_id)
            turn.emit("queued", conversation_id=turn.conversation_id, behind=len(waiting) + 1 if waiting is not None else 0)
            if waiting is None:
                self._waiting[turn.conversation_id] = deque()
                self._ready.append(turn)
                self._cond.notify_all()
            else:
                waiting.append(turn)

    def busy(self, conversation_id: str) -> bool:
        """Whether the conversation has a turn in flight or queued."""
        with self._cond:
            return conversation_id in self._waiting

    def queue_depth(self) -> int:
        with self._cond:
            return self._queued

    def active_conversations(self) -> int:
        with self._cond:
            return len(self._waiting)

    # --- scheduling ---------------------------------------------------------------------------------

    def _release(self, turn: Turn) -> None:
        """The turn is over: start the conversation's next queued turn (skipping cancelled ones)."""
        with self._cond:
            self._updating.discard(turn.conversation_id)
            self._cond.notify_all()
            waiting = self._waiting.get(turn.conversation_id)
            while waiting:
                following = waiting.popleft()
                if not following.cancelled:
                    self._ready.append(following)
                    return
                self._queued -= 1
            self._waiting.pop(turn.conversation_id, None)

    def _returning(self) -> int:
        """Conversations whose memory update is running and whose next turn already waits for it."""
        return sum(1 for conversation_id in self._updating if self._waiting.get(conversation_id))

    def _next_batch(self) -> list[Turn] | None:
        """Wait for ready turns, give others `max_wait_ms` to join, take up to `max_batch_size` with equal
        sampling settings (FIFO). None when stopping."""
        config = self.config
        with self._cond:  # a re-entrant lock: `_release` may run inside
            batch: list[Turn] = []
            while not batch:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                deadline = time.monotonic() + config.max_wait_ms / 1000
                while len(self._ready) < config.max_batch_size and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                # Conversations of the previous batch whose next message waits for their memory update join this
                # batch instead of forming a small one of their own (without this, concurrent conversations
                # split into groups that take turns with half-full batches).
                while len(self._ready) < config.max_batch_size and self._returning() and not self._stopping:
                    self._cond.wait()
                ready, self._ready = self._ready, deque()
                for turn in ready:
                    if turn.cancelled:  # its caller left before it started
                        self._queued -= 1
                        self._release(turn)
                    elif len(batch) < config.max_batch_size and (not batch or turn.sampling == batch[0].sampling):
                        self._queued -= 1
                        turn.started = True
                        batch.append(turn)
                    else:
                        self._ready.append(turn)
            return batch

    # --- phase 1: batched generation ----------------------------------------------------------------

    def _generation_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            turns, stored = self._read_memory(batch)
            if not turns:
                continue
            try:
                job = self._generate(turns, stored)
            except Exception as error:  # a model error fails this batch, not the engine
                logger.exception("batched generation failed")
                for turn in turns:
                    self._finish(turn, TurnFailed(500, "generation_failed", f"Generation failed ({type(error).__name__}): see the server log."))
                continue
            with self._cond:
                self._updating.update(turn.conversation_id for turn in turns)
            self._updates.put(job)
        self._updates.put(None)

    def _read_memory(self, turns: list[Turn]):
        """Each turn's stored STM; turns whose conversation cannot be read fail alone."""
        kept, stored = [], []
        for turn in turns:
            try:
                memory = self.store.get(turn.conversation_id)
            except ConversationNotFound:
                self._finish(turn, TurnFailed(404, "not_found", f"Conversation {turn.conversation_id!r} was deleted."))
                continue
            except IncompatibleMemory as error:
                differences = "; ".join(error.differences) or str(error)
                message = f"Conversation {turn.conversation_id!r} was saved by a different model ({differences})."
                self._finish(turn, TurnFailed(409, "incompatible_memory", message))
                continue
            except Exception:
                logger.exception("reading conversation %s failed", turn.conversation_id)
                self._finish(turn, TurnFailed(500, "store_error", "Reading the conversation failed: see the server log."))
                continue
            kept.append(turn)
            stored.append(memory)
        return kept, stored

    def _generate(self, turns: list[Turn], stored: list) -> _UpdateJob:
        model, config = self.model, self.model.config
        device = model.device
        now = time.perf_counter()
        with self._cond:
            self.stats.queue_wait_seconds_total += sum(now - turn.submitted_at for turn in turns)
        for turn in turns:
            turn.emit("start", batch_size=len(turns))
        query_ids, query_mask = pad_rows([t.query_ids for t in turns], config.pad_token_id, side="left", device=device)
        stm_state = torch.cat([m.stm_state for m in stored]).to(device=device, dtype=self._dtype)
        conversations = ConversationBatch(model, stm_state)  # this batch's turn: generate here, write on the memory thread
        budgets = [t.max_new_tokens for t in turns]
        streamer = BatchStreamer(turns, budgets, self.tokenizer, config.eos_token_id, config.pad_token_id)
        start = time.perf_counter()
        with torch.no_grad():
            answers = conversations.generate(
                query_ids,
                query_mask,
                max_new_tokens=max(budgets),
                stopping_criteria=StoppingCriteriaList([RowBudget(query_ids.shape[1], budgets)]),
                streamer=streamer,
                **turns[0].sampling.generate_kwargs(),
            )  # a row past its budget is padded (RowBudget), so each answer stops at its own budget
        with self._cond:  # stats are written by both engine threads
            stats = self.stats
            stats.generate_seconds_total += time.perf_counter() - start
            stats.batches_total += 1
            stats.batch_size_sum += len(turns)
            stats.max_batch_size_seen = max(stats.max_batch_size_seen, len(turns))
            stats.generated_tokens_total += sum(len(a) for a in answers)
        return _UpdateJob(
            turns=turns,
            versions=[m.version for m in stored],
            metadata=[dict(m.metadata or {}) for m in stored],
            conversations=conversations,
            answers=answers,
        )

    # --- phase 2: batched memory update and commit --------------------------------------------------

    def _memory_loop(self) -> None:
        while True:
            job = self._updates.get()
            if job is None:
                break
            try:
                self._update_memory(job)
            except Exception as error:
                logger.exception("batched memory update failed")
                for turn in job.turns:
                    self._finish(
                        turn, TurnFailed(500, "memory_update_failed", f"The memory update failed ({type(error).__name__}).")
                    )

    def _update_memory(self, job: _UpdateJob) -> None:
        for turn in job.turns:
            turn.emit("memory_update_started")
        start = time.perf_counter()
        conversations = job.conversations
        with torch.no_grad():
            new_stm = conversations.write(conversations.interactions([t.query_ids for t in job.turns], job.answers))
        new_stm = new_stm.detach().to("cpu")
        with self._cond:
            self.stats.memory_update_seconds_total += time.perf_counter() - start
            self.stats.memory_updates_total += 1
        for row, turn in enumerate(job.turns):
            metadata = {**job.metadata[row], "turns": str(int(job.metadata[row].get("turns", "0")) + 1)}
            try:
                saved = self.store.replace(
                    turn.conversation_id, new_stm[row : row + 1].clone(), expected_version=job.versions[row],
                    metadata=metadata,
                )
            except VersionConflict as error:
                with self._cond:
                    self.stats.version_conflicts_total += 1
                message = (
                    f"Conversation {turn.conversation_id!r} was changed by another writer (version "
                    f"{error.current_version}, this turn read {error.expected_version}): the answer was not written "
                    "to memory; send the message again."
                )
                self._finish(turn, TurnFailed(409, "version_conflict", message))
                continue
            except ConversationNotFound:
                self._finish(
                    turn, TurnFailed(404, "not_found", f"Conversation {turn.conversation_id!r} was deleted meanwhile.")
                )
                continue
            except Exception:
                logger.exception("committing conversation %s failed", turn.conversation_id)
                self._finish(turn, TurnFailed(500, "store_error", "Saving the new memory failed: see the server log."))
                continue
            self._finish(turn, version=saved.version, turns=int(metadata["turns"]))

    def _finish(self, turn: Turn, error: TurnFailed | None = None, **data) -> None:
        """The last event of a turn, then the conversation's next turn may start."""
        with self._cond:
            if error is None:
                self.stats.messages_total += 1
            else:
                self.stats.messages_failed += 1
        if error is None:
            turn.emit("memory_updated", **data)
        else:
            turn.fail(error)
        self._release(turn)
