"""Playing conversations through the Short-Term Memory: RxT's one turn loop.

A turn of an RxT conversation has two phases. The decoder reads the conversation's STM and either scores a given
interaction `[BOS][Q] query [A] answer [EOS]` (teacher forcing: logits, per-token log-probabilities) or generates
the answer to `[BOS][Q] query [A]`; then the encoder and memory attention write the interaction into a new STM.
Everything that plays conversations does it through this module: supervised memory-aware training (SMAT), the
MRL and RxRLHF rollouts and scoring, `evaluate_memory`, `RxTChat` / `interact` and the serving engine.

- [`ConversationBatch`] holds the STMs `[B, L, S, D]` of a batch of conversations and runs the two phases:
  `read` (teacher-forced decoder pass), `generate` (answers) and `write` (memory update). Rows of a phase are the
  conversations that take part in it (`rows`); the others keep their STM exactly (a conversation shorter than the
  batch's longest, or a padded turn). When every row takes part the batch tensors are used as they are, so the
  result is the one of a hand-written batched loop. `backprop_turns` truncates back-propagation through the
  memory (the STM is detached before the update of every turn `k` with `k % backprop_turns == 0`); `stateless`
  rows never write (a no-memory control reads its initial STM at every turn).
- [`ConversationBatch.play`] plays whole conversations turn by turn and yields one [`ConversationTurn`] per turn:
  which rows were scored, the STMs before / after, and only the outputs asked for (`return_logits`,
  `return_logps`, `return_entropy`; generated `answers` when `queries` are given). Iterate it to drop a turn's
  logits before the next turn runs; `play_conversations` returns the list.
- `token_log_probs` / `token_entropies`: per-token log-probabilities / entropies from logits in chunks of rows
  (plain torch, so this remote-code file does not need TRL; the trainers may use TRL's `selective_log_softmax`).

Chat and serving play one turn per call (`generate`, then `write`): a chat's next query is not known before its
answer is read, and the serving engine regroups conversations every turn (continuous batching: a batch is
whichever conversations have a message ready, its memory update runs on another thread while the next batch
generates), so neither can hand a whole conversation to `play`; both use the same `ConversationBatch` phases.

Example (a runnable doctest: two conversations, the second one turn shorter):

```python
>>> import torch
>>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, play_conversations
>>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=64)).eval()
>>> chats = [  # [BOS][Q] query [A] answer [EOS] per turn; conversation 1 has one turn less
...     [[0, 5, 10, 11, 6, 12, 1], [0, 5, 13, 6, 14, 15, 1]],
...     [[0, 5, 16, 6, 17, 1]],
... ]
>>> with torch.no_grad():
...     turns = play_conversations(model, chats, return_logps=True, write_last_turn=True)
>>> [t.rows.tolist() for t in turns], list(turns[0].token_logps.shape)
([[0, 1], [0]], [2, 6])
>>> torch.equal(turns[1].stm_after[1], turns[0].stm_after[1])  # conversation 1 had no turn 1: memory kept
True
>>> with torch.no_grad():  # generated answers: queries only, the answers are written into memory
...     turns = play_conversations(model, queries=[[[0, 5, 10, 6]], [[0, 5, 16, 6]]],
...                                generate_kwargs={"max_new_tokens": 3, "do_sample": False})
>>> len(turns[0].answers), turns[0].answers[0][-1] == model.config.eos_token_id
(2, True)

```

This file is part of the remote-code folder: it imports only torch, the standard library and its sibling
`format_rxt.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .format_rxt import pad_rows

__all__ = [
    "ConversationBatch",
    "ConversationTurn",
    "DecoderPass",
    "close_answer",
    "play_conversations",
    "token_entropies",
    "token_log_probs",
]

MEMORY_SOURCES = ("input", "generated")


# ------------------------------------------------------------------------------------------------------
# per-token scores


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """`log softmax(logits)[..., targets]` `[n, T]` from logits `[n, T, V]`, in float32, `chunk_rows` rows at a time
    (one `[chunk_rows, T, V]` log-softmax alive instead of the whole batch's)."""
    pieces = [
        rows.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        for rows, ids in zip(logits.split(chunk_rows), targets.split(chunk_rows))
    ]
    return torch.cat(pieces) if pieces else logits.new_zeros(targets.shape, dtype=torch.float32)


def token_entropies(logits: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """Entropy of each position's next-token distribution `[n, T]` from logits `[n, T, V]` (float32, chunked)."""
    pieces = []
    for rows in logits.split(chunk_rows):
        logp = rows.float().log_softmax(-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(pieces) if pieces else logits.new_zeros(logits.shape[:-1], dtype=torch.float32)


def close_answer(tokens: Sequence[int], eos_token_id: int, pad_token_id: int | None = None) -> list[int]:
    """A generated answer as it is written into memory: the tokens before the first `[EOS]` without trailing padding
    (a row that stopped early is padded), closed with one `[EOS]`."""
    answer = []
    for token in tokens:
        if int(token) == eos_token_id:
            break
        answer.append(int(token))
    while answer and answer[-1] == pad_token_id:
        answer.pop()
    return answer + [eos_token_id]


# ------------------------------------------------------------------------------------------------------
# results


@dataclass
class DecoderPass:
    """What one teacher-forced decoder pass returns (each field only when asked for).

    `logits` `[n, T, V]`; `token_logps` / `entropies` `[n, T - 1]`: position `j` scores token `j + 1` given tokens
    `<= j` (float32, logits divided by `temperature` first); `aux_loss`: the MoE load-balancing loss of the pass."""

    logits: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class ConversationTurn:
    """Turn `turn` of [`ConversationBatch.play`].

    Per-row fields follow `rows` (`[n]`, the conversations scored at this turn, ascending). `stm_before` /
    `stm_after` are the whole batch's STMs `[B, L, S, D]` read by / written after this turn (rows that did not
    write keep theirs); `written` `[m]` are the rows whose memory this turn updated. `input_ids` /
    `attention_mask` `[n, T]` are the teacher-forced decoder input; `logits`, `token_logps`, `entropies`,
    `aux_loss` as in [`DecoderPass`]; `answers` the generated answers (`[EOS]`-closed id lists) of the rows."""

    turn: int
    rows: torch.Tensor
    stm_before: torch.Tensor | None = None
    stm_after: torch.Tensor | None = None
    written: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    answers: list[list[int]] | None = None


# ------------------------------------------------------------------------------------------------------
# turn inputs: a [B, N, T] tensor (with its mask) or ragged lists [B][N_b] of id lists


def _is_tensor_grid(value) -> bool:
    return isinstance(value, torch.Tensor)


def _grid_shape(value, name: str) -> tuple[int, int]:
    if _is_tensor_grid(value):
        if value.dim() != 3:
            raise ValueError(f"{name} must be [batch, turns, length], got shape {list(value.shape)}.")
        return value.shape[0], value.shape[1]
    if not isinstance(value, Sequence) or not value or any(not isinstance(row, Sequence) for row in value):
        raise ValueError(
            f"{name} must be a [batch, turns, length] tensor or a list (one per conversation) of lists of token id "
            f"lists, got {type(value).__name__}."
        )
    return len(value), max(len(row) for row in value)


def _grid_present(value, mask) -> torch.Tensor:
    """[B, N] bool: which turns a grid holds (a non-empty list, or any unmasked token of a tensor row)."""
    if _is_tensor_grid(value):
        return (mask.sum(-1) > 0) if mask is not None else torch.ones(value.shape[:2], dtype=torch.bool)
    size, turns = _grid_shape(value, "turns")
    return torch.tensor([[k < len(row) and row[k] is not None and len(row[k]) > 0 for k in range(turns)]
                         for row in value], dtype=torch.bool).reshape(size, turns)


def _turn_rows(value, mask, k: int, rows: torch.Tensor, everyone: bool, pad_id: int, side: str, device):
    """Turn `k` of the rows `rows` of a grid as padded `(ids [n, T], mask [n, T])` (tensor grids are sliced)."""
    if _is_tensor_grid(value):
        ids = value[:, k] if everyone else value[rows, k]
        if mask is None:
            return ids, torch.ones_like(ids)
        return ids, (mask[:, k] if everyone else mask[rows, k])
    return pad_rows([value[r][k] for r in rows.tolist()], pad_id, side=side, device=device)


# ------------------------------------------------------------------------------------------------------
# the batch of conversations


class ConversationBatch:
    """The STMs of a batch of conversations and the two phases of a turn (see the module docstring).

    Args:
        model: an `RxTForCausalLM` (or a wrapper with its `init_memory` / `update_memory` / `config`, e.g. PEFT).
        stm_state: the initial STMs `[B, L, S, D]` (or `[1, ...]`, broadcast); default `model.init_memory(batch_size)`.
        batch_size: the number of conversations when `stm_state` is not given.
        backprop_turns: truncated back-propagation through turns: the STM is detached before the memory update of
            every turn `k` with `k % backprop_turns == 0` (1: a loss reaches only the update just before it).
            None: gradients flow through every update.
        stateless: `[B]` bool, rows that never write (they read their initial STM at every turn).
        memory_group: `[B]` ids; rows with one id hold one STM and write one interaction (e.g. the G rollouts of
            a conversation writing its reference answers), so the update is computed once per group.
        forward_model: runs the decoder pass (default `model`; e.g. a trainer's prepared wrapper).
    """

    def __init__(
        self,
        model,
        stm_state: torch.Tensor | None = None,
        batch_size: int | None = None,
        *,
        backprop_turns: int | None = None,
        stateless: torch.Tensor | None = None,
        memory_group: torch.Tensor | None = None,
        forward_model=None,
    ):
        if backprop_turns is not None and (
            isinstance(backprop_turns, bool) or not isinstance(backprop_turns, int) or backprop_turns < 1
        ):
            raise ValueError(f"backprop_turns={backprop_turns!r} must be None or an int >= 1.")
        self.model = model
        self.forward_model = forward_model or model
        self.config = model.config
        if stm_state is None:
            if batch_size is None:
                raise ValueError("ConversationBatch needs stm_state=[B, L, S, D] or batch_size=B.")
            stm_state = model.init_memory(batch_size)
        elif batch_size is not None and stm_state.shape[0] != batch_size:
            if stm_state.shape[0] != 1:
                raise ValueError(
                    f"stm_state holds {stm_state.shape[0]} conversations, batch_size={batch_size}: pass one STM per "
                    "conversation, or a single one [1, L, S, D] to start every conversation from it."
                )
            stm_state = stm_state.expand(batch_size, *stm_state.shape[1:])
        self.stm = stm_state  # [B, L, S, D]
        self.initial_stm = stm_state
        self.backprop_turns = backprop_turns
        self.stateless = self._row_flags(stateless, "stateless")
        self.memory_group = None if memory_group is None else torch.as_tensor(memory_group, device=self.stm.device)
        self.turns_written = 0

    @property
    def batch_size(self) -> int:
        return self.stm.shape[0]

    @property
    def device(self) -> torch.device:
        return self.stm.device

    def _row_flags(self, flags, name: str) -> torch.Tensor | None:
        if flags is None:
            return None
        flags = torch.as_tensor(flags, dtype=torch.bool, device=self.stm.device).reshape(-1)
        if flags.numel() != self.batch_size:
            raise ValueError(f"{name} has {flags.numel()} entries for a batch of {self.batch_size} conversations.")
        return flags

    def _rows(self, rows) -> tuple[torch.Tensor, bool]:
        """`(rows [n] long, every row in order)`; `rows` is None (all), a `[B]` bool mask or indices."""
        if rows is None:
            return torch.arange(self.batch_size, device=self.device), True
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            if rows.numel() != self.batch_size:
                raise ValueError(f"rows is a mask of {rows.numel()} entries for a batch of {self.batch_size}.")
            rows = rows.nonzero().squeeze(1)
        rows = rows.long().reshape(-1)
        everyone = rows.numel() == self.batch_size and bool((rows == torch.arange(self.batch_size, device=self.device)).all())
        return rows, everyone

    def memory_of(self, rows=None) -> torch.Tensor:
        """The STMs `[n, L, S, D]` of `rows` (all rows: the batch's STM itself)."""
        rows, everyone = self._rows(rows)
        return self.stm if everyone else self.stm[rows]

    # --- phase 1: the decoder reads the STM ---------------------------------------------------------------

    def read(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows=None,
        *,
        return_logits: bool = False,
        return_logps: bool = False,
        return_entropy: bool = False,
        temperature: float = 1.0,
        stm_state: torch.Tensor | None = None,
    ) -> DecoderPass:
        """Teacher-forced decoder pass over `input_ids` `[n, T]` (one interaction per row of `rows`) reading their
        STMs (or `stm_state` `[n, L, S, D]`, e.g. an STM repeated for two answers of each row)."""
        memory = self.memory_of(rows) if stm_state is None else stm_state
        out = self.forward_model(input_ids=input_ids, attention_mask=attention_mask, stm_state=memory, use_cache=False)
        logits = out.logits  # [n, T, V]
        result = DecoderPass(aux_loss=getattr(out, "aux_loss", None))
        if return_logits:
            result.logits = logits
        if return_logps or return_entropy:
            shifted = logits[:, :-1]
            if temperature != 1.0:
                shifted = shifted.float() / temperature
            if return_logps:
                result.token_logps = token_log_probs(shifted, input_ids[:, 1:])
            if return_entropy:
                result.entropies = token_entropies(shifted)
        return result

    def generate(
        self,
        prompts,
        attention_mask: torch.Tensor | None = None,
        rows=None,
        *,
        generate_fn: Callable | None = None,
        **generate_kwargs,
    ) -> list[list[int]]:
        """Answers of `rows` to `prompts` (`[BOS][Q] query [A]`: id lists, left-padded here, or a left-padded `[n, T]`
        tensor with `attention_mask`), each closed with `[EOS]` (`close_answer`). `generate_fn(model, input_ids,
        attention_mask, stm_state, **generate_kwargs)` replaces `model.generate` (oracles, tests); it returns
        sequences (prompt + new tokens)."""
        config = self.config
        if isinstance(prompts, torch.Tensor):
            prompt_ids = prompts.to(self.device)
            prompt_mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask.to(self.device)
        else:
            prompt_ids, prompt_mask = pad_rows(prompts, config.pad_token_id, side="left", device=self.device)
        generate_kwargs.setdefault("pad_token_id", config.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", config.eos_token_id)
        memory = self.memory_of(rows)
        if generate_fn is None:
            sequences = self.model.generate(prompt_ids, attention_mask=prompt_mask, stm_state=memory, **generate_kwargs)
        else:
            sequences = generate_fn(self.model, prompt_ids, prompt_mask, memory, **generate_kwargs)
        new_tokens = sequences[:, prompt_ids.shape[1]:].tolist()
        return [close_answer(row, config.eos_token_id, config.pad_token_id) for row in new_tokens]

    # --- phase 2: the interaction is written into the STM ---------------------------------------------------

    def write(self, interactions, attention_mask: torch.Tensor | None = None, rows=None, turn: int | None = None) -> torch.Tensor:
        """Write one interaction per row of `rows` (id lists, right-padded here, or a `[n, T]` tensor with
        `attention_mask`) into their STMs; other rows and `stateless` rows keep theirs. `turn` (default: the
        number of writes so far) decides the `backprop_turns` detach. Returns the batch's new STM `[B, L, S, D]`."""
        rows, everyone = self._rows(rows)
        if self.stateless is not None:
            keep = ~self.stateless[rows]
            if not bool(keep.all()):
                rows, everyone = rows[keep], False
                if isinstance(interactions, torch.Tensor):
                    interactions = interactions[keep]
                    attention_mask = None if attention_mask is None else attention_mask[keep]
                else:
                    interactions = [row for row, kept in zip(interactions, keep.tolist()) if kept]
        if isinstance(interactions, torch.Tensor):
            ids = interactions
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        else:
            ids, mask = pad_rows(interactions, self.config.pad_token_id, device=self.device)
        turn = self.turns_written if turn is None else turn
        self.turns_written = turn + 1
        if rows.numel() == 0:
            return self.stm
        if self.backprop_turns is not None and turn % self.backprop_turns == 0:
            self.stm = self.stm.detach()  # truncated back-propagation: at most `backprop_turns` updates per path
        memory = self.stm if everyone else self.stm[rows]
        if self.memory_group is not None:
            new = self._grouped_update(memory, ids, mask, self.memory_group[rows])
        else:
            new = self.model.update_memory(memory, ids, mask)  # [n, L, S, D]
        new = new.to(self.stm.dtype)
        self.stm = new if everyone else self.stm.index_copy(0, rows, new)
        return self.stm

    def _grouped_update(self, memory, ids, mask, group) -> torch.Tensor:
        """`update_memory` once per group (its first row), copied to the group's other rows."""
        _, inverse = torch.unique(group, return_inverse=True)  # [n]
        first = torch.full((int(inverse.max()) + 1,), len(group), device=group.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(group), device=group.device), reduce="amin")
        if first.numel() == len(group):
            return self.model.update_memory(memory, ids, mask)
        return self.model.update_memory(memory[first], ids[first], mask[first])[inverse]

    def interactions(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     max_length: int | None = None) -> list[list[int]]:
        """`[BOS][Q] query [A] answer [EOS]` per row from prompts (id lists, padding removed) and answers, cut to
        `max_length` (default the model's interaction length)."""
        limit = max_length or self.config.max_position_embeddings
        return [(list(p) + list(a))[:limit] for p, a in zip(prompts, answers)]

    # --- whole conversations ---------------------------------------------------------------------------------

    def play(
        self,
        input_ids=None,
        attention_mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
        *,
        queries=None,
        scored: torch.Tensor | None = None,
        memory_from: str | None = None,
        memory_ids=None,
        memory_mask: torch.Tensor | None = None,
        write_last_turn: bool = False,
        return_logits: bool = False,
        return_logps: bool = False,
        return_entropy: bool = False,
        return_stm: bool = True,
        temperature: float = 1.0,
        generate_fn: Callable | None = None,
        generate_kwargs: dict | None = None,
    ) -> Iterator[ConversationTurn]:
        """Play the conversations turn by turn, yielding a [`ConversationTurn`] after each turn's memory update.

        Args:
            input_ids: teacher-forced interactions `[BOS][Q] query [A] answer [EOS]`: a `[B, N, T]` tensor (with
                `attention_mask`) or lists `[B][N_b]` of id lists (conversations may differ in length). The decoder
                reads them (logits / log-probs) and, with `memory_from="input"`, they are written into memory.
            present: `[B, N]` bool, the turns each conversation has; default: the turns of `input_ids` (or
                `queries`) that hold tokens. A padded turn leaves its row's STM unchanged.
            queries: prompts `[BOS][Q] query [A]`, lists `[B][N_b]` of id lists: the model generates answers for
                the scored turns (`generate_kwargs` go to `generate`, or `generate_fn` replaces it).
            scored: `[B, N]` bool, the turns the decoder runs on (teacher forcing and / or generation); default
                `present`. Rows present but not scored at a turn still write their interaction.
            memory_from: `"input"` (the default with `input_ids`) writes `memory_ids` (default `input_ids`);
                `"generated"` (the default with `queries` alone) writes the query and
                the generated answer of the rows that generated at that turn, `memory_ids` / `input_ids` for the
                other present rows.
            write_last_turn: also write each conversation's last turn (the chat's final state); by default a row
                writes only when a later turn of it will read the memory.
            return_logits / return_logps / return_entropy / temperature: what each turn's decoder pass returns
                (see [`DecoderPass`]); none of them and no `queries`: the turns only write memory.
            return_stm: put `stm_before` / `stm_after` into the turns.
        """
        if memory_from is None:
            memory_from = "generated" if input_ids is None and memory_ids is None else "input"
        if memory_from not in MEMORY_SOURCES:
            raise ValueError(f"memory_from={memory_from!r}: choose one of {MEMORY_SOURCES}.")
        if input_ids is None and queries is None:
            raise ValueError("play() needs input_ids (teacher-forced interactions) or queries (to generate answers).")
        if isinstance(queries, torch.Tensor):
            raise TypeError("queries must be lists [B][N_b] of prompt id lists (no padding), not a tensor; e.g. "
                            "[[row[m.bool()].tolist() for row, m in zip(ids, mask)] for ids, mask in ...].")
        if memory_ids is None:
            memory_ids, memory_mask = input_ids, attention_mask
        if memory_from == "input" and memory_ids is None:
            raise ValueError("memory_from='input' needs input_ids or memory_ids; pass memory_from='generated' to "
                             "write the generated answers.")
        grid = input_ids if input_ids is not None else queries
        size, turns = _grid_shape(grid, "input_ids" if input_ids is not None else "queries")
        if size != self.batch_size:
            raise ValueError(f"the conversations are a batch of {size}, the STM a batch of {self.batch_size}.")
        if present is None:
            present = _grid_present(grid, attention_mask if input_ids is not None else None)
        present = torch.as_tensor(present, dtype=torch.bool).cpu()
        if tuple(present.shape) != (size, turns):
            raise ValueError(f"present has shape {list(present.shape)}, expected [{size}, {turns}].")
        if scored is not None:
            scored = torch.as_tensor(scored, dtype=torch.bool).cpu()
            if tuple(scored.shape) != (size, turns):
                raise ValueError(f"scored has shape {list(scored.shape)}, expected [{size}, {turns}].")
        scored = present if scored is None else scored & present
        decode = return_logits or return_logps or return_entropy
        if decode and input_ids is None:
            raise ValueError("return_logits / return_logps / return_entropy need teacher-forced input_ids.")
        later = present.long().flip(1).cummax(1).values.flip(1)  # [B, N] 1 where the row has a turn >= k
        has_later = torch.zeros_like(present)
        has_later[:, :-1] = later[:, 1:].bool()  # [B, N] the row has a turn after k
        pad_id = self.config.pad_token_id
        for k in range(turns):
            rows_k = scored[:, k].nonzero().squeeze(1).to(self.device)
            result = ConversationTurn(turn=k, rows=rows_k, stm_before=self.stm if return_stm else None)
            everyone = rows_k.numel() == size
            if rows_k.numel() and decode:
                ids, mask = _turn_rows(input_ids, attention_mask, k, rows_k, everyone, pad_id, "right", self.device)
                out = self.read(ids, mask, None if everyone else rows_k, return_logits=return_logits,
                                return_logps=return_logps, return_entropy=return_entropy, temperature=temperature)
                result.input_ids, result.attention_mask = ids, mask
                result.logits, result.token_logps, result.entropies = out.logits, out.token_logps, out.entropies
                result.aux_loss = out.aux_loss
            prompts = None
            if rows_k.numel() and queries is not None:
                prompts = [queries[r][k] for r in rows_k.tolist()]
                result.answers = self.generate(prompts, rows=None if everyone else rows_k, generate_fn=generate_fn,
                                               **dict(generate_kwargs or {}))
            writers = present[:, k] & (has_later[:, k] | write_last_turn)  # [B]
            if bool(writers.any()):
                result.written = self._write_turn(k, writers, rows_k, prompts, result.answers, memory_from,
                                                  memory_ids, memory_mask)
            if return_stm:
                result.stm_after = self.stm
            yield result

    def _write_turn(self, k, writers, scored_rows, prompts, answers, memory_from, memory_ids, memory_mask):
        """Turn `k`'s memory update of the rows `writers` [B]; returns their indices."""
        rows = writers.nonzero().squeeze(1).to(self.device)
        generated = {}
        if memory_from == "generated" and answers is not None:
            generated = dict(zip(scored_rows.tolist(), self.interactions(prompts, answers)))
        given = [r for r in rows.tolist() if r not in generated]
        if given and memory_ids is None:
            raise ValueError(
                f"turn {k}: conversations {given} write memory but generated no answer (not scored) and no "
                "memory_ids / input_ids give their interaction; pass input_ids or memory_ids, or score those turns."
            )
        pad_id = self.config.pad_token_id
        if not generated:  # the given interactions of every writer (a tensor grid is sliced, not re-padded)
            everyone = rows.numel() == self.batch_size
            ids, mask = _turn_rows(memory_ids, memory_mask, k, rows, everyone, pad_id, "right", self.device)
            self.write(ids, mask, rows=None if everyone else rows, turn=k)
            return rows
        interactions = dict(generated)
        if given:
            index = torch.tensor(given, device=self.device)
            ids, mask = _turn_rows(memory_ids, memory_mask, k, index, False, pad_id, "right", self.device)
            interactions.update({r: row[m.bool()].tolist() for r, row, m in zip(given, ids.cpu(), mask.cpu())})
        self.write([interactions[r] for r in rows.tolist()], rows=rows, turn=k)
        return rows


def play_conversations(
    model,
    input_ids=None,
    attention_mask: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    *,
    stm_state: torch.Tensor | None = None,
    backprop_turns: int | None = None,
    stateless: torch.Tensor | None = None,
    memory_group: torch.Tensor | None = None,
    forward_model=None,
    **play_kwargs,
) -> list[ConversationTurn]:
    """Play a batch of conversations through the STM and return every turn (see [`ConversationBatch.play`] for the
    arguments; the batch size is that of `input_ids` or `queries`). To keep only one turn's logits alive at a time,
    iterate `ConversationBatch(...).play(...)` instead."""
    grid = input_ids if input_ids is not None else play_kwargs.get("queries")
    if grid is None:
        raise ValueError("play_conversations needs input_ids (teacher-forced interactions) or queries=...")
    size, _ = _grid_shape(grid, "input_ids" if input_ids is not None else "queries")
    batch = ConversationBatch(model, stm_state, size, backprop_turns=backprop_turns, stateless=stateless,
                              memory_group=memory_group, forward_model=forward_model)
    return list(batch.play(input_ids, attention_mask, present, **play_kwargs))
