"""Tests for modeling_rxt.tokenization_rxt (byte-level BPE + one-interaction chat template)."""

import os

import pytest
from transformers import AutoTokenizer

from rxt_hf.modeling_rxt.tokenization_rxt import (
    RXT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    decode_interaction,
    encode_interaction,
    special_token_ids,
)

CONFIG_KEYS = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "mask_token_id",
    "query_token_id",
    "answer_token_id",
    "think_token_id",
}

SUBJECTS = ["The cat", "A small dog", "My friend", "The teacher", "Our robot"]
VERBS = ["likes", "sees", "finds", "paints", "remembers"]
OBJECTS = ["a red ball", "the old house", "blue water", "seven apples", "the quiet moon"]
PLACES = ["in the garden", "at school", "near the river", "on Monday", "after dinner"]


def _corpus(n=200):
    out = []
    for i in range(n):
        s = SUBJECTS[i % 5]
        v = VERBS[(i // 5) % 5]
        o = OBJECTS[(i // 25) % 5]
        p = PLACES[(i * 3) % 5]
        if i % 3 == 0:
            out.append(f"Does {s.lower()} {v.rstrip('s')} {o}?")
        else:
            out.append(f"{s} {v} {o} {p}.")
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(_corpus(), vocab_size=500, min_frequency=2)


USER = {"role": "user", "content": "What does the cat like?"}
ASSISTANT = {"role": "assistant", "content": "The cat likes a red ball."}


def _ids(result):
    """apply_chat_template(tokenize=True) returns a BatchEncoding (v5) or a list (older)."""
    if hasattr(result, "keys") and "input_ids" in result:
        return list(result["input_ids"])
    return list(result)


def test_special_token_ids_are_0_to_7(tok):
    assert tok.convert_ids_to_tokens(list(range(8))) == list(SPECIAL_TOKENS)
    assert list(SPECIAL_TOKENS) == ["[BOS]", "[EOS]", "[PAD]", "[UNK]", "[MASK]", "[Q]", "[A]", "[T]"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.mask_token) == (
        "[BOS]",
        "[EOS]",
        "[PAD]",
        "[UNK]",
        "[MASK]",
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert set(["[Q]", "[A]", "[T]"]) <= set(tok.all_special_tokens)
    assert len(tok) <= 500
    assert tok.padding_side == "right"
    assert tok.model_max_length == 256


def test_special_token_ids_helper(tok):
    ids = special_token_ids(tok)
    assert set(ids) == CONFIG_KEYS
    assert ids == {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "unk_token_id": 3,
        "mask_token_id": 4,
        "query_token_id": 5,
        "answer_token_id": 6,
        "think_token_id": 7,
    }
    # usable as config.update(...) payload
    cfg = {}
    cfg.update(ids)
    assert cfg["think_token_id"] == 7


def test_no_bos_eos_added_by_post_processor(tok):
    ids = tok("The cat likes a red ball.")["input_ids"]
    assert ids[0] not in range(8) and ids[-1] not in range(8)


def test_template_user_only(tok):
    for gen in (True, False):
        text = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=gen)
        assert text == "[BOS][Q]What does the cat like?[A]"


def test_template_user_assistant(tok):
    text = tok.apply_chat_template([USER, ASSISTANT], tokenize=False)
    assert text == "[BOS][Q]What does the cat like?[A]The cat likes a red ball.[EOS]"


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
def test_template_with_thinking(tok, key):
    msg = dict(ASSISTANT, **{key: "It said so before."})
    text = tok.apply_chat_template([USER, msg], tokenize=False)
    assert text == "[BOS][Q]What does the cat like?[T]It said so before.[A]The cat likes a red ball.[EOS]"


def test_template_enable_thinking_prompt(tok):
    text = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "[BOS][Q]What does the cat like?[T]"


def test_template_text_parts(tok):
    msg = {"role": "user", "content": [{"type": "text", "text": "What does the cat like?"}]}
    assert tok.apply_chat_template([msg], tokenize=False) == "[BOS][Q]What does the cat like?[A]"


def test_template_system_message_raises(tok):
    with pytest.raises(Exception, match="no system messages"):
        tok.apply_chat_template([{"role": "system", "content": "Be nice."}, USER], tokenize=False)


def test_template_two_user_messages_raise(tok):
    msgs = [USER, ASSISTANT, {"role": "user", "content": "And the dog?"}]
    with pytest.raises(Exception, match="more than one user message"):
        tok.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(Exception, match="more than one user message"):
        tok.apply_chat_template([USER, USER], tokenize=False)


def test_template_assistant_first_raises(tok):
    with pytest.raises(Exception, match="first message"):
        tok.apply_chat_template([ASSISTANT], tokenize=False)


def test_encode_interaction_matches_template(tok):
    ids = _ids(tok.apply_chat_template([USER], tokenize=True, add_generation_prompt=True))
    assert ids == encode_interaction(tok, USER["content"])
    assert ids[:2] == [0, 5] and ids[-1] == 6

    ids = _ids(tok.apply_chat_template([USER, ASSISTANT], tokenize=True))
    assert ids == encode_interaction(tok, USER["content"], ASSISTANT["content"])
    assert ids[-1] == 1 and ids.count(6) == 1

    msg = dict(ASSISTANT, reasoning_content="It said so before.")
    ids = _ids(tok.apply_chat_template([USER, msg], tokenize=True))
    assert ids == encode_interaction(tok, USER["content"], ASSISTANT["content"], thinking="It said so before.")
    assert ids.index(7) < ids.index(6)


def test_segments_tokenize_independently(tok):
    """Text between special tokens gets the same ids as when encoded alone."""
    q = tok(USER["content"], add_special_tokens=False)["input_ids"]
    a = tok(ASSISTANT["content"], add_special_tokens=False)["input_ids"]
    assert encode_interaction(tok, USER["content"], ASSISTANT["content"]) == [0, 5, *q, 6, *a, 1]


def test_decode_is_clean(tok):
    ids = encode_interaction(tok, USER["content"], ASSISTANT["content"])
    text = tok.decode(ids, skip_special_tokens=True)
    assert "Ġ" not in text and "Ċ" not in text
    assert text == USER["content"] + ASSISTANT["content"]
    assert tok.decode(ids) == "[BOS][Q]What does the cat like?[A]The cat likes a red ball.[EOS]"
    # the answer segment alone (what generate() produces after [A]) decodes exactly
    answer_ids = ids[ids.index(6) + 1 : -1]
    assert tok.decode(answer_ids, skip_special_tokens=True) == ASSISTANT["content"]
    # unseen words and unicode still round-trip through the byte-level BPE
    for s in ["Zebras jump  over\nlines, naïvely!", "  leading spaces", "emoji 🙂 ok"]:
        enc = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc) == s


def test_decode_interaction(tok):
    ids = encode_interaction(tok, "Where is it?", "Near the river.", thinking="Recall.")
    assert decode_interaction(tok, ids) == {"query": "Where is it?", "thinking": "Recall.", "answer": "Near the river."}
    ids = encode_interaction(tok, "Where is it?")
    assert decode_interaction(tok, ids) == {"query": "Where is it?", "thinking": None, "answer": None}
    padded = encode_interaction(tok, "Where is it?", "Here.") + [2, 2, 2]
    assert decode_interaction(tok, padded)["answer"] == "Here."
    with pytest.raises(ValueError, match="ids"):
        decode_interaction(tok, [10, 11])


def test_encode_interaction_errors(tok):
    with pytest.raises(ValueError, match="query"):
        encode_interaction(tok, "")
    with pytest.raises(ValueError, match="query"):
        encode_interaction(tok, "   ")
    with pytest.raises(TypeError, match="query"):
        encode_interaction(tok, None)
    long_query = "The cat likes a red ball in the garden. " * 20
    with pytest.raises(ValueError, match="max_length"):
        encode_interaction(tok, long_query, max_length=16)
    with pytest.raises(ValueError, match="max_length"):
        encode_interaction(tok, "Hi?", "The cat likes a red ball. " * 10, max_length=12)
    ok = encode_interaction(tok, "Hi?", max_length=16)
    assert len(ok) <= 16


def test_build_tokenizer_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer([], vocab_size=300)
    with pytest.raises(TypeError, match="texts"):
        build_tokenizer("just one string", vocab_size=300)


def test_save_and_reload_offline(tok, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template == RXT_CHAT_TEMPLATE
    assert special_token_ids(loaded) == special_token_ids(tok)
    assert set(["[Q]", "[A]", "[T]"]) <= set(loaded.all_special_tokens)
    assert loaded.get_vocab() == tok.get_vocab()
    for s in _corpus(20) + ["Unseen words: xylophone quartz!"]:
        assert loaded(s)["input_ids"] == tok(s)["input_ids"]
    msgs = [USER, dict(ASSISTANT, thinking="Because.")]
    assert _ids(loaded.apply_chat_template(msgs, tokenize=True)) == _ids(tok.apply_chat_template(msgs, tokenize=True))
    assert encode_interaction(loaded, "Where?", "Here.") == encode_interaction(tok, "Where?", "Here.")
    assert loaded.decode(encode_interaction(loaded, "Where?", "Here."), skip_special_tokens=True) == "Where?Here."
    with pytest.raises(Exception, match="no system messages"):
        loaded.apply_chat_template([{"role": "system", "content": "x"}, USER], tokenize=False)


def test_shared_fixture(tiny_tokenizer):
    assert len(tiny_tokenizer) <= 400
    assert special_token_ids(tiny_tokenizer)["think_token_id"] == 7
    assert tiny_tokenizer.apply_chat_template([USER], tokenize=False) == "[BOS][Q]What does the cat like?[A]"
