"""Data loading, tokenisation and collation for the RxT curriculum.

Data set kinds and their required columns (those of the public RxT data sets):

============== ====================================== =========================================
kind           required columns                       used by
============== ====================================== =========================================
pretraining    ``text``                               stage 1 (joint LM pre-training)
interaction-sft ``query``, ``answer``                 stage 2 (joint interaction SFT)
multi-turn     ``query``, ``answer``, ``interactions`` stages 3-5 (``interactions`` is a list of
                                                      ``{query, answer}`` following the first
                                                      interaction)
preference     ``interactions``                       stage 6 (RxRLHF; every turn is
                                                      ``{query, chosen, rejected}``)
============== ====================================== =========================================

:func:`load_rxt_dataset` loads the embedded synthetic set, local JSONL / JSON / Parquet files or a
Hub data set, renames columns and validates them.

Interaction template (one interaction per sequence; earlier turns live in the STM, never in the
prompt, unlike a Llama chat prompt that flattens the whole history)::

    [BOS][Q] query [A] answer [EOS]

The query and the answer are tokenized *separately* without special tokens and framed by
``modeling_rxt.format_rxt.frame_interaction`` (the one implementation of the template, with its
truncation rule), so the ids of a query are the same alone or inside the template.

Collators return torch tensors, pad on the right with the ``[PAD]`` id and put ``-100`` in the
labels on padding. Labels are aligned with ``input_ids`` (Hugging Face convention: the model
shifts them by one inside its loss), and the first position (``[BOS]``) is always ``-100``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rxt_hf.modeling_rxt.format_rxt import (
    IGNORE_INDEX,
    encode_texts,
    frame_interaction,
    pad_grid,
    pad_rows,
    special_token_ids,
)

from .synthetic_data import build_synthetic_dataset

__all__ = [
    "REQUIRED_COLUMNS",
    "load_rxt_dataset",
    "tokenize_interaction",
    "InteractionCollator",
    "TextCollator",
    "ConversationCollator",
]

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "pretraining": ("text",),
    "interaction-sft": ("query", "answer"),
    "multi-turn": ("query", "answer", "interactions"),
    "preference": ("interactions",),  # stage 6 (RxRLHF): interactions: [{query, chosen, rejected}]
}
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in REQUIRED_COLUMNS:
        raise ValueError(f"kind={kind!r} is not a data set kind; use one of {tuple(REQUIRED_COLUMNS)}.")


def _local_data_files(source: str, split_names: Sequence[str] = ()) -> tuple[str, Any]:
    """Return (builder name, data_files) for a local file or directory (``split_names``: file-name stems that
    name splits besides train / validation / test and their aliases, e.g. ``supervised``)."""
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if os.path.splitext(f)[1].lower() in _LOCAL_SUFFIXES
        )
        if not files:
            raise ValueError(
                f"source={source!r} is a directory without .jsonl/.json/.parquet files; point "
                "`source` at a data file, a directory of them, or a Hub data set name."
            )
    else:
        if not os.path.exists(source):
            raise ValueError(f"source={source!r}: no such file; give an existing local "
                             ".jsonl/.json/.parquet path or a Hub data set name.")
        files = [source]
    builders = {_LOCAL_SUFFIXES[os.path.splitext(f)[1].lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(
            f"source={source!r} mixes JSON and Parquet files; keep one format per directory."
        )
    builder = builders.pop()
    # In a directory where some files are named after splits (train.jsonl, validation-0000.parquet,
    # dev.json, or one of split_names), the first word of every file name is its split
    # (train.jsonl + validation.jsonl + supervised.jsonl: three splits, as the Hub set declares them);
    # otherwise (and for a single file) everything is the "train" split, as with
    # datasets.load_dataset(builder, data_files=...).
    by_split: dict[str, list[str]] = {}
    extra = {name.lower(): name for name in split_names}
    stems = {f: re.split(r"[-_.]", os.path.basename(f))[0].lower() for f in files} if os.path.isdir(source) else {}
    if any(stem in _SPLIT_ALIASES or stem in extra for stem in stems.values()):
        for f, stem in stems.items():
            by_split.setdefault(_SPLIT_ALIASES.get(stem) or extra.get(stem) or stem, []).append(f)
    return builder, (by_split or {"train": files})


def _is_local(source: str) -> bool:
    return os.path.exists(source) or os.path.splitext(source)[1].lower() in _LOCAL_SUFFIXES


def _column_names(ds) -> list[str]:
    names = ds.column_names
    if isinstance(names, dict):  # DatasetDict: union over splits, in order
        out: list[str] = []
        for cols in names.values():
            out.extend(c for c in cols if c not in out)
        return out
    return list(names)


def _splits(ds) -> dict[str, Any]:
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        return dict(ds)
    return {"<dataset>": ds}


def _validate(ds, kind: str) -> None:
    for split_name, part in _splits(ds).items():
        if part.column_names is None:  # streaming data set without known columns
            continue
        found = list(part.column_names)
        where = "" if split_name == "<dataset>" else f" (split {split_name!r})"
        for col in REQUIRED_COLUMNS[kind]:
            if col not in found:
                raise ValueError(
                    f"kind={kind!r} needs column {col!r}, which is missing{where}; columns found: "
                    f"{found}. Fix: pass column_mapping={{'<your column>': {col!r}}} to rename a "
                    "column of your data set."
                )
        if kind in ("multi-turn", "preference") and part.features is not None and "interactions" in part.features:
            inner = getattr(part.features["interactions"], "feature", None)
            fields = ("query", "answer") if kind == "multi-turn" else ("query", "chosen", "rejected")
            if isinstance(inner, dict):
                missing = [k for k in fields if k not in inner]
                if missing:
                    raise ValueError(
                        f"column 'interactions'{where} must hold a list of {{{', '.join(fields)}}}; its "
                        f"items have fields {list(inner)} (missing {missing}). Fix: rename the "
                        f"fields of the items (e.g. with Dataset.map) to {' / '.join(map(repr, fields))}."
                    )
            elif inner is not None and not isinstance(inner, dict):
                from datasets import Value

                if isinstance(inner, Value):
                    raise ValueError(
                        f"column 'interactions'{where} must hold a list of {{query, answer}} "
                        f"dicts, got a list of {inner.dtype}."
                    )


def _local_subset(source: str, subset: str) -> str:
    """The sub-folder ``subset`` of the local folder ``source`` (the layout of a Hub data set with configs)."""
    folder = os.path.join(source, subset)
    if not os.path.isdir(folder):
        found = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d))) \
            if os.path.isdir(source) else []
        raise ValueError(
            f"subset={subset!r}: the local source {source!r} has no sub-folder {subset!r} (sub-folders: {found}). "
            "Fix: put the subset's files in <source>/<subset>/ (as a Hub data set with configs lays them out), "
            "or drop the subset."
        )
    return folder


def load_rxt_dataset(source: str | None, kind: str, split: str | None = None,
                     column_mapping: dict[str, str] | None = None, subset: str | None = None,
                     split_names: Sequence[str] = (), **synthetic_kwargs):
    """Load a data set for one curriculum stage, rename its columns and validate them.

    Args:
        source: ``None`` or ``"synthetic"`` for the embedded generator
            (:func:`trainers.synthetic_data.build_synthetic_dataset`); a local ``.jsonl`` /
            ``.json`` / ``.parquet`` file or a directory of them (when some file names start with a
            split name, such as ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``, the first
            word of each file name is its split, e.g. ``supervised.jsonl``; otherwise all files are
            the ``train`` split; a single file is always the ``train`` split); anything else is a Hub
            data set name passed to ``datasets.load_dataset(source, ...)``.
        kind: ``"pretraining"`` (needs ``text``), ``"interaction-sft"`` (``query``, ``answer``),
            ``"multi-turn"`` (``query``, ``answer``, ``interactions``) or ``"preference"``
            (``interactions: [{query, chosen, rejected}]``; the synthetic source is
            :func:`trainers.preference_data.build_preference_dataset`).
        split: return only this split (a ``datasets.Dataset``); ``None`` returns the whole
            ``DatasetDict``.
        column_mapping: ``{old_name: new_name}`` renames applied before validation; the items of
            ``interactions`` must already have ``query`` / ``answer`` fields.
        subset: a Hub data set's config name (``datasets.load_dataset(source, subset)``, e.g.
            ``"steps-6"`` of ``ReactiveAI/TinyStories-MRL``); for a local folder, its sub-folder of that
            name, so a local copy laid out as ``<folder>/steps-6/train.jsonl`` stands in for the Hub set.
        split_names: for a local folder, more file-name stems that mark it as split-named (besides
            train / validation / test and their aliases), e.g. ``("supervised",)`` for a folder that
            holds only ``supervised.jsonl``.
        **synthetic_kwargs: for the synthetic source, arguments of ``build_synthetic_dataset``
            (``num_conversations``, ``num_turns``, ``max_recall_distance``, ``seed``,
            ``split_fractions``, ``same_kind_prob``); for a Hub source, extra ``datasets.load_dataset`` arguments
            (``name``, ``revision`` ...). Not allowed for local files.

    Raises ``ValueError`` for an unknown ``kind`` or ``split``, a column to rename that does not
    exist, or a missing required column (naming it, the columns found and the fix).
    """
    _check_kind(kind)
    import datasets

    if subset is not None and (source is None or source == "synthetic"):
        raise ValueError(
            f"subset={subset!r} needs a Hub data set or a local folder as source (got source={source!r}); "
            "drop the subset for the synthetic data."
        )
    if (source is None or source == "synthetic") and kind == "preference":
        from .preference_data import build_preference_dataset

        ds = build_preference_dataset(**synthetic_kwargs)
    elif source is None or source == "synthetic":
        ds = build_synthetic_dataset(kind, **synthetic_kwargs)
    elif _is_local(source):
        if synthetic_kwargs:
            raise ValueError(
                f"unexpected arguments {sorted(synthetic_kwargs)} for the local source "
                f"{source!r}; they only apply to source=None/'synthetic' or a Hub data set."
            )
        folder = _local_subset(source, subset) if subset is not None else source
        builder, data_files = _local_data_files(folder, split_names)
        ds = datasets.load_dataset(builder, data_files=data_files)
    else:  # Hub data set name
        ds = datasets.load_dataset(source, subset, split=split, **synthetic_kwargs)

    if split is not None and isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ValueError(
                f"split={split!r} is not in the data set from source={source!r}; available "
                f"splits: {list(ds)}. Fix: pass one of them, or split=None for all."
            )
        ds = ds[split]

    if column_mapping:
        found = _column_names(ds)
        for old in column_mapping:
            if old not in found:
                raise ValueError(
                    f"column_mapping renames {old!r}, which is not a column; columns found: "
                    f"{found}. Fix: use the data set's column names as the mapping's keys."
                )
        ds = ds.rename_columns(dict(column_mapping))
    _validate(ds, kind)
    return ds


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def tokenize_interaction(tokenizer, query: str, answer: str, max_length: int,
                         padding: bool = False) -> dict:
    """Tokenize one interaction as ``[BOS][Q] query [A] answer [EOS]``.

    Query and answer are tokenized separately with ``add_special_tokens=False`` and concatenated
    with the special ids. If too long, the answer is truncated first (down to nothing), then the
    query; ``[A]`` and ``[EOS]`` are always kept.

    Returns a dict of lists: ``input_ids``, ``attention_mask``, ``labels_answer_only`` (``-100``
    on the ``[BOS][Q] query [A]`` prefix and on padding; answer tokens and ``[EOS]`` kept) and
    ``query_length`` (an int: the length of the prefix ``[BOS][Q] query [A]``, i.e. the prompt a
    decoder generates from). With ``padding=True`` the lists are right-padded to ``max_length``
    with ``[PAD]``.
    """
    ids = special_token_ids(tokenizer)
    q_ids, a_ids = encode_texts(tokenizer, [query, answer])
    framed = frame_interaction(ids, q_ids, a_ids, max_length=max_length, truncate=True)
    input_ids, labels, qlen = framed.input_ids, framed.labels, framed.prompt_length
    mask = [1] * len(input_ids)
    if padding:
        extra = max_length - len(input_ids)
        input_ids = input_ids + [ids["pad_token_id"]] * extra
        mask = mask + [0] * extra
        labels = labels + [IGNORE_INDEX] * extra
    return {"input_ids": input_ids, "attention_mask": mask, "labels_answer_only": labels,
            "query_length": qlen}


# --------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------


@dataclass
class InteractionCollator:
    """Collate single interactions (stage 2) into padded tensors.

    Each example is either ``{"query", "answer"}`` (tokenized here) or the output of
    :func:`tokenize_interaction` (``input_ids``, ``labels_answer_only`` ...). An optional
    ``recall_distance`` per example drives ``recall_weight``.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]``, ``query_length`` ``[B]``
    and, if ``recall_weight`` is set, ``loss_weights`` ``[B, T]``: ``recall_weight`` on the
    answer tokens (answer + ``[EOS]``) of recall examples (``recall_distance > 0``), 1 elsewhere.

    ``labels``: answer tokens + ``[EOS]`` only if ``answer_only_loss`` (default), otherwise every
    non-pad token after the first; ``-100`` elsewhere.
    """

    tokenizer: Any
    max_length: int = 256
    answer_only_loss: bool = True
    recall_weight: float | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = special_token_ids(self.tokenizer)
        rows = _interaction_rows(self.tokenizer, examples, self.max_length, ids)
        batch = _pad_rows(rows, ids["pad_token_id"], self.pad_to_multiple_of, self.answer_only_loss)
        distances = torch.tensor([int(ex.get("recall_distance", 0) or 0) for ex in examples],
                                 dtype=torch.long)  # [B]
        if any("recall_distance" in ex for ex in examples):
            batch["recall_distance"] = distances
        if self.recall_weight is not None:
            batch["loss_weights"] = _loss_weights(batch["answer_mask"], distances,
                                                  self.recall_weight)
        del batch["answer_mask"]
        return batch


def _interaction_rows(tokenizer, examples, max_length, ids) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels_answer_only, query_length) per example, tokenizing the raw ones in one call."""
    rows: list = [None] * len(examples)
    todo = []
    for i, ex in enumerate(examples):
        if "input_ids" in ex:
            input_ids = list(ex["input_ids"])
            if "attention_mask" in ex:  # drop padding of pre-padded examples
                input_ids = [t for t, m in zip(input_ids, ex["attention_mask"]) if m]
            labels = ex.get("labels_answer_only")
            if labels is None or ex.get("query_length") is None:
                raise ValueError(
                    "a pre-tokenized example needs 'labels_answer_only' and 'query_length' "
                    "(the output of tokenize_interaction); or pass raw 'query' and 'answer'."
                )
            rows[i] = (input_ids, list(labels)[: len(input_ids)], int(ex["query_length"]))
        elif "query" in ex and "answer" in ex:
            todo.append(i)
        else:
            raise ValueError(
                f"an interaction example needs 'query' and 'answer' (or 'input_ids'); got keys "
                f"{sorted(ex)}. Fix: load the data with load_rxt_dataset(..., column_mapping=...)."
            )
    if todo:
        enc = encode_texts(tokenizer, [t for i in todo for t in (examples[i]["query"], examples[i]["answer"])])
        for j, i in enumerate(todo):
            framed = frame_interaction(ids, enc[2 * j], enc[2 * j + 1], max_length=max_length, truncate=True)
            rows[i] = (framed.input_ids, framed.labels, framed.prompt_length)
    return rows


