"""Reward functions for Memory Reinforcement Learning, with TRL's reward-function signature.

Every reward is a plain callable ``reward(prompts, completions, **kwargs) -> list[float | None]``, called the
way TRL's ``GRPOTrainer`` calls custom reward functions::

    reward(prompts=prompts, completions=completions, completion_ids=completion_ids,
           **dataset_columns, trainer_state=..., log_extra=..., log_metric=...)

where ``completion_ids`` is a list of token-id lists and every other dataset column comes as a list with one
entry per completion. ``None`` means "no value for this completion" (TRL turns it into NaN and ignores it).

The rewards of the MRL recipe (the configurable weighted sum of the RxT paper's MRL stage):

- :data:`reference_bleu_reward`: TensorBLEU of the completion against the reference answer
  (``reference_ids``, or the text column ``reference`` / ``answer``);
- :data:`memory_bleu_reward`: TensorBLEU against the remembered interaction(s) the question refers to
  (``memory_ids``: one id list or a list of them per completion, used as multiple references; or the text
  column ``memory``), i.e. how much of the saved information the answer carries;
- :func:`embedding_similarity_reward`: a factory for the cosine similarity of the mean token embeddings of
  completion and reference (``embedding`` is the model's shared ``nn.Embedding``);
- :data:`length_reward`: ``max(0, 1 - |len(completion) - len(reference)| / len(reference))``;
- :func:`keyword_recall_reward`: the fraction of the remembered fact's key words (``answer_keywords``, the
  words the evaluation's recall accuracy checks) that the completion contains; ``None`` for a turn that asks
  for no fact;
- :class:`CombinedReward`: their weighted sum, keeping the last per-component values for logging.

Build variants with :func:`make_bleu_reward` and :func:`make_length_reward`; any function with the signature
above can be added to a :class:`CombinedReward`. When token ids are not available the rewards fall back to
whitespace words of the texts (BLEU on words, as sacrebleu with ``tokenize="none"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .evaluation import keywords_match
from rxt_hf.modeling_rxt.format_rxt import pad_rows

from .tensorbleu import SMOOTHING_METHODS, tensor_sentence_bleu

__all__ = [
    "CombinedReward",
    "RewardFunction",
    "embedding_similarity_reward",
    "keyword_recall_reward",
    "length_reward",
    "make_bleu_reward",
    "make_length_reward",
    "memory_bleu_reward",
    "reference_bleu_reward",
]

RewardFunction = Callable[..., list]
"""``(prompts, completions, **kwargs) -> list[float | None]``: TRL's custom reward-function signature."""

REFERENCE_TEXT_KEYS = ("reference", "answer")
MEMORY_TEXT_KEYS = ("memory",)


# --------------------------------------------------------------------------------------------------
# Helpers: get token sequences out of TRL's arguments
# --------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or a conversational list of messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence):
        return " ".join(completion_text(m) for m in completion)
    return str(completion)


def _to_id_list(seq: Any) -> list[int]:
    if isinstance(seq, torch.Tensor):
        return [int(t) for t in seq.reshape(-1).tolist()]
    return [int(t) for t in seq]


def _is_flat(seq: Any) -> bool:
    """True for one id sequence, False for a list of id sequences."""
    if isinstance(seq, torch.Tensor):
        return seq.dim() <= 1
    return len(seq) == 0 or not isinstance(seq[0], (list, tuple, torch.Tensor))


def _strip(ids: list[int], drop: frozenset[int]) -> list[int]:
    return [t for t in ids if t not in drop] if drop else ids


