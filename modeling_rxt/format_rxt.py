"""RxT's formats in one place: special tokens, the interaction template, padding, streamed text and STM files.

Every other part of the project (the model's `interact` and `RxTChat`, the trainers' collators and rollouts,
evaluation, the serving engine and its STM store) reads and writes these formats through this module, so there is
one definition of each:

- **Special tokens** `[BOS] [EOS] [PAD] [UNK] [MASK] [Q] [A] [T]` (ids 0..7 in tokenizers built by
  `build_tokenizer`) and `special_token_ids(tokenizer)`, which returns their ids under `RxTConfig`'s field names.
- **The interaction template** `[BOS][Q] query [A] answer [EOS]` (`[BOS][Q] query [T] thinking [A] answer [EOS]`
  with reasoning): `frame_interaction` frames token ids (with the truncation rule of training data),
  `encode_interaction` / `decode_interaction` go from texts to ids and back, and `RXT_CHAT_TEMPLATE` is the same
  template for `tokenizer.apply_chat_template` (`render_interaction` applies it). One interaction per sequence:
  earlier turns live in the Short-Term Memory, unlike a Llama chat prompt that flattens the whole history.
- **Padding**: `pad_rows` pads lists of ids on either side and returns the attention mask; labels are padded with
  `IGNORE_INDEX` (-100, what `torch.nn.functional.cross_entropy` and transformers' losses skip).
- **Streamed text**: `IncrementalDetokenizer` turns generated ids into text pieces, holding back an incomplete
  UTF-8 character (byte-level BPE splits "é" or "日" over several tokens) until its last byte arrives.
- **STM files**: `stm_to_bytes` / `stm_from_bytes` write and read a memory state `[batch, layers, slots, dim]` as
  safetensors with the geometry in the metadata. `save_memory` / `load_memory`, `RxTChat.save` / `load`, the serving
  store's rows and the server's `/memory` download are all this one format.

This file is part of the remote-code folder copied next to saved checkpoints: it imports only the standard
library, torch, transformers' dependencies (`safetensors`, `tokenizers`) and its siblings.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from .configuration_rxt import RxTConfig

# ------------------------------------------------------------------------------------------------------
# special tokens

BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
MASK_TOKEN = "[MASK]"
QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"

# Order matters: `build_tokenizer` gives these ids 0..7.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    MASK_TOKEN,
    QUERY_TOKEN,
    ANSWER_TOKEN,
    THINK_TOKEN,
)

# RxTConfig field name -> special token.
TOKEN_FIELDS: dict[str, str] = {
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "pad_token_id": PAD_TOKEN,
    "unk_token_id": UNK_TOKEN,
    "mask_token_id": MASK_TOKEN,
    "query_token_id": QUERY_TOKEN,
    "answer_token_id": ANSWER_TOKEN,
    "think_token_id": THINK_TOKEN,
}

# Label value of positions without a loss (prompt, padding): what cross_entropy(ignore_index=...) skips by default.
IGNORE_INDEX = -100


def special_token_ids(tokenizer) -> dict[str, int]:
    """Special token ids under the `RxTConfig` field names.

    Keys: `bos_token_id, eos_token_id, pad_token_id, unk_token_id, mask_token_id, query_token_id, answer_token_id,
    think_token_id`. Use `config.update(special_token_ids(tok))` or `RxTConfig(..., **special_token_ids(tok))`; the
    framing functions below take the same dict (or the config itself).

    Raises:
        ValueError: the tokenizer lacks one of the RxT special tokens.
    """
    unk_id = tokenizer.unk_token_id
    out: dict[str, int] = {}
    missing = []
    for field, token in TOKEN_FIELDS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == unk_id and token != UNK_TOKEN):  # unknown tokens map to [UNK]
            missing.append(token)
        else:
            out[field] = int(token_id)
    if missing:
        raise ValueError(
            f"tokenizer is missing the RxT special token(s) {missing}; build it with "
            "modeling_rxt.tokenization_rxt.build_tokenizer or add them with tokenizer.add_special_tokens(...)."
        )
    return out


# ------------------------------------------------------------------------------------------------------
# the interaction template

# The chat template renders ONE interaction:
#   [user]                    -> [BOS][Q]q[A]
#   [user, assistant]         -> [BOS][Q]q[A]a[EOS]
#   assistant with reasoning  -> [BOS][Q]q[T]thinking[A]a[EOS]
# ("reasoning_content" or "thinking" key on the assistant message).
# A lone user message always ends with [A] (whatever add_generation_prompt is), unless the caller
# passes enable_thinking=True, in which case it ends with [T] so the model writes its reasoning
# first. System messages and more than one user message are errors: RxT keeps earlier turns and
# any "system prompt" in its Short-Term Memory, not in the prompt. `frame_interaction` builds the
# same ids (tests/test_tokenizer.py checks that they agree).
RXT_CHAT_TEMPLATE = (
    "{%- macro rxt_text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is none -%}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('RxT chat template: only text content is supported, got a content part of type ' ~ part['type'] ~ '.') }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('RxT has no system messages: it renders one interaction at a time. Put a system prompt into memory instead (an initial memory state, or a system-prompt interaction passed through the memory update), then send only the user message.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages | length == 0 -%}"
    "{{ raise_exception('RxT chat template: messages is empty; pass [{\"role\": \"user\", \"content\": query}] (optionally followed by one assistant message).') }}"
    "{%- endif -%}"
    "{%- if messages | selectattr('role', 'equalto', 'user') | list | length > 1 -%}"
    "{{ raise_exception('RxT renders one interaction (one user message, optionally one assistant answer); got more than one user message. Earlier turns live in the Short-Term Memory: update the memory with each past interaction and render only the current one.') }}"
    "{%- endif -%}"
    "{%- if messages | length > 2 -%}"
    "{{ raise_exception('RxT renders one interaction: at most one user message followed by one assistant message; got ' ~ (messages | length) ~ ' messages.') }}"
    "{%- endif -%}"
    "{%- if messages[0]['role'] != 'user' -%}"
    "{{ raise_exception('RxT chat template: the first message must have role \"user\", got \"' ~ messages[0]['role'] ~ '\".') }}"
    "{%- endif -%}"
    "{%- if messages | length == 2 and messages[1]['role'] != 'assistant' -%}"
    "{{ raise_exception('RxT chat template: the second message must have role \"assistant\", got \"' ~ messages[1]['role'] ~ '\".') }}"
    "{%- endif -%}"
    "{{ bos_token }}[Q]{{ rxt_text(messages[0]['content']) }}"
    "{%- if messages | length == 2 -%}"
    "{%- set answer = messages[1] -%}"
    "{%- if answer['reasoning_content'] is defined and answer['reasoning_content'] -%}"
    "{%- set thinking = answer['reasoning_content'] -%}"
    "{%- elif answer['thinking'] is defined and answer['thinking'] -%}"
    "{%- set thinking = answer['thinking'] -%}"
    "{%- else -%}"
    "{%- set thinking = '' -%}"
    "{%- endif -%}"
    "{%- if thinking -%}[T]{{ thinking }}{%- endif -%}"
    "[A]{{ rxt_text(answer['content']) }}{{ eos_token }}"
    "{%- elif enable_thinking is defined and enable_thinking -%}"
    "[T]"
    "{%- else -%}"
    "[A]"
    "{%- endif -%}"
)


class Interaction(NamedTuple):
    """The ids of one framed interaction and the length of its prompt `[BOS][Q] query ([T] thinking) [A]`."""

    input_ids: list[int]
    prompt_length: int

    @property
    def labels(self) -> list[int]:
        """Answer-only labels aligned with `input_ids`: `IGNORE_INDEX` on the prompt, the answer and `[EOS]` kept."""
        return [IGNORE_INDEX] * self.prompt_length + self.input_ids[self.prompt_length :]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, in one batched tokenizer call.

    The text between two special tokens is tokenized on its own, so the ids of a query are the same alone or
    inside the template.
    """
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _token_id(token_ids, field: str) -> int:
    return int(token_ids[field] if isinstance(token_ids, Mapping) else getattr(token_ids, field))