def _pad_rows(rows, pad_id: int, multiple: int | None, answer_only: bool) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels_answer_only, query_length) rows into [B, T] tensors (``T`` rounded up to
    ``multiple``)."""
    input_ids, attention = pad_rows([r[0] for r in rows], pad_id, multiple_of=multiple)  # [B, T]
    labels, _ = pad_rows([r[1] for r in rows], IGNORE_INDEX, length=input_ids.shape[1])  # [B, T]
    answer_mask = labels != IGNORE_INDEX  # [B, T]
    if not answer_only:  # a loss on every real token but the first
        labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
        labels[:, :1] = IGNORE_INDEX
    query_length = torch.tensor([r[2] for r in rows], dtype=torch.long)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "query_length": query_length, "answer_mask": answer_mask}


def _loss_weights(answer_mask: torch.Tensor, distances: torch.Tensor,
                  recall_weight: float) -> torch.Tensor:
    """``recall_weight`` on answer tokens of recall turns, 1 elsewhere; shape of answer_mask."""
    recall = (distances > 0).view(*distances.shape, *([1] * (answer_mask.dim() - distances.dim())))
    weights = torch.ones(answer_mask.shape, dtype=torch.float32)
    return torch.where(answer_mask & recall, torch.full_like(weights, float(recall_weight)),
                       weights)


@dataclass
class TextCollator:
    """Collate plain text (stage 1): ``[BOS] text [EOS]``, text truncated to fit ``max_length``.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]``; labels are every non-pad
    token after the first (``-100`` on ``[BOS]`` and padding). Masking for the encoder's MLM loss
    is left to the trainer.
    """

    tokenizer: Any
    max_length: int = 256
    text_column: str = "text"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 ([BOS] and [EOS]).")
        ids = special_token_ids(self.tokenizer)
        texts = []
        for ex in examples:
            if self.text_column not in ex:
                raise ValueError(
                    f"a text example needs column {self.text_column!r}; got keys {sorted(ex)}. "
                    "Fix: set text_column or rename with load_rxt_dataset(column_mapping=...)."
                )
            texts.append(ex[self.text_column])
        rows = []
        for tok in encode_texts(self.tokenizer, texts):
            seq = [ids["bos_token_id"], *tok[: self.max_length - 2], ids["eos_token_id"]]
            rows.append((seq, [IGNORE_INDEX] + seq[1:], 0))  # labels: every token but [BOS]
        batch = _pad_rows(rows, ids["pad_token_id"], self.pad_to_multiple_of, answer_only=True)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


@dataclass
class ConversationCollator:
    """Collate multi-turn rows (stages 3-5) into ``[B, N, T]`` tensors, one interaction per turn.

    A row is ``{"query", "answer", "interactions": [{query, answer}, ...]}`` with optional
    ``recall_distance`` / ``answer_keywords`` (one entry per follow-up) and ``conversation_id``;
    turn 0 is the row's ``query``/``answer``, turns 1.. are ``interactions``. A row without a
    top-level ``query`` is read as the output of ``generate_conversations`` (all turns in
    ``interactions``, metadata inside each turn).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[B, N, T]`` (labels answer-only, ``-100``
        on prefixes, padding and missing turns); ``query_length`` ``[B, N]``;
        ``turn_mask`` ``[B, N]`` (1 where the conversation has that turn: conversations may have
        different numbers of turns); ``recall_distance`` ``[B, N]`` (0 for non-recall turns);
        ``answer_keywords`` (python list ``[B][N]`` of lists of words, ``[]`` where none);
        ``conversation_id`` (python list) when the rows have one; and with ``recall_weight``,
        ``loss_weights`` ``[B, N, T]`` (``recall_weight`` on answer tokens of recall turns, 1
        elsewhere). ``max_turns`` keeps only the first turns of each conversation (e.g. for a
        turn-length curriculum).
    """

    tokenizer: Any
    max_length: int = 256
    recall_weight: float | None = None
    max_turns: int | None = None
    pad_to_multiple_of: int | None = None

    def _turns(self, row: dict) -> tuple[list[dict], list[int], list[list[str]]]:
        if "query" in row:
            if "answer" not in row or "interactions" not in row:
                raise ValueError(
                    f"a multi-turn row needs 'query', 'answer' and 'interactions'; got keys "
                    f"{sorted(row)}. Fix: load_rxt_dataset(..., kind='multi-turn', "
                    "column_mapping=...)."
                )
            follow = list(row["interactions"] or [])
            turns = [{"query": row["query"], "answer": row["answer"]}, *follow]
            dist = row.get("recall_distance")
            kws = row.get("answer_keywords")
            for name, value in (("recall_distance", dist), ("answer_keywords", kws)):
                if value is not None and len(value) != len(follow):
                    raise ValueError(
                        f"{name} has {len(value)} entries but the row has {len(follow)} "
                        "follow-up interactions; it needs one entry per follow-up."
                    )
            dist = [0] + [int(d or 0) for d in dist] if dist is not None else [0] * len(turns)
            kws = [[]] + [list(k or []) for k in kws] if kws is not None else [[]] * len(turns)
        elif "interactions" in row:
            turns = list(row["interactions"])
            dist = [int(t.get("recall_distance", 0) or 0) for t in turns]
            kws = [list(t.get("answer_keywords") or []) for t in turns]
        else:
            raise ValueError(
                f"a multi-turn row needs 'query', 'answer' and 'interactions'; got keys "
                f"{sorted(row)}."
            )
        if self.max_turns is not None:
            turns, dist, kws = (x[: self.max_turns] for x in (turns, dist, kws))
        return turns, dist, kws

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        ids = special_token_ids(self.tokenizer)
        per_row = [self._turns(row) for row in rows]
        b = len(rows)
        n = max((len(t) for t, _, _ in per_row), default=0)
        cells = [(i, k) for i, (turns, _, _) in enumerate(per_row) for k in range(len(turns))]  # (row, turn)
        flat = [turn for turns, _, _ in per_row for turn in turns]
        encoded = dict(zip(cells, _interaction_rows(self.tokenizer, flat, self.max_length, ids)))
        input_ids, attention = pad_grid({c: r[0] for c, r in encoded.items()}, (b, n), ids["pad_token_id"],
                                        multiple_of=self.pad_to_multiple_of)  # [B, N, T]
        labels, _ = pad_grid({c: r[1] for c, r in encoded.items()}, (b, n), IGNORE_INDEX,
                             length=input_ids.shape[-1])  # [B, N, T]
        qlens = torch.zeros((b, n), dtype=torch.long)      # [B, N]
        turn_mask = torch.zeros((b, n), dtype=torch.long)  # [B, N]
        distances = torch.zeros((b, n), dtype=torch.long)  # [B, N]
        for (i, k), row in encoded.items():
            qlens[i, k] = row[2]
        keywords: list[list[list[str]]] = []
        for i, (turns, dist, kws) in enumerate(per_row):
            m = len(turns)
            turn_mask[i, :m] = 1
            distances[i, :m] = torch.tensor(dist, dtype=torch.long)
            keywords.append([list(x) for x in kws] + [[] for _ in range(n - m)])
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "query_length": qlens,
            "turn_mask": turn_mask,
            "recall_distance": distances,
            "answer_keywords": keywords,
        }
        if all("conversation_id" in row for row in rows):
            batch["conversation_id"] = [row["conversation_id"] for row in rows]
        if self.recall_weight is not None:
            batch["loss_weights"] = _loss_weights(labels != IGNORE_INDEX, distances, self.recall_weight)
        return batch
