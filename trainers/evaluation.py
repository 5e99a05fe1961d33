"""Memory evaluation of an RxT model on multi-turn conversations (used by ``rxt eval``).

:func:`evaluate_memory` plays every conversation turn by turn, the way a chat would: the model
answers each query greedily reading its Short-Term Memory (STM), then the interaction
``[BOS][Q] query [A] answer [EOS]`` is written into the STM. It reports

- **answer perplexity**: ``exp`` of the mean cross-entropy of the *reference* answer tokens (and
  the closing ``[EOS]``), teacher-forced in one forward pass given the query and the current STM,
  averaged over every answer token of every turn;
- **recall accuracy by distance**: on turns that ask for a fact planted ``d`` turns earlier
  (``recall_distance > 0``), the generated answer is correct when it contains every word of
  ``answer_keywords`` (case-insensitive, whole words);
- the same numbers for a **no-memory control**: the same model with the STM reset to a fresh
  ``init_memory`` before every turn. The control runs in the same batch as the memory run (two STMs
  per conversation), so both see exactly the same queries and settings.

Conversations are processed in groups of ``batch_size``; turn ``k`` of every conversation of a
group that still has one is answered in one batched ``generate`` call (queries left-padded), so a
conversation's result does not depend on the batch it is in.

Rows use the multi-turn layout of the embedded data (and the public RxT data sets): ``query``,
``answer``, ``interactions: [{query, answer}]``, and optionally ``recall_distance`` and
``answer_keywords`` (one entry per follow-up interaction; the first turn is never a recall turn).
Without them only perplexity is measured. With the optional ``fact_keys`` column of the embedded data (one
``"kind:key"`` per turn, the first included, ``""`` where no fact is planted or asked for) recall is also split
by fact kind and by whether another fact of the asked kind (a second gift, a second friend's town) was planted
before the question: the questions that test the binding of a key to its value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from rxt_hf.modeling_rxt.conversation_rxt import ConversationBatch
from rxt_hf.modeling_rxt.format_rxt import encode_interaction, special_token_ids

__all__ = ["evaluate_memory", "format_evaluation_table", "keywords_match"]

_WORD_RE = re.compile(r"[A-Za-z0-9]+")
MEMORY_SOURCES = ("generated", "reference")


# ----------------------------------------------------------------------------------------------
# scoring helpers


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text)]


def keywords_match(text: str, keywords: Iterable[str]) -> bool:
    """True when every keyword occurs in ``text`` as whole word(s), case-insensitively.

    A keyword of several words must occur as that contiguous word sequence. An empty keyword
    list never matches (there is nothing to recall).
    """
    words = _words(text)
    keywords = [k for k in keywords if _words(k)]
    if not keywords:
        return False
    for keyword in keywords:
        kw = _words(keyword)
        n = len(kw)
        if not any(words[i : i + n] == kw for i in range(len(words) - n + 1)):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# data


def _conversation_turns(row: Mapping[str, Any], index: int) -> dict:
    """One data row -> ``{"id", "turns": [{query, answer, distance, keywords}]}``."""
    missing = [c for c in ("query", "answer") if c not in row]
    if missing:
        raise ValueError(
            f"evaluation row {index} lacks the column(s) {missing}; multi-turn rows need query, answer, "
            "interactions (and recall_distance / answer_keywords for recall accuracy)."
        )
    follow = list(row.get("interactions") or [])
    distances = row.get("recall_distance")
    keywords = row.get("answer_keywords")
    fact_keys = row.get("fact_keys")
    if distances is not None and len(distances) != len(follow):
        raise ValueError(
            f"evaluation row {index}: recall_distance has {len(distances)} entries but interactions has "
            f"{len(follow)}; they must have one entry per follow-up interaction."
        )
    if keywords is not None and len(keywords) != len(follow):
        raise ValueError(
            f"evaluation row {index}: answer_keywords has {len(keywords)} entries but interactions has "
            f"{len(follow)}; they must have one entry per follow-up interaction."
        )
    if fact_keys is not None and len(fact_keys) != len(follow) + 1:
        raise ValueError(
            f"evaluation row {index}: fact_keys has {len(fact_keys)} entries but the conversation has "
            f"{len(follow) + 1} turns; it must have one entry per turn, the first interaction included."
        )
    turns = [{"query": row["query"], "answer": row["answer"], "distance": 0, "keywords": []}]
    for j, turn in enumerate(follow):
        turns.append(
            {
                "query": turn["query"],
                "answer": turn["answer"],
                "distance": int(distances[j]) if distances is not None else 0,
                "keywords": list(keywords[j]) if keywords is not None else [],
            }
        )
    if fact_keys is not None:
        _mark_same_kind_rivals(turns, [str(key or "") for key in fact_keys])
    return {"id": str(row.get("conversation_id", index)), "turns": turns}


def _mark_same_kind_rivals(turns: list[dict], fact_keys: list[str]) -> None:
    """Set ``fact_kind`` on every turn that plants or asks for a fact and, on recall turns, ``same_kind_rival``:
    whether another fact of that kind (another key) was planted or asked for before the question."""
    kinds = [key.split(":")[0] if key else None for key in fact_keys]
    for k, turn in enumerate(turns):
        turn["fact_kind"] = kinds[k]
        if turn["distance"] > 0 and kinds[k] is not None:
            turn["same_kind_rival"] = any(
                kinds[j] == kinds[k] and fact_keys[j] != fact_keys[k] for j in range(k)
            )


def _rows(dataset, max_conversations: int | None) -> list[Mapping[str, Any]]:
    if isinstance(dataset, Mapping):
        raise TypeError(
            "evaluate_memory needs one split (a datasets.Dataset or a list of rows), got a mapping "
            f"with keys {list(dataset.keys())[:5]}; pass e.g. dataset['test']."
        )
    if max_conversations is not None:
        if not isinstance(max_conversations, int) or max_conversations < 1:
            raise ValueError(f"max_conversations={max_conversations!r} must be a positive integer or None.")
        if hasattr(dataset, "select"):
            dataset = dataset.select(range(min(max_conversations, len(dataset))))
        else:
            dataset = list(dataset)[:max_conversations]
    return list(dataset)


# ----------------------------------------------------------------------------------------------
# batching helpers


def _fresh_memory(model, n: int) -> torch.Tensor:
    """The state a new conversation starts from (and the control's state at every turn)."""
    if getattr(model.config, "stm_init_mode", None) == "normal":
        # Random initial states would make the result depend on the batch; use the zero state instead.
        return model.init_memory(n, mode="zeros")
    return model.init_memory(n)


def _default_generate(model, input_ids, attention_mask, stm_state, max_new_tokens, eos_token_id, pad_token_id):
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        stm_state=stm_state,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _answer_losses(turn, prompt_lengths: list[int]) -> tuple[list[float], list[int]]:
    """Per scored row of a turn: (sum of the cross-entropies of the reference answer tokens incl. [EOS], their
    number), from the turn's per-token log-probabilities (position ``j`` scores token ``j + 1``)."""
    logps = turn.token_logps  # [n, T-1]
    positions = torch.arange(1, logps.shape[1] + 1, device=logps.device)  # the scored token of each position
    prompt = torch.tensor(prompt_lengths, device=logps.device)[:, None]
    valid = (positions[None] >= prompt) & turn.attention_mask[:, 1:].bool()  # answer tokens of the reference
    return torch.where(valid, -logps, torch.zeros_like(logps)).sum(dim=1).tolist(), valid.sum(dim=1).tolist()


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate_memory(
    model,
    tokenizer,
    dataset,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    memory_from: str = "generated",
    max_conversations: int | None = None,
    progress: bool = True,
    num_examples: int = 5,
    return_turns: bool = False,
    generate_fn: Callable | None = None,
) -> dict:
    """Answer perplexity and memory recall accuracy by distance, with a no-memory control.

    Args:
        model: an ``RxTForCausalLM`` (any device / dtype).
        tokenizer: its RxT tokenizer.
        dataset: one split of multi-turn rows (``datasets.Dataset`` or a list of dicts).
        max_new_tokens: greedy generation budget per answer.
        batch_size: conversations processed together (does not change the result).
        max_length: token limit of one interaction; defaults to
            ``min(config.max_position_embeddings, tokenizer.model_max_length)``. Reference
            interactions longer than that are cut (counted in ``num_truncated_references``);
            ``max_new_tokens`` is capped so that the longest query plus its answer and ``[EOS]`` fit.
        memory_from: ``"generated"`` writes the model's own answer into memory (a real chat: the
            generated token ids, closed with ``[EOS]`` also when the budget ran out), ``"reference"``
            writes the reference answer (teacher-forced memory).
        max_conversations: evaluate only the first ``n`` conversations.
        progress: show a tqdm progress bar (one tick per batched turn).
            A model whose ``stm_init_mode`` is ``"normal"`` (random) starts every conversation, and the
            control every turn, from the zero state instead, so that results are reproducible.
        num_examples: how many (query, reference, generated) examples to return; recall turns first.
        return_turns: also return ``"turns"``, one record per turn of every conversation.
        generate_fn: replaces the generation step (for oracles and tests); called as
            ``generate_fn(model, input_ids, attention_mask, stm_state, max_new_tokens, eos_token_id,
            pad_token_id)`` and must return ``generate``-style sequences (prompt + new tokens).

    Returns:
        A JSON-serialisable dict: ``num_conversations``, ``num_turns``, ``num_answer_tokens``,
        ``answer_loss`` / ``answer_loss_no_memory`` (mean CE per answer token),
        ``answer_perplexity`` / ``answer_perplexity_no_memory``, ``recall_accuracy`` /
        ``recall_accuracy_no_memory`` / ``recall_count`` (dicts keyed by the int distance),
        ``recall_accuracy_overall`` / ``recall_accuracy_overall_no_memory`` / ``recall_count_overall``
        (``None`` accuracies when there is no recall turn), with ``fact_keys`` in the rows
        ``recall_by_fact_kind`` / ``recall_by_same_kind_rival`` (``{group: {"accuracy", "count"}}``, groups
        ``with_rival`` / ``without_rival``), ``max_recall_distance``, the settings used,
        ``num_truncated_references`` and ``examples``.
    """
    if memory_from not in MEMORY_SOURCES:
        raise ValueError(f"memory_from={memory_from!r}: choose one of {MEMORY_SOURCES}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    generate_fn = generate_fn or _default_generate

    ids = special_token_ids(tokenizer)
    eos_id, pad_id = ids["eos_token_id"], ids["pad_token_id"]
    limit = int(model.config.max_position_embeddings)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < 4:
            raise ValueError(f"max_length={max_length!r} must be an integer >= 4 or None.")
        limit = min(limit, max_length)

    conversations = [_conversation_turns(row, i) for i, row in enumerate(_rows(dataset, max_conversations))]
    if not conversations:
        raise ValueError("evaluate_memory: the dataset has no conversations.")

    # Tokenise everything up front (prompts, reference interactions) and fix the generation budget.
    longest_prompt = 0
    truncated = 0
    for conv in conversations:
        for turn in conv["turns"]:
            turn["prompt"] = encode_interaction(tokenizer, turn["query"])
            if len(turn["prompt"]) >= limit - 1:
                raise ValueError(
                    f"conversation {conv['id']!r}: the query {turn['query'][:60]!r} takes {len(turn['prompt'])} "
                    f"tokens, leaving no room for an answer within the {limit}-token interaction limit."
                )
            full = encode_interaction(tokenizer, turn["query"], turn["answer"])
            if len(full) > limit:
                full = full[:limit]
                truncated += 1
            turn["reference_ids"] = full
            longest_prompt = max(longest_prompt, len(turn["prompt"]))
    new_tokens = min(max_new_tokens, limit - longest_prompt - 1)

    was_training = model.training
    model.eval()

    # Conversations with the same number of turns together keeps batches full; results do not depend on it.
    order = sorted(range(len(conversations)), key=lambda i: -len(conversations[i]["turns"]))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=sum(len(conversations[g[0]]["turns"]) for g in groups), desc="rxt eval", unit="turn-batch"
            )
        except ImportError:  # pragma: no cover - tqdm is a transformers dependency
            bar = None

    records: dict[tuple[int, int], dict] = {}
    sums = {"memory": [0.0, 0], "control": [0.0, 0]}

    def generate(model, input_ids, attention_mask, stm_state, **_):
        return generate_fn(model, input_ids, attention_mask, stm_state, new_tokens, eos_id, pad_id)

    try:
        with torch.no_grad():
            for group in groups:
                size = len(group)
                turns_of = [conversations[c]["turns"] for c in group] * 2  # memory rows, then the control's
                # Rows 0..size-1 read their conversation's memory, rows size..2*size-1 a fresh one at every turn.
                playing = ConversationBatch(model, _fresh_memory(model, 2 * size), stateless=[False] * size + [True] * size)
                played = playing.play(
                    [[t["reference_ids"] for t in turns] for turns in turns_of],
                    queries=[[t["prompt"] for t in turns] for turns in turns_of],
                    memory_from="generated" if memory_from == "generated" else "input",
                    write_last_turn=True,  # every turn is written, as a chat would
                    return_logps=True,
                    return_stm=False,
                    generate_fn=generate,
                )
                for played_turn in played:
                    k, rows = played_turn.turn, played_turn.rows.tolist()
                    n = len(rows) // 2  # the scored rows: n conversations, then their n control rows
                    turns = [turns_of[r][k] for r in rows[:n]]
                    loss_sums, counts = _answer_losses(played_turn, [len(t["prompt"]) for t in turns] * 2)
                    sums["memory"][0] += sum(loss_sums[:n])
                    sums["memory"][1] += sum(counts[:n])
                    sums["control"][0] += sum(loss_sums[n:])
                    sums["control"][1] += sum(counts[n:])
                    answers = played_turn.answers
                    for j, turn in enumerate(turns):
                        conversation = group[rows[j]]
                        text = tokenizer.decode(answers[j], skip_special_tokens=True)
                        text_control = tokenizer.decode(answers[n + j], skip_special_tokens=True)
                        recall = turn["distance"] > 0 and bool(turn["keywords"])
                        records[(conversation, k)] = {
                            "conversation_id": conversations[conversation]["id"],
                            "turn": k,
                            "recall_distance": turn["distance"],
                            "answer_keywords": turn["keywords"],
                            "query": turn["query"],
                            "reference": turn["answer"],
                            "generated": text,
                            "generated_no_memory": text_control,
                            "correct": keywords_match(text, turn["keywords"]) if recall else None,
                            "correct_no_memory": keywords_match(text_control, turn["keywords"]) if recall else None,
                            "fact_kind": turn.get("fact_kind"),
                            "same_kind_rival": turn.get("same_kind_rival"),
                            "answer_loss": loss_sums[j] / max(counts[j], 1),
                            "answer_loss_no_memory": loss_sums[n + j] / max(counts[n + j], 1),
                        }
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    ordered = [records[(c, k)] for c in range(len(conversations)) for k in range(len(conversations[c]["turns"]))]
    return _summarise(ordered, sums, len(conversations), truncated, num_examples, return_turns, {
        "memory_from": memory_from,
        "max_new_tokens": new_tokens,
        "max_length": limit,
    })


def _summarise(turns, sums, num_conversations, truncated, num_examples, return_turns, settings) -> dict:
    def mean_loss(key):
        total, count = sums[key]
        return total / count if count else None

    def perplexity(loss):
        if loss is None:
            return None
        return math.exp(loss) if loss < 700 else float("inf")

    recall = [t for t in turns if t["correct"] is not None]
    distances = sorted({t["recall_distance"] for t in recall})
    count = {d: sum(1 for t in recall if t["recall_distance"] == d) for d in distances}
    acc = {d: sum(t["correct"] for t in recall if t["recall_distance"] == d) / count[d] for d in distances}
    acc_control = {
        d: sum(t["correct_no_memory"] for t in recall if t["recall_distance"] == d) / count[d] for d in distances
    }
    loss, loss_control = mean_loss("memory"), mean_loss("control")

    examples = [t for t in turns if t["correct"] is not None][:num_examples]
    if len(examples) < num_examples:
        examples += [t for t in turns if t["correct"] is None][: num_examples - len(examples)]
    result = {
        "num_conversations": num_conversations,
        "num_turns": len(turns),
        "num_answer_tokens": sums["memory"][1],
        "answer_loss": loss,
        "answer_loss_no_memory": loss_control,
        "answer_perplexity": perplexity(loss),
        "answer_perplexity_no_memory": perplexity(loss_control),
        "recall_accuracy": acc,
        "recall_accuracy_no_memory": acc_control,
        "recall_count": count,
        "recall_accuracy_overall": sum(t["correct"] for t in recall) / len(recall) if recall else None,
        "recall_accuracy_overall_no_memory": (
            sum(t["correct_no_memory"] for t in recall) / len(recall) if recall else None
        ),
        "recall_count_overall": len(recall),
        **_recall_by_fact(recall),
        "max_recall_distance": max(distances) if distances else 0,
        **settings,
        "num_truncated_references": truncated,
        "examples": [
            {key: t[key] for key in ("conversation_id", "turn", "recall_distance", "query", "reference", "generated",
                                     "generated_no_memory", "correct")}
            for t in examples
        ],
    }
    if return_turns:
        result["turns"] = turns
    return result


def _recall_by_fact(recall: list[dict]) -> dict:
    """``recall_by_fact_kind`` and ``recall_by_same_kind_rival`` (``{group: {"accuracy", "count"}}``) when the
    rows carry ``fact_keys``; nothing otherwise."""
    known = [t for t in recall if t["fact_kind"] is not None]
    if not known:
        return {}

    def split(group_of) -> dict:
        groups: dict[str, list[dict]] = {}
        for t in known:
            groups.setdefault(group_of(t), []).append(t)
        return {
            name: {"accuracy": sum(t["correct"] for t in members) / len(members), "count": len(members)}
            for name, members in sorted(groups.items())
        }

    return {
        "recall_by_fact_kind": split(lambda t: t["fact_kind"]),
        "recall_by_same_kind_rival": split(lambda t: "with_rival" if t["same_kind_rival"] else "without_rival"),
    }


# ----------------------------------------------------------------------------------------------
# reporting


def _by_distance(mapping) -> dict[int, Any]:
    return {int(k): v for k, v in (mapping or {}).items()}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"


def format_evaluation_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_memory`'s result (also after a JSON round trip).

    Rows: recall distance 1..K and overall; columns: with memory, no-memory control, count.
    Followed by the answer perplexity line.
    """
    acc = _by_distance(result.get("recall_accuracy"))
    acc_control = _by_distance(result.get("recall_accuracy_no_memory"))
    count = _by_distance(result.get("recall_count"))
    top = max(count, default=0)
    lines = [
        "| recall distance (turns back) | with memory | no-memory control | count |",
        "|---|---|---|---|",
    ]
    for d in range(1, top + 1):
        lines.append(f"| {d} | {_pct(acc.get(d))} | {_pct(acc_control.get(d))} | {count.get(d, 0)} |")
    lines.append(
        f"| overall | {_pct(result.get('recall_accuracy_overall'))} | "
        f"{_pct(result.get('recall_accuracy_overall_no_memory'))} | {result.get('recall_count_overall', 0)} |"
    )
    lines.append("")
    lines.append(
        f"Answer perplexity (reference answers, teacher-forced): {_num(result.get('answer_perplexity'))} with memory, "
        f"{_num(result.get('answer_perplexity_no_memory'))} without memory "
        f"({result.get('num_conversations', 0)} conversations, {result.get('num_turns', 0)} turns; "
        f"memory written from {result.get('memory_from', 'generated')} answers)."
    )
    rival, kinds = result.get("recall_by_same_kind_rival"), result.get("recall_by_fact_kind")
    if rival:
        with_rival, without = rival.get("with_rival") or {}, rival.get("without_rival") or {}
        lines.append("")
        lines.append(
            f"Recall when another fact of the asked kind came before the question: {_pct(with_rival.get('accuracy'))} "
            f"({with_rival.get('count', 0)} questions); when none did: {_pct(without.get('accuracy'))} "
            f"({without.get('count', 0)})."
        )
    if kinds:
        listed = ", ".join(f"{kind} {_pct(g['accuracy'])} ({g['count']})" for kind, g in kinds.items())
        lines.append("")
        lines.append(f"Recall by fact kind: {listed}.")
    return "\n".join(lines)