def frame_interaction(
    token_ids: Mapping[str, int] | RxTConfig,
    query_ids: Sequence[int],
    answer_ids: Sequence[int] | None = None,
    thinking_ids: Sequence[int] | None = None,
    max_length: int | None = None,
    truncate: bool = False,
) -> Interaction:
    """Frame token ids as one interaction: the single implementation of the template.

    - `answer_ids is None`: `[BOS][Q] query [A]` (the prompt the decoder answers), with `thinking_ids`
      `[BOS][Q] query [T] thinking [A]`;
    - otherwise `[BOS][Q] query [A] answer [EOS]`, with `thinking_ids` `[BOS][Q] query [T] thinking [A] answer [EOS]`.

    `token_ids` holds the special ids under `RxTConfig`'s field names (`special_token_ids(tokenizer)` or the config).
    Longer than `max_length`: a ValueError, or with `truncate=True` (training data) the answer is cut first (keeping
    its beginning, down to nothing), then the thinking, then the query; the special tokens are always kept.
    """
    parts = {"query": list(query_ids), "thinking": list(thinking_ids or []), "answer": list(answer_ids or [])}
    specials = 3 + (answer_ids is not None) + (thinking_ids is not None)
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < specials:
            raise ValueError(
                f"max_length={max_length!r} is too small: this interaction needs at least {specials} tokens for its "
                "special tokens ([BOS][Q][A][EOS]). Fix: use a larger max_length."
            )
        excess = specials + sum(len(p) for p in parts.values()) - max_length
        if excess > 0 and not truncate:
            raise ValueError(
                f"The interaction is {max_length + excess} tokens long (query: {len(parts['query'])} tokens), more "
                f"than max_length={max_length}. Shorten the query (or answer/thinking) or raise max_length."
            )
        for name in ("answer", "thinking", "query"):
            if excess > 0:
                cut = min(excess, len(parts[name]))
                parts[name] = parts[name][: len(parts[name]) - cut]
                excess -= cut
    ids = [_token_id(token_ids, "bos_token_id"), _token_id(token_ids, "query_token_id"), *parts["query"]]
    if thinking_ids is not None:
        ids += [_token_id(token_ids, "think_token_id"), *parts["thinking"]]
    ids.append(_token_id(token_ids, "answer_token_id"))
    prompt_length = len(ids)
    if answer_ids is not None:
        ids += [*parts["answer"], _token_id(token_ids, "eos_token_id")]
    return Interaction(ids, prompt_length)


