"""Talking to an RxT model: interactions, memory files and chat sessions.

An RxT interaction has two phases. First the decoder streams the answer to one query, reading the
conversation's STM; then the encoder and memory attention write `query + answer` into a new STM. The
user has the answer before the second phase starts, so a chat session runs the memory update in the
background and makes the next message of the same conversation wait for it.

Both phases are `conversation_rxt.ConversationBatch`'s (`generate`, then `write`), the turn loop every trainer,
the evaluation and the serving engine use too.

This file is part of the remote-code folder: it imports only torch, transformers, the standard library and its
siblings `format_rxt.py` (the token, padding and STM-file formats) and `conversation_rxt.py`, never the project
itself.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from .conversation_rxt import ConversationBatch
from .format_rxt import IncrementalDetokenizer, pad_rows, render_interaction, stm_from_bytes, stm_to_bytes


@dataclass
class InteractionEvent:
    """One event of [`RxTForCausalLM.interact`]:

    - `"token"`: one generated step, `token_ids` `[batch]` (finished rows repeat the pad id); for batch 1, `text` is
      the text this token completes ("" while a character spanning several tokens is incomplete, see
      `IncrementalDetokenizer`), so the texts of the token events join to the answer;
    - `"answer"`: generation done, `answer_ids` (one list per row, ending with `[EOS]`) and `text` (list);
    - `"memory_update_start"` / `"memory_update_end"`: the latter carries the new `stm_state`.
    """

    kind: str
    token_ids: torch.Tensor | None = None
    text: str | list[str] | None = None
    answer_ids: list[list[int]] | None = None
    stm_state: torch.Tensor | None = None


class _QueueStreamer(BaseStreamer):
    """Receives generated tokens from `generate()` (running in a worker thread) for the caller to yield."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.queue.put(("token", value.reshape(-1).clone()))

    def end(self):
        self.queue.put(("end", None))


# ------------------------------------------------------------------------------------------------------
# query / interaction encoding


