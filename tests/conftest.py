"""Shared pytest fixtures. Everything runs on CPU, offline, in seconds."""

import os

# No network in tests: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
_THINGS = ["apple", "book", "cat", "dog", "kite", "lamp", "pen", "ship"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
_PLACES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def tiny_corpus(n: int = 240) -> list[str]:
    """A small deterministic corpus of simple sentences, questions and answers."""
    out = []
    for i in range(n):
        name = _NAMES[i % len(_NAMES)]
        thing = _THINGS[(i * 3) % len(_THINGS)]
        colour = _COLOURS[(i * 5) % len(_COLOURS)]
        place = _PLACES[(i * 7) % len(_PLACES)]
        k = i % 4
        if k == 0:
            out.append(f"{name} has a {colour} {thing}.")
        elif k == 1:
            out.append(f"What colour is the {thing} of {name}?")
        elif k == 2:
            out.append(f"{name} lives in {place} and likes the number {i % 10}.")
        else:
            out.append(f"Where does {name} live? {name} lives in {place}.")
    return out


@pytest.fixture(scope="session")
def tiny_corpus_texts() -> list[str]:
    return tiny_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus_texts):
    """A tiny RxT tokenizer (byte-level BPE, vocab <= 400) shared by the test session.

    Do not mutate it in tests (padding_side etc.); copy it first if needed.
    """
    from modeling_rxt.tokenization_rxt import build_tokenizer

    return build_tokenizer(tiny_corpus_texts, vocab_size=400, min_frequency=2, model_max_length=128)