def encode_interaction(
    tokenizer,
    query: str,
    answer: str | None = None,
    thinking: str | None = None,
    max_length: int | None = None,
) -> list[int]:
    """Token ids of one interaction from its texts, identical to the chat template's ids.

    - `answer is None`: `[BOS][Q] query [A]` (the prompt the decoder answers); with `thinking`:
      `[BOS][Q] query [T] thinking [A]` (reasoning given, answer to generate).
    - `answer` given: `[BOS][Q] query [A] answer [EOS]`; with `thinking`:
      `[BOS][Q] query [T] thinking [A] answer [EOS]`.

    Raises:
        ValueError: empty `query`, or the result is longer than `max_length`.
        TypeError: an argument has the wrong type.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}.")
    if not query.strip():
        raise ValueError(
            f"query={query!r} is empty: an RxT interaction needs a non-empty query. Pass the user's text as query."
        )
    if answer is not None and not isinstance(answer, str):
        raise TypeError(f"answer must be a str or None, got {type(answer).__name__}.")
    if thinking is not None and not isinstance(thinking, str):
        raise TypeError(f"thinking must be a str or None, got {type(thinking).__name__}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} must be a positive integer or None.")
    texts = [query] + [t for t in (thinking or None, answer) if t is not None]
    encoded = iter(encode_texts(tokenizer, texts))
    query_ids = next(encoded)
    thinking_ids = next(encoded) if thinking else None
    answer_ids = next(encoded) if answer is not None else None
    return frame_interaction(
        special_token_ids(tokenizer), query_ids, answer_ids, thinking_ids, max_length=max_length
    ).input_ids


def decode_interaction(tokenizer, ids) -> dict[str, str | None]:
    """Split the ids of one interaction back into its texts.

    Inverse of `encode_interaction` / the chat template: returns `{"query": str, "thinking": str | None,
    "answer": str | None}`. `answer` is `None` when there is no `[A]` (or nothing after it); a missing final
    `[EOS]` is fine (a truncated or still-generating answer). Padding and other special tokens are dropped. Accepts
    a list of ints or a 1-D tensor / array.

    Raises:
        ValueError: `ids` does not contain the `[Q]` token.
    """
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    sid = special_token_ids(tokenizer)
    q, a, t, e = sid["query_token_id"], sid["answer_token_id"], sid["think_token_id"], sid["eos_token_id"]
    if q not in ids:
        raise ValueError(
            "ids does not contain the [Q] token; pass the ids of a whole interaction "
            "([BOS][Q]query[A]answer[EOS]), or decode plain text with tokenizer.decode."
        )
    parts: dict[str, list[int]] = {"query": [], "thinking": [], "answer": []}
    seen = {"query": False, "thinking": False, "answer": False}
    current = None
    for i in ids[ids.index(q) :]:
        if i == q:
            current = "query"
        elif i == t:
            current = "thinking"
        elif i == a:
            current = "answer"
        elif i == e:
            break
        else:
            if current is not None:
                parts[current].append(i)
            continue
        seen[current] = True

    def _dec(key):
        return tokenizer.decode(parts[key], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return {
        "query": _dec("query"),
        "thinking": _dec("thinking") if seen["thinking"] else None,
        "answer": _dec("answer") if seen["answer"] and parts["answer"] else None,
    }


def render_interaction(tokenizer, query: str, answer: str | None = None) -> list[int]:
    """Ids of one interaction rendered by the tokenizer's own chat template (the prompt `[BOS][Q] query [A]` when
    `answer is None`). Unlike `encode_interaction`, this also works for a converted tokenizer whose special tokens
    have other names, since its template carries them."""
    messages = [{"role": "user", "content": query}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=answer is None)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# ------------------------------------------------------------------------------------------------------
# padding


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor],
    pad_value: int | float,
    side: str = "right",
    length: int | None = None,
    multiple_of: int | None = None,
    dtype: torch.dtype = torch.long,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad variable-length rows into `(values [N, T], attention_mask [N, T])` (mask: 1 on real entries, long).

    `side="left"` for generation prompts, `"right"` for training and memory updates. `T` is the longest row, or
    `length`, rounded up to a multiple of `multiple_of`. Labels: pad them with `IGNORE_INDEX`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} must be 'left' or 'right'.")
    tensors = [torch.as_tensor(row, dtype=dtype).reshape(-1) for row in rows]
    width = max((t.numel() for t in tensors), default=0) if length is None else length
    if multiple_of and width % multiple_of:
        width += multiple_of - width % multiple_of
    values = torch.full((len(tensors), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(tensors), width), dtype=torch.long)
    for i, row in enumerate(tensors):
        span = slice(width - row.numel(), width) if side == "left" else slice(0, row.numel())
        values[i, span] = row
        mask[i, span] = 1
    return values.to(device), mask.to(device)


def pad_grid(
    cells: Mapping[tuple[int, ...], Sequence[int] | torch.Tensor],
    shape: Sequence[int],
    pad_value: int | float,
    length: int | None = None,
    multiple_of: int | None = None,
    dtype: torch.dtype = torch.long,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows that sit in a grid, such as turn `t` of conversation `b`, into `(values [*shape, T],
    attention_mask [*shape, T])`: `cells[(b, t)]` is one row; grid cells without a row are all padding (mask 0)."""
    keys = list(cells)
    values, mask = pad_rows([cells[key] for key in keys], pad_value, length=length, multiple_of=multiple_of, dtype=dtype)
    out = torch.full((*shape, values.shape[1]), pad_value, dtype=dtype)
    out_mask = torch.zeros((*shape, values.shape[1]), dtype=torch.long)
    if keys:
        index = tuple(torch.tensor(axis) for axis in zip(*keys))
        out[index], out_mask[index] = values, mask
    return out.to(device), out_mask.to(device)