def render_queries(model, queries, tokenizer=None, attention_mask=None):
    """Token ids of the queries `[BOS][Q] query [A]`, left-padded: returns (input_ids, attention_mask).

    `queries` is a string, a list of strings (needs `tokenizer`), a list of id lists, or a tensor of ids.
    """
    config = model.config
    if isinstance(queries, str):
        queries = [queries]
    if isinstance(queries, torch.Tensor):
        ids = queries if queries.dim() == 2 else queries[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        rows = [row[mask.bool()].tolist() for row, mask in zip(ids, attention_mask)]
    elif isinstance(queries, Sequence) and queries and all(isinstance(q, str) for q in queries):
        if tokenizer is None:
            raise ValueError("interact(query=<text>) needs tokenizer=...: pass the model's tokenizer or token ids.")
        rows = []
        for idx, text in enumerate(queries):
            if not text.strip():
                raise ValueError(f"query[{idx}] is empty: send a non-empty message.")
            rows.append(render_interaction(tokenizer, text))
    elif isinstance(queries, Sequence) and queries and all(isinstance(q, Sequence) for q in queries):
        rows = [list(map(int, q)) for q in queries]
    else:
        raise ValueError(
            f"query must be text, a list of texts, token id lists or an id tensor; got {type(queries).__name__} "
            f"{queries!r:.80}."
        )
    for idx, row in enumerate(rows):
        content = [t for t in row if t not in (config.bos_token_id, config.query_token_id, config.answer_token_id)]
        if not content:
            raise ValueError(f"query[{idx}] is empty (only template tokens): send a non-empty message.")
        if len(row) > config.max_position_embeddings:
            raise ValueError(
                f"query[{idx}] has {len(row)} tokens, more than max_position_embeddings="
                f"{config.max_position_embeddings} (one whole interaction): shorten the query."
            )
    return pad_rows(rows, config.pad_token_id, side="left", device=model.device)


# ------------------------------------------------------------------------------------------------------
# one interaction


def stream_interaction(model, query, stm_state=None, tokenizer=None, attention_mask=None, **generate_kwargs):
    """Generator behind [`RxTForCausalLM.interact`]: token events, the answer, then the memory update."""
    query_ids, query_mask = render_queries(model, query, tokenizer, attention_mask)
    batch = query_ids.shape[0]
    stm_state = model.init_memory(batch) if stm_state is None else model.model.check_stm_state(stm_state, batch)
    config = model.config
    generate_kwargs.setdefault("max_new_tokens", config.max_position_embeddings - query_ids.shape[1])
    if generate_kwargs.get("num_beams", 1) > 1 or generate_kwargs.get("num_return_sequences", 1) > 1:
        raise ValueError("interact() streams one answer per query: use generate() for beams / num_return_sequences.")

    conversation = ConversationBatch(model, stm_state)  # one turn: generate, then write
    streamer = _QueueStreamer()
    result: dict = {}

    def run_generation():
        try:
            with torch.no_grad():
                result["answers"] = conversation.generate(query_ids, query_mask, streamer=streamer, **generate_kwargs)
        except BaseException as error:  # surfaced in the caller's thread
            result["error"] = error
            streamer.end()

    worker = threading.Thread(target=run_generation, daemon=True)
    worker.start()
    detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None and batch == 1 else None
    while True:
        kind, value = streamer.queue.get()
        if kind == "end":
            break
        text = detokenizer.add(int(value[0])) if detokenizer is not None else None  # [EOS] and [PAD] give ""
        yield InteractionEvent("token", token_ids=value, text=text)
    worker.join()
    if "error" in result:
        raise result["error"]

    answers = result["answers"]
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers] if tokenizer is not None else None
    yield InteractionEvent("answer", answer_ids=answers, text=texts)

    yield InteractionEvent("memory_update_start")
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask)]
    with torch.no_grad():
        new_stm = conversation.write(conversation.interactions(prompts, answers))
    yield InteractionEvent("memory_update_end", stm_state=new_stm)


def memory_from_prompt(model, query, answer="", tokenizer=None, stm_state=None) -> torch.Tensor:
    """An STM that has read one "system prompt" interaction; share it like a prompt (see `save_memory`)."""
    if tokenizer is None:
        raise ValueError("memory_from_prompt needs tokenizer=... to render the prompt interaction.")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"memory_from_prompt(query={query!r}): the prompt text must be a non-empty string.")
    ids = render_interaction(tokenizer, query, answer or "")
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(
            f"The prompt interaction has {len(ids)} tokens, more than max_position_embeddings="
            f"{model.config.max_position_embeddings}: shorten it."
        )
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        return model.update_memory(stm_state, input_ids)


# ------------------------------------------------------------------------------------------------------
# memory files


def save_memory(stm_state: torch.Tensor, path, config=None) -> None:
    """Write an STM `[batch, layers, slots, dim]` to a safetensors file (the one STM format, see
    `format_rxt.stm_to_bytes`: the serving store and the server's `/memory` download use it too). `config` is
    accepted for compatibility; the geometry is the tensor's own."""
    Path(path).write_bytes(stm_to_bytes(stm_state))


