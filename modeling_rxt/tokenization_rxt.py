"""Tokenizer for the Reactive Transformer (RxT).

RxT reads a conversation one *interaction* at a time, so its text format is a single
query/answer pair framed by special tokens::

    [BOS][Q]query[A]answer[EOS]
    [BOS][Q]query[T]thinking[A]answer[EOS]        (with reasoning)

Earlier turns are never rendered: they live in the Short-Term Memory (STM). This differs from
the usual Llama / ChatML chat format, where the whole history (and a system prompt) is flattened
into one prompt.

What this module gives you:

- :func:`build_tokenizer` trains a small byte-level BPE tokenizer with the `tokenizers` library
  and wraps it as a ``transformers.PreTrainedTokenizerFast`` carrying a chat template that renders
  exactly one interaction, so ``tokenizer.apply_chat_template`` and other standard Hugging Face
  tooling work.
- :func:`special_token_ids` returns the special token ids under the field names of ``RxTConfig``
  (``config.update(special_token_ids(tokenizer))``).
- :func:`encode_interaction` builds the ids of one interaction directly (same ids as the chat
  template), with checks on the query and the length.

Format decisions:

- No spaces are inserted between the special tokens and the text. The text between two special
  tokens is tokenized on its own (special tokens are split out first), so the ids of a query are
  the same whether it is encoded alone or inside the template, and each segment decodes back to
  exactly its original text. Decoding a whole interaction with ``skip_special_tokens=True`` gives
  the segments concatenated (``query + thinking + answer``); decode segments separately (for
  example only the generated answer ids) for clean per-message text.
- The byte-level pre-tokenizer does not add a prefix space, and the byte-level decoder maps the
  byte glyphs (such as ``"Ġ"``) back to plain text. ``clean_up_tokenization_spaces`` is off, so
  decoding never alters the text.
- The post-processor adds no BOS/EOS: ``tokenizer("text")`` gives only the text ids. The chat
  template (or :func:`encode_interaction`) adds the frame.
- ``padding_side`` is left at the transformers default ``"right"`` (what training collators
  expect). For batched generation set ``tokenizer.padding_side = "left"`` yourself.
- Text that contains the literal strings ``[Q]``, ``[A]`` ... is parsed as the special tokens, as
  usual for Hugging Face chat templates; :func:`encode_interaction` behaves the same way so the two
  always agree. :func:`decode_interaction` splits ids back into query / thinking / answer text.

This file lives in the remote-code folder, so it imports only the standard library,
``tokenizers`` and ``transformers``.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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
    "RXT_CHAT_TEMPLATE",
    "build_tokenizer",
    "special_token_ids",
    "encode_interaction",
    "decode_interaction",
]

BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
MASK_TOKEN = "[MASK]"
QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"

# Order matters: these get ids 0..7.
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
_CONFIG_FIELDS: dict[str, str] = {
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "pad_token_id": PAD_TOKEN,
    "unk_token_id": UNK_TOKEN,
    "mask_token_id": MASK_TOKEN,
    "query_token_id": QUERY_TOKEN,
    "answer_token_id": ANSWER_TOKEN,
    "think_token_id": THINK_TOKEN,
}

# The chat template renders ONE interaction:
#   [user]                    -> [BOS][Q]q[A]
#   [user, assistant]         -> [BOS][Q]q[A]a[EOS]
#   assistant with reasoning  -> [BOS][Q]q[T]thinking[A]a[EOS]
# ("reasoning_content" or "thinking" key on the assistant message).
# A lone user message always ends with [A] (whatever add_generation_prompt is), unless the caller
# passes enable_thinking=True, in which case it ends with [T] so the model writes its reasoning
# first. System messages and more than one user message are errors: RxT keeps earlier turns and
# any "system prompt" in its Short-Term Memory, not in the prompt.
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


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for RxT on ``texts``.

    Args:
        texts: training text (any iterable of strings; consumed once).
        vocab_size: target vocabulary size including the 8 special tokens and the 256 byte symbols.
        min_frequency: minimum pair frequency for a BPE merge.
        model_max_length: maximum sequence length stored on the tokenizer.

    Returns:
        A ``PreTrainedTokenizerFast`` with special tokens ``[BOS] [EOS] [PAD] [UNK] [MASK] [Q] [A]
        [T]`` at ids 0..7 and the one-interaction chat template. It saves with
        ``save_pretrained`` and reloads with ``AutoTokenizer.from_pretrained`` (no remote code).

    Unlike the GPT-2 tokenizer, no prefix space is added and no BOS/EOS is added by the
    post-processor; the chat template / :func:`encode_interaction` frame the text.
    """
    min_vocab = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs at least {min_vocab} "
            f"entries ({len(SPECIAL_TOKENS)} special tokens + 256 bytes). Use vocab_size >= {min_vocab}."
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be an integer >= 1.")
    if not isinstance(model_max_length, int) or model_max_length < 4:
        raise ValueError(
            f"model_max_length={model_max_length!r} must be an integer >= 4 (room for [BOS][Q]...[A])."
        )
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, got a single str; wrap it in a list.")

    seen = {"n": 0}

    def _iter():
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}.")
            seen["n"] += 1
            yield text

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets only; adds no tokens (no BOS/EOS).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter(), trainer=trainer)
    if seen["n"] == 0:
        raise ValueError("texts is empty: build_tokenizer needs at least one training string.")

    for expected_id, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != expected_id:  # pragma: no cover - guaranteed by BpeTrainer
            raise RuntimeError(f"special token {token} got id {got}, expected {expected_id}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        mask_token=MASK_TOKEN,
        extra_special_tokens=[QUERY_TOKEN, ANSWER_TOKEN, THINK_TOKEN],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = RXT_CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Special token ids under the ``RxTConfig`` field names.

    Keys: ``bos_token_id, eos_token_id, pad_token_id, unk_token_id, mask_token_id,
    query_token_id, answer_token_id, think_token_id``. Use ``config.update(special_token_ids(tok))``.

    Raises:
        ValueError: if the tokenizer lacks one of the RxT special tokens.
    """
    vocab = tokenizer.get_vocab()
    out: dict[str, int] = {}
    missing = []
    for field, token in _CONFIG_FIELDS.items():
        if token in vocab:
            out[field] = int(vocab[token])
        else:
            missing.append(token)
    if missing:
        raise ValueError(
            f"tokenizer is missing the RxT special token(s) {missing}; build it with "
            "modeling_rxt.tokenization_rxt.build_tokenizer or add them with "
            "tokenizer.add_special_tokens(...)."
        )
    return out


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_interaction(
    tokenizer,
    query: str,
    answer: str | None = None,
    thinking: str | None = None,
    max_length: int | None = None,
) -> list[int]:
    """Token ids of one interaction, identical to the chat template's ids.

    - ``answer is None``: ``[BOS][Q] query [A]`` (the prompt the decoder answers);
      with ``thinking``: ``[BOS][Q] query [T] thinking [A]`` (reasoning given, answer to generate).
    - ``answer`` given: ``[BOS][Q] query [A] answer [EOS]``;
      with ``thinking``: ``[BOS][Q] query [T] thinking [A] answer [EOS]``.

    Args:
        tokenizer: an RxT tokenizer (see :func:`build_tokenizer`).
        query: the user's query; must not be empty.
        answer: the answer, or ``None`` for a generation prompt.
        thinking: optional reasoning text placed between ``[T]`` and ``[A]``.
        max_length: optional limit on the total number of ids.

    Raises:
        ValueError: empty ``query``, or the result is longer than ``max_length``.
        TypeError: an argument has the wrong type.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}.")
    if not query.strip():
        raise ValueError(
            f"query={query!r} is empty: an RxT interaction needs a non-empty query. "
            "Pass the user's text as query."
        )
    if answer is not None and not isinstance(answer, str):
        raise TypeError(f"answer must be a str or None, got {type(answer).__name__}.")
    if thinking is not None and not isinstance(thinking, str):
        raise TypeError(f"thinking must be a str or None, got {type(thinking).__name__}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} must be a positive integer or None.")

    ids = special_token_ids(tokenizer)
    out = [ids["bos_token_id"], ids["query_token_id"]]
    out += _encode_text(tokenizer, query)
    if thinking:
        out.append(ids["think_token_id"])
        out += _encode_text(tokenizer, thinking)
    out.append(ids["answer_token_id"])
    if answer is not None:
        out += _encode_text(tokenizer, answer)
        out.append(ids["eos_token_id"])

    if max_length is not None and len(out) > max_length:
        q_len = len(_encode_text(tokenizer, query))
        raise ValueError(
            f"The interaction is {len(out)} tokens long (query: {q_len} tokens), more than "
            f"max_length={max_length}. Shorten the query (or answer/thinking) or raise max_length."
        )
    return out


def decode_interaction(tokenizer, ids) -> dict[str, str | None]:
    """Split the ids of one interaction back into its texts.

    Inverse of :func:`encode_interaction` / the chat template: returns
    ``{"query": str, "thinking": str | None, "answer": str | None}``. ``answer`` is ``None`` when
    there is no ``[A]`` (or nothing after it); a missing final ``[EOS]`` is fine (a truncated or
    still-generating answer). Padding and other special tokens are dropped. Accepts a list of ints
    or a 1-D tensor / array.

    Raises:
        ValueError: ``ids`` does not contain the ``[Q]`` token.
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
    for i in ids[ids.index(q):]:
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