# ------------------------------------------------------------------------------------------------------
# streamed text


class IncrementalDetokenizer:
    """Generated ids -> text pieces for streaming: `add(token_id)` returns the text this token completes.

    Decoding one token at a time is wrong for byte-level BPE: "é" or "日" spans several tokens, each of which alone
    decodes to a replacement character. This buffers such tokens until the character is complete (then `add`
    returns it, "" meanwhile), so the pieces always join to the decoded answer (but for an answer cut off in the
    middle of a character, whose incomplete tail never streams). Special tokens (`[EOS]`, padding) give "".

    Uses `tokenizers.decoders.DecodeStream` on the tokenizer's backend (RxT tokenizers are fast tokenizers).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"IncrementalDetokenizer needs a fast tokenizer (with .backend_tokenizer), got "
                f"{type(tokenizer).__name__}: load it with AutoTokenizer.from_pretrained(...)."
            )
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        return self._stream.step(self._backend, int(token_id)) or ""


# ------------------------------------------------------------------------------------------------------
# STM files

# Written into every STM's safetensors metadata. Readers accept version "1" and ignore keys they do not know, so new
# optional keys (such as `model_fingerprint` or `conversation_version`) need no new version.
STM_FORMAT = "rxt-stm"
STM_FORMAT_VERSION = "1"
STM_TENSOR = "stm_state"
# The serving store's own format before it wrote this one (rows already in databases are still read).
_OLD_STORE_FORMAT = "rxt-stm-store/1"
_RESERVED_KEYS = ("format", "version", "layers", "slots", "dim", "model_type")


def stm_to_bytes(stm_state: torch.Tensor, **metadata: str) -> bytes:
    """An STM `[batch, layers, slots, dim]` as safetensors bytes (tensor `stm_state`, geometry in the metadata).

    `metadata`: extra strings stored with it, e.g. `model_fingerprint` (the serving store's model id) or
    `conversation_version`. Write the bytes to a file as they are: that is the `.stm.safetensors` file.
    """
    from safetensors.torch import save

    if not isinstance(stm_state, torch.Tensor) or stm_state.dim() != 4:
        raise ValueError(
            f"stm_state must be a tensor [batch, layers, slots, dim], got "
            f"{list(stm_state.shape) if isinstance(stm_state, torch.Tensor) else type(stm_state).__name__}."
        )
    clash = [key for key in metadata if key in _RESERVED_KEYS]
    if clash or not all(isinstance(value, str) for value in metadata.values()):
        raise ValueError(f"metadata {metadata!r}: values must be strings and keys not one of {_RESERVED_KEYS}.")
    _, layers, slots, dim = stm_state.shape
    header = {
        "format": STM_FORMAT,
        "version": STM_FORMAT_VERSION,
        "layers": str(layers),
        "slots": str(slots),
        "dim": str(dim),
        "model_type": RxTConfig.model_type,
    }
    return save({STM_TENSOR: stm_state.detach().to("cpu").contiguous()}, metadata={**header, **metadata})


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes, read from the header (8-byte length + JSON)."""
    if len(blob) < 8:
        raise ValueError(f"{len(blob)} bytes is too short for a safetensors header")
    (header_length,) = struct.unpack("<Q", blob[:8])
    if header_length > len(blob) - 8:
        raise ValueError(f"header length {header_length} exceeds the {len(blob)} bytes stored")
    header = json.loads(blob[8 : 8 + header_length].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return header.get("__metadata__") or {}


def stm_from_bytes(blob: bytes) -> tuple[torch.Tensor, dict[str, str]]:
    """Read an STM written by `stm_to_bytes` or by an earlier release (`save_memory` files, the serving store's rows
    in its former `rxt-stm-store/1` format): returns `(stm_state [batch, layers, slots, dim], metadata)`, the
    metadata being the extra strings given to `stm_to_bytes` (a former store row's fingerprint as
    `model_fingerprint`).

    Raises:
        ValueError: the bytes are not an RxT STM (the message says why; callers add where the bytes came from).
    """
    from safetensors.torch import load

    blob = bytes(blob)
    try:
        stored = _safetensors_metadata(blob)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"not safetensors data ({error})") from None
    fmt = stored.get("format")
    if fmt == _OLD_STORE_FORMAT:
        metadata = {"model_fingerprint": stored["fingerprint"]} if "fingerprint" in stored else {}
    elif fmt != STM_FORMAT:
        raise ValueError(f"format {fmt!r} is not an RxT memory state ({STM_FORMAT!r})")
    elif stored.get("version") != STM_FORMAT_VERSION:
        raise ValueError(
            f"{STM_FORMAT!r} version {stored.get('version')!r} is newer than this release reads "
            f"({STM_FORMAT_VERSION!r}): upgrade this project"
        )
    else:
        metadata = {key: value for key, value in stored.items() if key not in _RESERVED_KEYS}
    try:
        tensors = load(blob)
    except Exception as error:  # safetensors raises its own error types for torn / truncated bytes
        raise ValueError(f"unreadable tensor data ({error})") from None
    state = tensors.get(STM_TENSOR)
    if state is None or state.dim() != 4:
        found = {name: list(tensor.shape) for name, tensor in tensors.items()}
        raise ValueError(f"no {STM_TENSOR!r} tensor [batch, layers, slots, dim] (found {found})")
    declared = [stored.get(key) for key in ("layers", "slots", "dim")]
    if fmt == STM_FORMAT and declared != [str(n) for n in state.shape[1:]]:
        raise ValueError(f"its metadata says layers/slots/dim {declared}, its tensor is {list(state.shape)}")
    return state, metadata


__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "MASK_TOKEN",
    "QUERY_TOKEN",
    "ANSWER_TOKEN",
    "THINK_TOKEN",
    "SPECIAL_TOKENS",
    "TOKEN_FIELDS",
    "IGNORE_INDEX",
    "RXT_CHAT_TEMPLATE",
    "special_token_ids",
    "Interaction",
    "encode_texts",
    "frame_interaction",
    "encode_interaction",
    "decode_interaction",
    "render_interaction",
    "pad_rows",
    "pad_grid",
    "IncrementalDetokenizer",
    "STM_FORMAT",
    "STM_FORMAT_VERSION",
    "STM_TENSOR",
    "stm_to_bytes",
    "stm_from_bytes",
]