def load_memory(path, model) -> torch.Tensor:
    """Read an STM file (from `save_memory`, `RxTChat.save`, the server's `/memory` download, or an earlier release's
    `save_memory`), checked against `model`'s memory geometry and moved to its device and dtype."""
    try:
        state, _ = stm_from_bytes(Path(path).read_bytes())
    except ValueError as error:
        raise ValueError(
            f"The memory file {path} is not an RxT memory state: {error}. Fix: pass a file written by "
            "model.save_memory / RxTChat.save or downloaded from the server's /v1/conversations/<id>/memory."
        ) from None
    if tuple(state.shape[1:]) != tuple(model.config.stm_shape):
        (layers, slots, dim), (want_layers, want_slots, want_dim) = state.shape[1:], model.config.stm_shape
        raise ValueError(
            f"The memory file {path} holds an STM of {layers} layers x {slots} slots x {dim} dims, this model needs "
            f"{want_layers} layers x {want_slots} slots x {want_dim} dims: use a memory state saved from a model with "
            "the same STM geometry."
        )
    dtype = model.model.embed_tokens.weight.dtype
    return state.to(device=model.device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# chat sessions


class RxTChat:
    """One conversation with an RxT model: keeps its STM, updates memory in the background.

    `send(text)` returns the answer as soon as it is generated; the memory update then runs in a
    background thread and the next `send` / `stream` / `memory` of this conversation waits for it.
    Many `RxTChat` objects can share one model (the model holds no conversation state).

    ```python
    >>> chat = RxTChat(model, tokenizer, system_prompt="You are a helpful assistant.")
    >>> chat.send("My cat is called Tom.")
    >>> chat.send("What is my cat called?")
    ```

    `on_event(kind)` (optional) is called with "answer_ready", "memory_update_started", "memory_updated".
    """

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str | tuple[str, str] | None = None,
        stm_state: torch.Tensor | None = None,
        on_event: Callable[[str], None] | None = None,
        **generate_kwargs,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.on_event = on_event
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}
        self._pending: threading.Thread | None = None
        self._update_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stm = stm_state if stm_state is not None else self._initial_memory()

    def _initial_memory(self) -> torch.Tensor:
        if self.system_prompt is None:
            with torch.no_grad():
                return self.model.init_memory(1)
        query, answer = (self.system_prompt, "") if isinstance(self.system_prompt, str) else self.system_prompt
        return memory_from_prompt(self.model, query, answer, self.tokenizer)

    def _emit(self, kind: str):
        if self.on_event is not None:
            self.on_event(kind)

    def wait(self) -> None:
        """Block until this conversation's pending memory update has finished."""
        pending = self._pending
        if pending is not None:
            pending.join()
            self._pending = None
        if self._update_error is not None:
            error, self._update_error = self._update_error, None
            raise RuntimeError("the background memory update failed") from error

    @property
    def memory(self) -> torch.Tensor:
        """The conversation's STM `[1, layers, slots, dim]` after every message so far."""
        self.wait()
        return self._stm

    @property
    def updating(self) -> bool:
        return self._pending is not None and self._pending.is_alive()

    def stream(self, text: str, **generate_kwargs) -> Iterator[str]:
        """Yield the answer piece by piece; the memory update starts in the background once it is complete."""
        with self._lock:
            self.wait()
            events = self.model.interact(
                text, stm_state=self._stm, tokenizer=self.tokenizer, **{**self.generate_kwargs, **generate_kwargs}
            )
            for event in events:
                if event.kind == "token":
                    if event.text:  # pieces of whole characters (see IncrementalDetokenizer)
                        yield event.text
                elif event.kind == "answer":
                    self.last_answer = event.text[0]
                    self._emit("answer_ready")
                    break
            self._pending = threading.Thread(target=self._finish_update, args=(events,), daemon=True)
            self._pending.start()

    def _finish_update(self, events):
        try:
            for event in events:
                if event.kind == "memory_update_start":
                    self._emit("memory_update_started")
                elif event.kind == "memory_update_end":
                    self._stm = event.stm_state
            self._emit("memory_updated")
        except BaseException as error:
            self._update_error = error

    def send(self, text: str, **generate_kwargs) -> str:
        """The whole answer to `text` (the memory update keeps running in the background)."""
        for _ in self.stream(text, **generate_kwargs):
            pass
        return self.last_answer

    def reset(self) -> None:
        """Forget the conversation (back to the initial / system-prompt memory)."""
        self.wait()
        self._stm = self._initial_memory()

    def save(self, path) -> None:
        save_memory(self.memory, path, self.model.config)

    def load(self, path) -> None:
        self.wait()
        self._stm = load_memory(path, self.model)
