"""Preference data over conversations for RxRLHF (stage 6): the embedded generator, a validator and loaders.

A preference row is one conversation whose every turn has a query and two answers::

    {"interactions": [{"query": ..., "chosen": ..., "rejected": ...}, ...],   # required
     "recall_distance": [0, 0, 2, ...],        # optional, one per turn (0: not a recall question)
     "answer_keywords": [[], [], ["old", "mill"], ...],  # optional, one per turn
     "rejection_type": ["unhelpful", "incorrect", "contradicts", ...],  # optional, one per turn
     "turn_type": ["plant", "filler", "recall", ...],   # optional, one per turn
     "conversation_id": "..."}                 # optional

Unlike the multi-turn columns (first interaction in ``query`` / ``answer``), *every* turn is inside
``interactions``. The history a turn is answered from is the *chosen* answers of the earlier turns: that is
what the trainer writes into memory.

The embedded set (:func:`build_preference_dataset`) is built on :mod:`trainers.synthetic_data` (unchanged):
the same conversations, with the reference answer as ``chosen`` and a ``rejected`` answer of one of these
types:

- ``"contradicts"`` (recall turns): the reference sentence with a wrong value ("You put the brass lantern in
  the dusty barn." when it was the old mill) - only a model that reads its memory can tell which is right;
- ``"ignores"`` (recall turns): an answer that ignores the memory ("I do not know where the brass lantern
  is.", "You never told me that.");
- ``"unhelpful"`` (any turn): a dismissive or off-topic answer ("I will not remember that.", "Ask someone
  else.", the answer to another question);
- ``"incorrect"`` (arithmetic filler turns): a wrong sum.

:func:`validate_preference_rows` checks rows before training and names the row, the turn and the missing or
empty field. :func:`load_preference_dataset` loads the embedded set, local JSONL / Parquet or a Hub data set
with these columns (through :func:`trainers.data.load_rxt_dataset`, kind ``"preference"``) and validates
every row.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .synthetic_data import WORLD_QA, SyntheticWorld, generate_conversations, split_counts

__all__ = [
    "PREFERENCE_COLUMNS",
    "REJECTION_TYPES",
    "build_preference_dataset",
    "check_preference_row",
    "load_preference_dataset",
    "preference_to_multi_turn",
    "validate_preference_rows",
]

PREFERENCE_COLUMNS = ("interactions",)
TURN_FIELDS = ("query", "chosen", "rejected")
PER_TURN_COLUMNS = ("recall_distance", "answer_keywords", "rejection_type", "turn_type")
REJECTION_TYPES = ("contradicts", "ignores", "unhelpful", "incorrect")

# Rejected answers (written for this project).
_DISMISSIVE = (
    "I do not want to talk about that.",
    "Ask someone else.",
    "I will not answer that.",
    "That is not my problem.",
    "Why do you keep asking me things?",
)
_DISMISSIVE_PLANT = (
    "I will not remember that.",
    "I do not care about that.",
    "Why would I remember that?",
    "That is not important to me.",
)
_IGNORES_GENERIC = (
    "I am sorry, I do not remember that.",
    "You never told me that.",
    "I have no idea, you did not say.",
)
_IGNORES = {
    "put": "I do not know where the {subject} is.",
    "lives": "I do not know where {subject} lives.",
    "called": "I do not know what your {subject} is called.",
    "gift": "I do not know what {subject} gave you.",
    "paint": "I do not know what colour your {subject} is.",
    "count": "I do not know how many {subject} you have.",
}
_SUM_RE = re.compile(r"^(\d+) plus (\d+) is (\d+)\.$")


def _value_pool(world: SyntheticWorld, kind: str) -> list[str]:
    """Candidate values of a fact kind (what a recall answer states)."""
    return {
        "put": world.spots,
        "lives": world.places,
        "called": world.names,
        "gift": world.objects,
        "paint": world.colours,
        "count": [str(n) for n in world.numbers],
    }[kind]


def _replace_last(text: str, old: str, new: str) -> str:
    """Replace the last whole-word occurrence of ``old`` in ``text``."""
    matches = list(re.finditer(r"(?<![A-Za-z0-9])" + re.escape(old) + r"(?![A-Za-z0-9])", text))
    if not matches:
        raise ValueError(f"value {old!r} not found in answer {text!r}")
    m = matches[-1]
    return text[: m.start()] + new + text[m.end():]


def _recall_rejection(turn: dict, world: SyntheticWorld, rng: random.Random, kind_weights: dict[str, float],
                      wrong_values: list[str]) -> tuple[str, str]:
    kind, subject = turn["fact_key"].split(":", 1)
    value = " ".join(turn["answer_keywords"])
    types = [t for t, w in kind_weights.items() if w > 0]
    rejection = rng.choices(types, weights=[kind_weights[t] for t in types])[0]
    if rejection == "contradicts":
        # prefer a value that also occurs in this conversation (a confusable fact), else any other value
        others = [v for v in wrong_values if v != value and v in _value_pool(world, kind)]
        pool = [v for v in _value_pool(world, kind) if v != value]
        wrong = rng.choice(others) if others and rng.random() < 0.5 else rng.choice(pool)
        return _replace_last(turn["answer"], value, wrong), rejection
    if rejection == "ignores":
        if rng.random() < 0.6:
            text = _IGNORES[kind].format(subject=subject)
            return text[0].upper() + text[1:], rejection
        return rng.choice(_IGNORES_GENERIC), rejection
    return rng.choice(_DISMISSIVE), rejection


def _other_answer(world_answers: Sequence[str], answer: str, rng: random.Random) -> str:
    choices = [a for a in world_answers if a != answer]
    return rng.choice(choices)


def _preference_turns(conversation: dict, world: SyntheticWorld, rng: random.Random,
                      kind_weights: dict[str, float]) -> list[dict]:
    world_answers = [a for _, a in WORLD_QA]  # off-topic answers for "unhelpful"
    turns = conversation["interactions"]
    # values stated anywhere in the conversation (recall answers): confusable wrong values for "contradicts"
    stated = [" ".join(t["answer_keywords"]) for t in turns if t["turn_type"] == "recall"]
    out = []
    for turn in turns:
        kind = turn["turn_type"]
        if kind == "recall":
            rejected, rejection = _recall_rejection(turn, world, rng, kind_weights, stated)
        elif kind == "plant":
            rejected, rejection = rng.choice(_DISMISSIVE_PLANT), "unhelpful"
        else:
            m = _SUM_RE.match(turn["answer"])
            if m and rng.random() < 0.7:
                a, b, total = (int(x) for x in m.groups())
                wrong = total + rng.choice([-3, -2, -1, 1, 2, 3, 10])  # never the right sum; sums are >= 2
                rejected, rejection = f"{a} plus {b} is {wrong if wrong >= 0 else total + 1}.", "incorrect"
            elif rng.random() < 0.5:
                rejected, rejection = _other_answer(world_answers, turn["answer"], rng), "unhelpful"
            else:
                rejected, rejection = rng.choice(_DISMISSIVE), "unhelpful"
        if rejected == turn["answer"]:  # pragma: no cover - every branch above differs by construction
            raise AssertionError(f"rejected equals chosen: {rejected!r}")
        out.append({
            "query": turn["query"], "chosen": turn["answer"], "rejected": rejected,
            "recall_distance": int(turn["recall_distance"]), "answer_keywords": list(turn["answer_keywords"]),
            "rejection_type": rejection, "turn_type": kind,
        })
    return out


def _features():
    from datasets import Features, List, Value

    return Features({
        "interactions": List({"query": Value("string"), "chosen": Value("string"), "rejected": Value("string")}),
        "recall_distance": List(Value("int32")),
        "answer_keywords": List(List(Value("string"))),
        "rejection_type": List(Value("string")),
        "turn_type": List(Value("string")),
        "conversation_id": Value("string"),
    })


def build_preference_dataset(num_conversations: int = 2000, num_turns: int | tuple[int, int] = 6,
                             max_recall_distance: int = 4, seed: int = 0,
                             split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                             recall_rejections: Mapping[str, float] | None = None):
    """The embedded preference data set (a ``datasets.DatasetDict`` with train / validation / test).

    The conversations are exactly those of ``build_synthetic_dataset("multi-turn", ...)`` with the same
    arguments (same seed, same split: a model evaluated on this test split never saw these conversations in
    stages 1-4 either). Every turn gets ``chosen`` = the reference answer and a ``rejected`` answer (see the
    module docstring). ``recall_rejections`` weighs the rejection types of recall turns (default
    ``{"contradicts": 0.5, "ignores": 0.25, "unhelpful": 0.25}``). Deterministic in ``seed``.
    """
    from datasets import Dataset, DatasetDict

    weights = dict(recall_rejections or {"contradicts": 0.5, "ignores": 0.25, "unhelpful": 0.25})
    unknown = sorted(set(weights) - {"contradicts", "ignores", "unhelpful"})
    if unknown or not any(v > 0 for v in weights.values()) or any(v < 0 for v in weights.values()):
        raise ValueError(
            f"recall_rejections={weights!r} is invalid: give non-negative weights for 'contradicts', 'ignores' "
            "and 'unhelpful', at least one positive."
        )
    world = SyntheticWorld(seed)
    convs = generate_conversations(num_conversations, num_turns, max_recall_distance, seed, world)
    rows = []
    for i, conv in enumerate(convs):
        rng = random.Random(int(seed) * 1_000_033 + 7 * i + 1)
        turns = _preference_turns(conv, world, rng, weights)
        rows.append({
            "interactions": [{k: t[k] for k in TURN_FIELDS} for t in turns],
            **{col: [t[col] for t in turns] for col in PER_TURN_COLUMNS},
            "conversation_id": conv["conversation_id"],
        })
    # the same split as build_synthetic_dataset (same shuffle seed and counts)
    order = list(range(len(rows)))
    random.Random(int(seed) * 7_919 + 17).shuffle(order)
    counts = split_counts(len(rows), split_fractions)
    bounds = [0, counts[0], counts[0] + counts[1], len(rows)]
    out = {}
    for j, name in enumerate(("train", "validation", "test")):
        part = [rows[k] for k in sorted(order[bounds[j]:bounds[j + 1]])]
        out[name] = Dataset.from_list(part, features=_features())
    return DatasetDict(out)


# --------------------------------------------------------------------------------------------------
# validation


def _splits(data) -> dict[str, Any]:
    try:
        from datasets import DatasetDict, IterableDatasetDict

        if isinstance(data, (DatasetDict, IterableDatasetDict)):
            return dict(data)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, Mapping):
        return dict(data)
    return {None: data}


def check_preference_row(row, index: int, name: str = "dataset") -> None:
    """Raise ``ValueError`` when ``row`` (number ``index`` of ``name``) is not a valid preference conversation;
    the message names the row (index and ``conversation_id``), the turn, the field and the fix. See
    :func:`validate_preference_rows` for the checks."""
    conv = row.get("conversation_id") if isinstance(row, Mapping) else None
    where = f"{name} row {index}" + (f" (conversation_id {conv!r})" if conv is not None else "")
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} is a {type(row).__name__}, not a mapping with an 'interactions' list.")
    turns = row.get("interactions")
    if turns is None or isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise ValueError(
            f"{where}: 'interactions' is {turns!r}; it must be a list of {{query, chosen, rejected}}. "
            "Fix: repair or drop the row (e.g. dataset.filter(...))."
        )
    if len(turns) == 0:
        raise ValueError(
            f"{where}: 'interactions' is empty (a conversation without turns). Fix: drop the row "
            "(e.g. dataset.filter(lambda r: len(r['interactions']) > 0))."
        )
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}, turn {t}: {turn!r} is not a mapping with query / chosen / rejected.")
        for field_name in TURN_FIELDS:
            value = turn.get(field_name)
            if value is None:
                raise ValueError(
                    f"{where}, turn {t}: {field_name!r} is missing; every turn needs non-empty 'query', "
                    "'chosen' and 'rejected' strings. Fix: repair or drop the row."
                )
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}, turn {t}: {field_name!r} is empty ({value!r}); every turn needs non-empty "
                    "'query', 'chosen' and 'rejected' strings. Fix: repair or drop the row."
                )
        if turn["chosen"].strip() == turn["rejected"].strip():
            raise ValueError(
                f"{where}, turn {t}: 'chosen' and 'rejected' are the same text ({turn['chosen']!r}); a pair "
                "needs two different answers. Fix: repair or drop the row."
            )
    for column in PER_TURN_COLUMNS:
        values = row.get(column)
        if values is not None and len(values) != len(turns):
            raise ValueError(
                f"{where}: {column!r} has {len(values)} entries but 'interactions' has {len(turns)} turns; "
                "it needs one entry per turn."
            )


def validate_preference_rows(data, name: str = "dataset") -> None:
    """Raise ``ValueError`` naming the row (index and ``conversation_id``), the turn and the field when a row is
    not a valid preference conversation.

    Checked: ``interactions`` is a non-empty list; every turn is a mapping with non-empty strings ``query``,
    ``chosen`` and ``rejected``, and ``chosen != rejected``; the optional per-turn columns
    (``recall_distance``, ``answer_keywords``, ``rejection_type``, ``turn_type``) have one entry per turn.
    ``data`` is a ``datasets.Dataset``, a ``DatasetDict`` (every split) or a list of dicts.
    """
    for split, part in _splits(data).items():
        where_split = name if split is None else f"{name}[{split!r}]"
        columns = getattr(part, "column_names", None)
        if columns is not None and "interactions" not in columns:
            raise ValueError(
                f"{where_split} has no 'interactions' column (columns: {list(columns)}); preference data needs "
                "interactions: [{query, chosen, rejected}] per row. Fix: rename your column with "
                "column_mapping={'<your column>': 'interactions'}."
            )
        for index, row in enumerate(part):
            check_preference_row(row, index, where_split)


# --------------------------------------------------------------------------------------------------
# loading and conversion


def load_preference_dataset(source: str | None = "synthetic", split: str | None = None,
                            column_mapping: dict[str, str] | None = None, **kwargs):
    """Preference data from the embedded generator (``source`` ``None`` / ``"synthetic"``: ``kwargs`` go to
    :func:`build_preference_dataset`), a local ``.jsonl`` / ``.json`` / ``.parquet`` file or folder, or a Hub
    data set name; columns renamed with ``column_mapping``; every row validated
    (:func:`validate_preference_rows`). Returns a ``DatasetDict`` (or one split with ``split=``)."""
    from .data import load_rxt_dataset

    data = load_rxt_dataset(source, "preference", split=split, column_mapping=column_mapping, **kwargs)
    validate_preference_rows(data, name=f"preference data from source={source!r}")
    return data


def preference_to_multi_turn(data):
    """Preference rows -> multi-turn rows (``query`` / ``answer`` / ``interactions: [{query, answer}]`` with the
    chosen answers, plus ``recall_distance`` / ``answer_keywords`` for the follow-ups when present): the input
    of ``MRLTrainer`` / the online RxRLHF variant and of ``evaluate_memory``. Works on a ``Dataset``,
    ``DatasetDict`` or list of dicts."""
    def convert(row):
        turns = list(row["interactions"])
        out = {
            "query": turns[0]["query"], "answer": turns[0]["chosen"],
            "interactions": [{"query": t["query"], "answer": t["chosen"]} for t in turns[1:]],
        }
        for column in ("recall_distance", "answer_keywords"):
            if row.get(column) is not None:
                out[column] = list(row[column])[1:]
        out["conversation_id"] = str(row.get("conversation_id") or "")
        return out

    if isinstance(data, list):
        return [convert(row) for row in data]
    splits = _splits(data)
    if None in splits:
        return _convert_dataset(data, convert)
    from datasets import DatasetDict

    return DatasetDict({name: _convert_dataset(part, convert) for name, part in splits.items()})


def _convert_dataset(part, convert):
    from datasets import Dataset

    return Dataset.from_list([convert(row) for row in part])
