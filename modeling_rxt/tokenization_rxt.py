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
- The template itself, the special tokens, :func:`special_token_ids` (their ids under the field
  names of ``RxTConfig``), :func:`encode_interaction` / :func:`decode_interaction` and the other
  format helpers live in ``format_rxt.py``; they are re-exported here for existing imports.

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
``tokenizers``, ``transformers`` and its siblings.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .format_rxt import (
    ANSWER_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    QUERY_TOKEN,
    RXT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    THINK_TOKEN,
    UNK_TOKEN,
    decode_interaction,
    encode_interaction,
    special_token_ids,
)

# The format names are re-exported for imports that predate format_rxt.py.
__all__ = [
    "build_tokenizer",
    "RXT_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "decode_interaction",
    "encode_interaction",
    "special_token_ids",
]


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