class _WordVocab:
    """Maps whitespace words to ids, shared by completions and targets of one call."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids)) for w in str(text).split()]


def _column(kwargs: Mapping[str, Any], id_key: str, text_keys: Sequence[str]) -> tuple[str, list] | None:
    """The first available target column: ``("ids", values)`` or ``("text", values)``."""
    if kwargs.get(id_key) is not None:
        return "ids", list(kwargs[id_key])
    for key in text_keys:
        if kwargs.get(key) is not None:
            return "text", list(kwargs[key])
    return None


def _sequences(
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | None,
    kwargs: Mapping[str, Any],
    id_key: str,
    text_keys: Sequence[str],
    drop: frozenset[int],
    multi: bool,
) -> tuple[list[list[int]], list[list[list[int]] | None]]:
    """Completion id lists and, per completion, a list of target id lists (``None`` when it has none).

    Token ids are used when both the completion ids and the target ids are available; otherwise both sides
    are taken as whitespace words of the texts.
    """
    found = _column(kwargs, id_key, text_keys)
    if found is None:
        names = ", ".join([id_key, *text_keys])
        raise KeyError(f"this reward needs one of the dataset columns: {names}")
    kind, values = found
    if len(values) != len(completions):
        raise ValueError(f"got {len(values)} targets for {len(completions)} completions")
    if kind == "ids" and completion_ids is not None:
        cands = [_strip(_to_id_list(c), drop) for c in completion_ids]
        targets: list[list[list[int]] | None] = []
        for v in values:
            if v is None:
                targets.append(None)
            elif _is_flat(v) or not multi:
                targets.append([_strip(_to_id_list(v), drop)])
            else:
                targets.append([_strip(_to_id_list(s), drop) for s in v])
        return cands, targets
    if kind == "ids":  # ids for the targets but only texts for the completions: cannot compare
        text_found = next((k for k in text_keys if kwargs.get(k) is not None), None)
        if text_found is None:
            raise KeyError(f"'{id_key}' needs `completion_ids` (or provide a text column: {', '.join(text_keys)})")
        values = list(kwargs[text_found])
    vocab = _WordVocab()
    cands = [vocab(completion_text(c)) for c in completions]
    targets = []
    for v in values:
        if v is None:
            targets.append(None)
        elif isinstance(v, str) or not multi:
            targets.append([vocab(completion_text(v))])
        else:
            targets.append([vocab(completion_text(s)) for s in v])
    return cands, targets


# --------------------------------------------------------------------------------------------------
# BLEU rewards
# --------------------------------------------------------------------------------------------------


def make_bleu_reward(
    id_key: str = "reference_ids",
    text_keys: Sequence[str] = REFERENCE_TEXT_KEYS,
    *,
    max_order: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str = "exp",
    smooth_value: float | None = None,
    ignore_ids: Iterable[int] = (),
    name: str | None = None,
) -> RewardFunction:
    """A TensorBLEU reward (in ``[0, 1]``) of each completion against the target column ``id_key``.

    The target of a completion is one id list or a list of id lists (multiple references: clipping by the
    reference that has the n-gram most often, brevity penalty from the closest length). Without
    ``completion_ids`` / ``id_key`` the first present text column of ``text_keys`` is compared on words.
    ``ignore_ids`` (for example EOS / pad) are removed from both sides first. Completions whose target is
    ``None`` get ``None``. Smoothing defaults to ``"exp"`` (sacrebleu's sentence-BLEU default), so a partly
    right short answer still earns a graded reward.
    """
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing must be one of {sorted(SMOOTHING_METHODS)}, got {smoothing!r}")
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    if weights is not None and len(weights) != max_order:
        raise ValueError(f"weights must have max_order={max_order} entries, got {len(weights)}")
    drop = frozenset(int(t) for t in ignore_ids)
    text_keys = tuple(text_keys)

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        cands, targets = _sequences(completions, completion_ids, kwargs, id_key, text_keys, drop, multi=True)
        rows = [i for i, t in enumerate(targets) if t is not None]
        out: list[float | None] = [None] * len(cands)
        if rows:
            scores = tensor_sentence_bleu(
                [cands[i] for i in rows],
                [targets[i] for i in rows],
                max_order=max_order,
                weights=weights,
                smoothing=smoothing,
                smooth_value=smooth_value,
            )
            for i, s in zip(rows, scores.tolist()):
                out[i] = float(s)
        return out

    reward.__name__ = reward.__qualname__ = name or f"bleu_{id_key.removesuffix('_ids')}"
    return reward


reference_bleu_reward = make_bleu_reward("reference_ids", REFERENCE_TEXT_KEYS, name="reference_bleu")
"""BLEU (exp smoothing) of the completion against the reference answer (``reference_ids`` or its text)."""

memory_bleu_reward = make_bleu_reward("memory_ids", MEMORY_TEXT_KEYS, name="memory_bleu")
"""BLEU (exp smoothing) of the completion against the remembered interaction(s) (``memory_ids`` or ``memory``)."""


# --------------------------------------------------------------------------------------------------
# Embedding similarity
# --------------------------------------------------------------------------------------------------


def embedding_similarity_reward(
    embedding: nn.Embedding | torch.Tensor,
    id_key: str = "reference_ids",
    *,
    ignore_ids: Iterable[int] = (),
    rescale: bool = False,
    name: str = "embedding_similarity",
) -> RewardFunction:
    """A reward: cosine similarity of the mean token embedding of the completion and of the target.

    ``embedding`` is an ``nn.Embedding`` (for example the model's shared embedding; it is read at call time,
    so the reward follows training) or a ``[vocab, dim]`` weight tensor. Needs token ids on both sides
    (``completion_ids`` and the column ``id_key``; with several targets their mean is used). Values lie in
    ``[-1, 1]``, or ``[0, 1]`` with ``rescale=True``; an empty completion or target scores 0 (0.5 rescaled).
    Computed without gradients, in one batched gather.
    """
    weight_of = (lambda: embedding.weight) if isinstance(embedding, nn.Module) else (lambda: embedding)
    drop = frozenset(int(t) for t in ignore_ids)

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        if completion_ids is None or kwargs.get(id_key) is None:
            raise KeyError(f"{name} needs `completion_ids` and the dataset column '{id_key}'")
        values = list(kwargs[id_key])
        if len(values) != len(completion_ids):
            raise ValueError(f"got {len(values)} targets for {len(completion_ids)} completions")
        weight = weight_of().detach()
        cands = [_strip(_to_id_list(c), drop) for c in completion_ids]
        targets = [
            None if v is None else _strip([t for s in ([v] if _is_flat(v) else v) for t in _to_id_list(s)], drop)
            for v in values
        ]
        rows = [i for i, t in enumerate(targets) if t is not None]
        out: list[float | None] = [None] * len(cands)
        if not rows:
            return out
        with torch.no_grad():
            c_mean = _mean_embeddings([cands[i] for i in rows], weight)
            t_mean = _mean_embeddings([targets[i] for i in rows], weight)
            sim = torch.nn.functional.cosine_similarity(c_mean, t_mean, dim=-1, eps=1e-8)
            empty = (c_mean.norm(dim=-1) == 0) | (t_mean.norm(dim=-1) == 0)
            sim = torch.where(empty, torch.zeros_like(sim), sim)
            if rescale:
                sim = (sim + 1.0) / 2.0
        for i, s in zip(rows, sim.float().tolist()):
            out[i] = float(s)
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward


def _mean_embeddings(seqs: list[list[int]], weight: torch.Tensor) -> torch.Tensor:
    """``[N, dim]`` mean embedding of each id list (zeros for an empty one), in one gather."""
    ids, mask = pad_rows(seqs, 0, device=weight.device)
    mask = mask.to(weight.dtype)
    summed = (weight[ids] * mask.unsqueeze(-1)).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------------------------------
# Length
# --------------------------------------------------------------------------------------------------


def make_length_reward(
    id_key: str = "reference_ids",
    text_keys: Sequence[str] = REFERENCE_TEXT_KEYS,
    *,
    tolerance: int = 0,
    ignore_ids: Iterable[int] = (),
    name: str = "length",
) -> RewardFunction:
    """A reward penalising the deviation of the completion length from the reference length.

    ``max(0, 1 - max(|len(c) - len(r)| - tolerance, 0) / max(len(r), 1))``: 1 within ``tolerance`` tokens,
    falling linearly to 0 once the gap reaches the reference length. Lengths in tokens (``completion_ids``
    and ``id_key``) or words (texts); with several targets the closest length counts.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    drop = frozenset(int(t) for t in ignore_ids)
    text_keys = tuple(text_keys)

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        cands, targets = _sequences(completions, completion_ids, kwargs, id_key, text_keys, drop, multi=True)
        out: list[float | None] = []
        for cand, refs in zip(cands, targets):
            if refs is None:
                out.append(None)
                continue
            gap, ref_len = min((abs(len(cand) - len(r)), len(r)) for r in refs)
            out.append(max(0.0, 1.0 - max(gap - tolerance, 0) / max(ref_len, 1)))
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward


length_reward = make_length_reward()
"""Length reward against the reference answer (``reference_ids`` or its text), no tolerance."""


# --------------------------------------------------------------------------------------------------
# Key words of the remembered fact
# --------------------------------------------------------------------------------------------------


def keyword_recall_reward(prompts, completions, answer_keywords=None, **kwargs) -> list[float | None]:
    """Fraction of the key words in ``answer_keywords`` (one list per completion) found in the completion text
    as whole words, case-insensitively (the test of :func:`trainers.evaluation.keywords_match`); ``None`` where
    a completion has no key words (the turn recalls nothing)."""
    if answer_keywords is None:
        raise KeyError("keyword_recall_reward needs the dataset column answer_keywords (one list per completion)")
    if len(answer_keywords) != len(completions):
        raise ValueError(f"got {len(answer_keywords)} answer_keywords lists for {len(completions)} completions")
    out: list[float | None] = []
    for completion, keywords in zip(completions, answer_keywords):
        keywords = [k for k in (keywords or []) if str(k).strip()]
        if not keywords:
            out.append(None)
            continue
        text = completion_text(completion)
        out.append(sum(keywords_match(text, [k]) for k in keywords) / len(keywords))
    return out


REWARDS_BY_NAME: dict[str, RewardFunction] = {
    "reference_bleu": reference_bleu_reward,
    "memory_bleu": memory_bleu_reward,
    "length": length_reward,
    "keyword_recall": keyword_recall_reward,
}
"""The reward functions a config can name (``MRLConfig.reward_functions``)."""


# --------------------------------------------------------------------------------------------------
# Weighted sum
# --------------------------------------------------------------------------------------------------


class CombinedReward:
    """Weighted sum of reward functions, itself a TRL reward function.

    ``CombinedReward(weights={"bleu": 1.0, "memory": 0.5}, functions={"bleu": reference_bleu_reward,
    "memory": memory_bleu_reward})``. After each call, ``last_components`` holds every component's values
    (``None`` where a component has no value; such a component is left out of that completion's sum) and
    ``last_total`` the sums; :meth:`summary` gives mean / std per component for logging. If TRL passes
    ``log_metric``, the component means are also logged as ``rewards/<name>/mean`` (set
    ``log_components=False`` to disable). A completion with no component value at all gets ``None``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        functions: Mapping[str, RewardFunction],
        name: str = "combined_reward",
        log_components: bool = True,
    ):
        if not functions:
            raise ValueError("CombinedReward needs at least one function")
        unknown = sorted(set(weights) - set(functions))
        missing = sorted(set(functions) - set(weights))
        if unknown or missing:
            raise ValueError(
                "weights and functions must name the same components "
                f"(no function for {unknown}, no weight for {missing})"
            )
        for key, fn in functions.items():
            if not callable(fn):
                raise TypeError(f"reward function '{key}' is not callable")
        for key, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(float(w)):
                raise ValueError(f"weight of '{key}' must be a finite number, got {w!r}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.functions = dict(functions)
        self.log_components = log_components
        self.__name__ = name
        self.last_components: dict[str, list[float | None]] = {}
        self.last_total: list[float | None] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        components: dict[str, list[float | None]] = {}
        for key, fn in self.functions.items():
            values = list(fn(prompts=prompts, completions=completions, **kwargs))
            if len(values) != n:
                raise ValueError(f"reward '{key}' returned {len(values)} values for {n} completions")
            components[key] = [
                None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values
            ]
        total: list[float | None] = []
        for i in range(n):
            parts = [self.weights[k] * vals[i] for k, vals in components.items() if vals[i] is not None]
            total.append(sum(parts) if parts else None)
        self.last_components, self.last_total = components, total
        log_metric = kwargs.get("log_metric")
        if self.log_components and callable(log_metric):
            for key, stats in self.summary().items():
                if not math.isnan(stats["mean"]):
                    log_metric(f"rewards/{key}/mean", stats["mean"])
        return total

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and (population) std of each component's last values, ignoring ``None`` (NaN if none)."""
        out = {}
        for key, values in self.last_components.items():
            xs = [v for v in values if v is not None]
            if xs:
                mean = sum(xs) / len(xs)
                std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
            else:
                mean = std = float("nan")
            out[key] = {"mean": mean, "std": std}
        return out

    def __repr__(self) -> str:
        return f"CombinedReward(weights={self.weights}, functions={list(self.functions)})"
