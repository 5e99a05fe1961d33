"""quality-vs-stateless: RxT against stateless Llamas of the same and of twice its parameter count, equal CPU time.

All models learn the embedded multi-turn data (fact-recall conversations, :mod:`trainers.synthetic_data`) for
the same wall-clock CPU budget, one after the other in this process, then are scored on the same test split:

- **RxT** reads one interaction ``[BOS][Q] q [A] a [EOS]`` at a time plus its fixed-size Short-Term Memory.
  Two ways to train it:

  * default: a fresh model built like the recipe (``recipes/default.yaml``: preset + model overrides, tokenizer
    trained on the recipe's pre-training texts) trained by the project's SMAT trainer alone for ``minutes``
    (stages 1-3 collapsed into stage 4: every component trainable from step 0, the recipe's turn-length
    curriculum, lr, batch and recall weight). ``max_steps`` is set from a short probe of the step time of each
    curriculum phase so that the cosine schedule ends with the budget; ``max_time_minutes`` is the hard stop;
  * ``rxt_model=FOLDER``: an already trained model (e.g. ``outputs/default/final``); its training time is read
    from ``run_summary.json`` next to it (``train_minutes``, the whole recipe) or, failing that, from the stage
    runtimes in ``rxt_training_history.json``. Only the Llama is trained here, for that many minutes.

- **Llama** (stateless), one per entry of ``llama_sizes`` (default ``[1, 2]``: the RxT paper compares a 12M RxT
  with a 22M stateless model): a ``LlamaForCausalLM`` with the RxT's hidden size, heads and vocabulary (same
  tokenizer), depth and feed-forward width chosen so that its parameter count is as close as possible to
  ``size x`` the RxT's *total* (encoder, memory attention and decoder). It is trained with a plain torch loop (AdamW, warmup + cosine over
  the time budget, the SMAT lr / batch / grad clipping) on whole conversations in its context:
  ``[BOS][Q] q1 [A] a1 [EOS][BOS][Q] q2 [A] a2 [EOS] ...``, loss on the answer tokens (and each ``[EOS]``) only,
  recall answers weighted by the recipe's ``recall_weight`` as in SMAT.

Evaluation on the test split (the recipe's ``evaluation`` settings):

- **answer perplexity**: teacher-forced reference answers (+ ``[EOS]``). RxT: :func:`trainers.evaluation.
  evaluate_memory` (the STM built turn by turn from its own generated answers). Llama: the reference interaction
  after the *real* history of the conversation, i.e. the earlier queries with the model's own earlier answers;
- **recall accuracy by distance**: greedy answers to recall queries, correct when every ``answer_keywords`` word
  occurs (:func:`trainers.evaluation.keywords_match`). The Llama's context is the real history with its own
  earlier (generated) answers, mirroring ``memory_from="generated"``.

RxT's no-memory control (the same model, STM reset every turn) comes with ``evaluate_memory`` and is reported
too: recall above it is what the memory contributes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from rxt_hf.modeling_rxt.format_rxt import IGNORE_INDEX, pad_rows

from . import timing
from .common import describe_llama, describe_rxt, llama_config_for

NAME = "quality-vs-stateless"
DESCRIPTION = (
    "Answer perplexity and recall accuracy by distance of RxT vs stateless Llamas of 1x and 2x its parameter count "
    "(whole history in context), each trained on the embedded multi-turn data for the same CPU minutes."
)
DEFAULT_RECIPE = "recipes/default.yaml"
DEFAULTS = dict(
    recipe=DEFAULT_RECIPE,  # data, tokenizer, model, SMAT and evaluation settings (relative paths: repo root)
    rxt_model=None,  # folder of a trained RxT: train only the Llama, for the time the recipe took
    minutes=7.0,  # CPU budget per model (from scratch; keeps `rxt bench all` under 25 minutes); with rxt_model, only when no training time is recorded
    llama_minutes=None,  # override each Llama's budget (None: the RxT's training minutes)
    llama_sizes=(1.0, 2.0),  # the Llamas' parameter counts as multiples of the RxT's total
    rxt_minutes_source="run_summary",  # with rxt_model: "run_summary" (whole recipe) or "stages" (sum of stage runtimes)
    num_conversations=None,  # None: the recipe's data settings
    num_turns=None,
    max_recall_distance=None,
    vocab_size=None,  # tokenizer vocabulary when training from scratch (None: the recipe's)
    model_overrides=None,  # extra RxTConfig overrides on top of the recipe's (from scratch)
    learning_rate=None,  # None: the SMAT stage's
    batch_size=None,  # None: the SMAT stage's
    recall_weight=None,  # None: the SMAT stage's config.recall_weight
    eval_conversations=None,  # None: the recipe's evaluation.num_conversations
    max_new_tokens=None,
    eval_batch_size=None,
)
SMOKE = {
    **DEFAULTS,
    "minutes": 0.04,
    "num_conversations": 60,
    "num_turns": 4,
    "max_recall_distance": 3,
    "vocab_size": 400,
    "model_overrides": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_query_heads": 4,
        "num_key_value_heads": 4,
        "decoder_intermediate_size": 64,
        "encoder_intermediate_size": 64,
        "stm_size": 8,
        "max_position_embeddings": 96,
    },
    "batch_size": 8,
    "eval_conversations": 4,
    "max_new_tokens": 6,
    "eval_batch_size": 4,
}
TARGET_DISTANCE = 3
LR_GRID = 10_000  # resolution of the Llama's time-based warmup + cosine schedule


# ------------------------------------------------------------------------------------------------------
# settings


def _resolve_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (timing.REPO_ROOT / path).exists():
        path = timing.REPO_ROOT / path
    return path


def _settings(opts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Data, tokenizer, model, SMAT and evaluation settings: the recipe's, then the benchmark's options."""
    from rxt_hf.recipes.recipe import load_recipe

    recipe = load_recipe(_resolve_path(opts["recipe"]))
    smat = next((s for s in recipe.stages if s.trainer == "smat"), None)
    if smat is None:
        raise ValueError(f"recipe {opts['recipe']!r} has no smat stage: the benchmark takes the SMAT settings from it.")
    data = recipe.stage_data(smat)
    pick = lambda option, fallback: opts[option] if opts[option] is not None else fallback  # noqa: E731
    num_turns = int(pick("num_turns", data.get("num_turns", 6)))
    smat_config = dict(smat.config)
    settings = {
        "recipe": str(opts["recipe"]),
        "seed": int(recipe.seed),  # the data seed: the recipe's, so that a trained model's test split stays unseen
        "model_seed": seed,
        "num_conversations": int(pick("num_conversations", data.get("num_conversations", 2000))),
        "num_turns": num_turns,
        "max_recall_distance": int(pick("max_recall_distance", data.get("max_recall_distance", 4))),
        "vocab_size": int(pick("vocab_size", recipe.tokenizer.get("vocab_size", 8000))),
        "min_frequency": int(recipe.tokenizer.get("min_frequency", 2)),
        "preset": recipe.model.get("preset") or "rxt-alpha-micro",
        "model_overrides": {**recipe.model.get("overrides", {}), **(opts["model_overrides"] or {})},
        "turn_datasets": sorted({n for n in (data.get("turn_datasets") or []) if n <= num_turns} | {num_turns}),
        "smat_config": smat_config,
        "learning_rate": float(pick("learning_rate", smat_config.get("learning_rate", 1e-3))),
        "batch_size": int(pick("batch_size", smat_config.get("per_device_train_batch_size", 16))),
        "interaction_max_length": int(smat_config.get("max_length", 256)),
        "recall_weight": float(pick("recall_weight", smat_config.get("recall_weight") or 1.0)),
        "eval_conversations": pick("eval_conversations", recipe.evaluation.get("num_conversations")),
        "max_new_tokens": int(pick("max_new_tokens", recipe.evaluation.get("max_new_tokens", 32))),
        "eval_batch_size": int(pick("eval_batch_size", recipe.evaluation.get("batch_size", 32))),
    }
    curriculum = smat_config.get("turn_curriculum")
    if curriculum:
        kept = [(start, n) for start, n in curriculum if n in settings["turn_datasets"]]
        if not kept or kept[0][0] != 0:
            kept = [(0.0, kept[0][1] if kept else num_turns), *kept[1:]]
        settings["turn_curriculum"] = [list(entry) for entry in kept]
    else:
        settings["turn_curriculum"] = [[0.0, num_turns]]
    return settings


def multi_turn_split(settings: dict, num_turns: int):
    """The embedded multi-turn DatasetDict with `num_turns` turns (what the recipe's SMAT stage reads)."""
    from rxt_hf.trainers.data import load_rxt_dataset

    return load_rxt_dataset(
        "synthetic",
        "multi-turn",
        num_conversations=settings["num_conversations"],
        num_turns=num_turns,
        max_recall_distance=settings["max_recall_distance"],
        seed=settings["seed"],
    )


# ------------------------------------------------------------------------------------------------------
# the stateless baseline: size matching, data, training, evaluation


def count_llama_parameters(config) -> int:
    """Exact parameter count of `LlamaForCausalLM(config)` (built on the meta device: no memory, no init)."""
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    except Exception:  # pragma: no cover - a transformers version that cannot build on meta: build it for real
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matched_llama_config(rxt_config, target_parameters: int, max_position_embeddings: int):
    """A Llama config with the RxT's hidden size, heads and vocabulary whose parameter count is as close as
    possible to `target_parameters`: first the depth (at the RxT decoder's active feed-forward width), then the
    feed-forward width (a multiple of 8) to close the remaining gap."""
    base = llama_config_for(rxt_config, max_position_embeddings)
    hidden = base.hidden_size

    def with_sizes(layers: int, intermediate: int):
        config = llama_config_for(rxt_config, max_position_embeddings)
        config.num_hidden_layers = layers
        config.intermediate_size = intermediate
        return config

    best_layers, best_gap = 1, math.inf
    for layers in range(1, 8 * max(1, base.num_hidden_layers) + 1):
        gap = abs(count_llama_parameters(with_sizes(layers, base.intermediate_size)) - target_parameters)
        if gap < best_gap:
            best_layers, best_gap = layers, gap
        elif gap > best_gap:  # the count grows with depth: past the best, every deeper one is worse
            break
    # every layer's MLP holds 3 x hidden x intermediate weights (gate, up, down; no biases)
    without_mlp = count_llama_parameters(with_sizes(best_layers, 8)) - 3 * hidden * 8 * best_layers
    intermediate = (target_parameters - without_mlp) / (3 * hidden * best_layers)
    intermediate = max(8, int(round(intermediate / 8)) * 8)
    return with_sizes(best_layers, intermediate)


def conversation_turns(row: dict) -> list[dict]:
    """One multi-turn row -> `[{query, answer, distance, keywords}]` (turn 0 is never a recall turn)."""
    follow = list(row.get("interactions") or [])
    distances = list(row.get("recall_distance") or [0] * len(follow))
    keywords = list(row.get("answer_keywords") or [[]] * len(follow))
    turns = [{"query": row["query"], "answer": row["answer"], "distance": 0, "keywords": []}]
    for turn, distance, words in zip(follow, distances, keywords):
        turns.append({"query": turn["query"], "answer": turn["answer"], "distance": int(distance or 0),
                      "keywords": list(words or [])})
    return turns


def encode_conversation(tokenizer, row: dict, interaction_max_length: int, recall_weight: float) -> tuple[list[int], list[float]]:
    """`[BOS][Q] q1 [A] a1 [EOS][BOS][Q] q2 ...` (each interaction framed and truncated exactly like SMAT's
    collator) and per-token loss weights aligned with it: 0 on queries and special prefixes, 1 on answer
    tokens and each closing `[EOS]`, `recall_weight` on the answers of recall turns."""
    from rxt_hf.trainers.data import tokenize_interaction

    ids, weights = [], []
    for turn in conversation_turns(row):
        encoded = tokenize_interaction(tokenizer, turn["query"], turn["answer"], interaction_max_length)
        weight = recall_weight if turn["distance"] > 0 else 1.0
        ids += encoded["input_ids"]
        weights += [0.0 if label == IGNORE_INDEX else weight for label in encoded["labels_answer_only"]]
    return ids, weights


def weighted_answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token-weighted cross-entropy of next-token prediction; `weights[b, t]` weighs predicting token t."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
    w = weights[:, 1:]
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the project's trainers make them: no decay for norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        lowered = name.lower()
        if param.ndim < 2 or "norm" in lowered or "bias" in lowered or "embed" in lowered:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_llama(model, conversations: list[tuple[list[int], list[float]]], minutes: float, learning_rate: float,
                batch_size: int, pad_id: int, seed: int = 0, weight_decay: float = 0.01,
                adam_betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.05, min_lr_ratio: float = 0.1,
                max_grad_norm: float = 1.0, log_every: int = 25) -> dict[str, Any]:
    """Train for `minutes` of wall-clock time: shuffled batches of whole conversations, AdamW, linear warmup then
    cosine decay over the *time* budget (the schedule ends when the budget does; the RxT stages' schedule,
    transformers' cosine_with_min_lr), gradient clipping."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if len(conversations) < batch_size:
        raise ValueError(f"{len(conversations)} training conversations, fewer than one batch ({batch_size}).")
    optimizer = torch.optim.AdamW(_optimizer_groups(model, weight_decay), lr=learning_rate, betas=adam_betas)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, int(round(warmup_ratio * LR_GRID)), LR_GRID, min_lr_rate=min_lr_ratio
    ).lr_lambdas[0]  # the factor at a grid position of the time budget
    generator = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0
    model.train()
    steps = tokens = 0
    losses, log = [], []
    start = time.perf_counter()
    epoch_order, position = torch.randperm(len(conversations), generator=generator).tolist(), 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        if position + batch_size > len(conversations):  # drop the incomplete tail, new epoch
            epoch_order, position = torch.randperm(len(conversations), generator=generator).tolist(), 0
        batch = [conversations[i] for i in epoch_order[position : position + batch_size]]
        position += batch_size
        input_ids, attention_mask = pad_rows([ids for ids, _ in batch], pad_id)
        weights, _ = pad_rows([w for _, w in batch], 0.0, dtype=torch.float32)
        factor = schedule(min(LR_GRID, int(elapsed / budget * LR_GRID)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * factor
        loss = weighted_answer_loss(model, input_ids, attention_mask, weights)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        tokens += int(attention_mask.sum())
        losses.append(float(loss.detach()))
        if steps % log_every == 0:
            log.append({"step": steps, "loss": sum(losses[-log_every:]) / log_every, "lr": learning_rate * factor,
                        "elapsed_s": time.perf_counter() - start})
    runtime = time.perf_counter() - start
    model.eval()
    tail = losses[-min(len(losses), log_every):]
    return {
        "train_minutes": runtime / 60.0,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": tokens / max(runtime, 1e-9),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "log": log,
    }


@torch.no_grad()
def evaluate_stateless(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int,
                       interaction_limit: int, num_examples: int = 5) -> dict[str, Any]:
    """Answer perplexity and recall accuracy by distance of a stateless causal LM that reads the real history.

    At turn k of a conversation the context is the earlier interactions with the model's *own* answers (what a
    chat would hold), each `[BOS][Q] q [A] answer [EOS]`. Perplexity: the reference interaction of turn k
    teacher-forced after that context (cross-entropy over its answer tokens and `[EOS]`, the tokens RxT's
    evaluation scores); recall: the greedy answer to the query after that context."""
    from rxt_hf.modeling_rxt.format_rxt import encode_interaction, special_token_ids
    from rxt_hf.trainers.evaluation import keywords_match

    ids = special_token_ids(tokenizer)
    eos_id, pad_id = ids["eos_token_id"], ids["pad_token_id"]
    conversations = [conversation_turns(row) for row in rows]
    for turns in conversations:
        for turn in turns:
            turn["prompt"] = encode_interaction(tokenizer, turn["query"])
            turn["reference_ids"] = encode_interaction(tokenizer, turn["query"], turn["answer"])[:interaction_limit]
    model.eval()
    loss_sum, loss_count, records = 0.0, 0, []
    order = sorted(range(len(conversations)), key=lambda i: -len(conversations[i]))
    for lo in range(0, len(order), batch_size):
        group = order[lo : lo + batch_size]
        history = {c: [] for c in group}
        for k in range(len(conversations[group[0]])):
            active = [c for c in group if len(conversations[c]) > k]
            turns = [conversations[c][k] for c in active]
            # perplexity: the reference interaction after the real history, one forward pass
            sequences = [history[c] + t["reference_ids"] for c, t in zip(active, turns)]
            input_ids, mask = pad_rows(sequences, pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            ce = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
            losses = []
            for j, (c, t) in enumerate(zip(active, turns)):
                start = len(history[c]) + len(t["prompt"])  # first answer token
                end = len(history[c]) + len(t["reference_ids"])
                row_loss = ce[j, start - 1 : end - 1]
                losses.append(float(row_loss.mean()) if row_loss.numel() else 0.0)
                loss_sum += float(row_loss.sum())
                loss_count += row_loss.numel()
            # recall: greedy answer after the real history (the model's own earlier answers)
            prompts = [history[c] + t["prompt"] for c, t in zip(active, turns)]
            prompt_ids, prompt_mask = pad_rows(prompts, pad_id, side="left")
            output = model.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id)
            for j, (c, t) in enumerate(zip(active, turns)):
                answer = []
                for token in output[j, prompt_ids.shape[1]:].tolist():
                    if token == eos_id:
                        break
                    answer.append(token)
                while answer and answer[-1] == pad_id:
                    answer.pop()
                history[c] = history[c] + t["prompt"] + answer + [eos_id]
                text = tokenizer.decode(answer, skip_special_tokens=True)
                recall = t["distance"] > 0 and bool(t["keywords"])
                records.append({
                    "conversation": c,
                    "turn": k,
                    "recall_distance": t["distance"],
                    "query": t["query"],
                    "reference": t["answer"],
                    "generated": text,
                    "correct": keywords_match(text, t["keywords"]) if recall else None,
                    "answer_loss": losses[j],
                    "context_tokens": len(prompts[j]),
                })
    recall = [r for r in records if r["correct"] is not None]
    distances = sorted({r["recall_distance"] for r in recall})
    count = {d: sum(1 for r in recall if r["recall_distance"] == d) for d in distances}
    accuracy = {d: sum(r["correct"] for r in recall if r["recall_distance"] == d) / count[d] for d in distances}
    loss = loss_sum / loss_count if loss_count else None
    records.sort(key=lambda r: (r["conversation"], r["turn"]))
    examples = ([r for r in records if r["correct"] is not None] + [r for r in records if r["correct"] is None])
    return {
        "num_conversations": len(conversations),
        "num_turns": len(records),
        "num_answer_tokens": loss_count,
        "answer_loss": loss,
        "answer_perplexity": (math.exp(loss) if loss < 700 else math.inf) if loss is not None else None,
        "recall_accuracy": accuracy,
        "recall_count": count,
        "recall_accuracy_overall": sum(r["correct"] for r in recall) / len(recall) if recall else None,
        "recall_count_overall": len(recall),
        "max_context_tokens": max((r["context_tokens"] for r in records), default=0),
        "max_new_tokens": max_new_tokens,
        "examples": [{k: v for k, v in r.items() if k != "answer_loss"} for r in examples[:num_examples]],
    }


# ------------------------------------------------------------------------------------------------------
# RxT: from scratch (SMAT alone) or a trained folder


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def trained_rxt_facts(folder: Path) -> dict[str, Any]:
    """Training time, steps and tokens of a trained RxT folder: `run_summary.json` (the folder's or its
    parent's) and the stage history in `rxt_training_history.json`."""
    from rxt_hf.trainers.trainer_base import load_training_history

    history = load_training_history(folder)
    summary, summary_path = None, None
    for candidate in (folder / "run_summary.json", folder.parent / "run_summary.json"):
        summary = _read_json(candidate)
        if summary is not None:
            summary_path = candidate
            break
    stages = [
        {key: entry.get(key) for key in ("stage", "steps", "tokens_seen", "train_runtime_s", "effective_batch_size", "final_loss")}
        for entry in history
    ]
    return {
        "run_summary": str(summary_path) if summary_path else None,
        "run_summary_train_minutes": (summary or {}).get("train_minutes"),
        "stage_minutes": sum(float(s["train_runtime_s"] or 0.0) for s in stages) / 60.0 if stages else None,
        "steps": sum(int(s["steps"] or 0) for s in stages),
        "tokens": sum(int(s["tokens_seen"] or 0) for s in stages),
        "stages": stages,
        "smat_config": next((entry.get("config", {}) for entry in reversed(history) if entry.get("stage") == "smat"), None),
    }


def build_fresh_rxt(settings: dict):
    """Tokenizer (trained on the recipe's pre-training texts) and a fresh RxT built like the recipe's model."""
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, build_tokenizer, special_token_ids
    from rxt_hf.trainers.data import load_rxt_dataset

    texts = load_rxt_dataset(
        "synthetic",
        "pretraining",
        num_conversations=settings["num_conversations"],
        num_turns=settings["num_turns"],
        max_recall_distance=settings["max_recall_distance"],
        seed=settings["seed"],
    )["train"]["text"]
    overrides = dict(settings["model_overrides"])
    tokenizer = build_tokenizer(
        texts,
        vocab_size=settings["vocab_size"],
        min_frequency=settings["min_frequency"],
        model_max_length=int(overrides.get("max_position_embeddings", 256)),
    )
    config = RxTConfig.from_preset(settings["preset"], **{**overrides, **special_token_ids(tokenizer), "vocab_size": len(tokenizer)})
    torch.manual_seed(settings["model_seed"])
    return tokenizer, RxTForCausalLM(config)


def _smat_trainer(model, tokenizer, settings: dict, train_sets: dict, output_dir: str, max_steps: int,
                  minutes: float | None):
    from rxt_hf.trainers.data import ConversationCollator
    from rxt_hf.trainers.smat_trainer import SMATConfig, SMATTrainer

    base = {k: v for k, v in settings["smat_config"].items() if k not in ("freeze_schedule", "turn_curriculum")}
    args = SMATConfig(**{
        **base,
        "output_dir": output_dir,
        "max_steps": max(1, int(max_steps)),
        "max_time_minutes": minutes,
        "per_device_train_batch_size": settings["batch_size"],
        "learning_rate": settings["learning_rate"],
        "seed": settings["model_seed"],
        "turn_curriculum": [tuple(entry) for entry in settings["turn_curriculum"]],
        # from scratch nothing is pre-trained: every component learns from step 0
        "freeze_schedule": {"decoder": 0, "memory_attention": 0, "encoder": 0, "embedding": 0},
        "logging_steps": max(1, min(int(base.get("logging_steps", 25)), int(max_steps))),
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "eval_steps": None,
    })
    collator = ConversationCollator(tokenizer, max_length=args.max_length, recall_weight=settings["recall_weight"])
    return SMATTrainer(model, args, train_dataset=train_sets, processing_class=tokenizer, data_collator=collator)


def probe_smat_step_seconds(model, tokenizer, settings: dict, train_sets: dict, output_dir: str, repeats: int = 2) -> dict[int, float]:
    """Seconds of one SMAT micro-step (batch collation + forward + backward) per curriculum turn count, best of
    `repeats`; the weights are not changed (no optimizer step)."""
    trainer = _smat_trainer(model, tokenizer, settings, train_sets, output_dir, max_steps=100, minutes=None)
    seconds = {}
    model.train()
    for _, turns in settings["turn_curriculum"]:
        samples = []
        for repeat in range(repeats):
            start = time.perf_counter()
            size = len(train_sets[turns])
            rows = [train_sets[turns][i % size] for i in range(repeat * settings["batch_size"], (repeat + 1) * settings["batch_size"])]
            batch = trainer.curriculum.collate(rows, turns)
            loss, _, _ = trainer.model(batch)  # the SMAT stage module's forward
            loss.backward()
            samples.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        seconds[turns] = min(samples)
    model.eval()
    return seconds


def planned_smat_steps(step_seconds: dict[int, float], curriculum: list, minutes: float, margin: float = 0.97) -> int:
    """`max_steps` whose curriculum (phases at fractions of max_steps) fills `minutes` at the probed step times."""
    starts = [start for start, _ in curriculum]
    if any(isinstance(start, int) and start > 0 for start in starts):  # phases at absolute steps: plain mean
        mean_step = sum(step_seconds.values()) / len(step_seconds)
        return max(1, int(margin * minutes * 60.0 / max(mean_step, 1e-9)))
    fractions = []
    for i, (start, turns) in enumerate(curriculum):
        end = curriculum[i + 1][0] if i + 1 < len(curriculum) else 1.0
        fractions.append((float(end) - float(start), step_seconds[turns]))
    mean_step = sum(f * s for f, s in fractions) / max(sum(f for f, _ in fractions), 1e-9)
    return max(1, int(margin * minutes * 60.0 / max(mean_step, 1e-9)))


def train_rxt_from_scratch(model, tokenizer, settings: dict, minutes: float, workdir: str) -> dict[str, Any]:
    """The project's SMAT trainer alone (stages 1-3 collapsed into it) for `minutes` of CPU time."""
    train_sets = {n: multi_turn_split(settings, n)["train"] for n in settings["turn_datasets"]}
    probe_start = time.perf_counter()
    step_seconds = probe_smat_step_seconds(model, tokenizer, settings, train_sets, str(Path(workdir) / "probe"))
    probe_s = time.perf_counter() - probe_start
    max_steps = planned_smat_steps(step_seconds, settings["turn_curriculum"], minutes)
    trainer = _smat_trainer(model, tokenizer, settings, train_sets, str(Path(workdir) / "smat"), max_steps, minutes)
    metrics = trainer.train().metrics
    model.eval()
    runtime, tokens = float(metrics["train_runtime"]), int(trainer.state.num_input_tokens_seen)
    return {
        "train_minutes": runtime / 60.0,
        "steps": int(trainer.state.global_step),
        "planned_steps": max_steps,
        "tokens": tokens,
        "tokens_per_s": tokens / max(runtime, 1e-9),
        "final_loss": metrics.get("train_loss"),
        "stopped_by": trainer.stopped_by,
        "probe_step_seconds": step_seconds,
        "probe_s": probe_s,
        "turn_curriculum": settings["turn_curriculum"],
        "turn_datasets": settings["turn_datasets"],
    }


# ------------------------------------------------------------------------------------------------------
# the benchmark


def _llama_sizes(value) -> list[float]:
    """The `llama_sizes` option: a non-empty list of positive parameter-count multiples."""
    sizes = [value] if isinstance(value, (int, float)) else value
    try:
        sizes = [float(size) for size in sizes]
    except (TypeError, ValueError):
        sizes = []
    if not sizes or any(size <= 0 for size in sizes):
        raise ValueError(f"llama_sizes={value!r}: give positive multiples of the RxT's parameter count, e.g. [1, 2].")
    return sizes


def _llama_name(size: float) -> str:
    return f"{size:g}x"


def _recall_at(accuracy: dict, distance: int) -> tuple[int | None, float | None]:
    """(distance used, accuracy): `distance` when measured, else the largest measured distance below it."""
    keys = sorted(int(d) for d in accuracy)
    usable = [d for d in keys if d <= distance] or keys
    if not usable:
        return None, None
    chosen = distance if distance in keys else usable[-1]
    return chosen, float({int(k): v for k, v in accuracy.items()}[chosen])


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    from rxt_hf.modeling_rxt import RxTForCausalLM, special_token_ids
    from rxt_hf.trainers.evaluation import evaluate_memory

    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    if opts["rxt_minutes_source"] not in ("run_summary", "stages"):
        raise ValueError(f"rxt_minutes_source={opts['rxt_minutes_source']!r}: choose 'run_summary' or 'stages'.")
    settings = _settings(opts, seed)
    workdir = tempfile.mkdtemp(prefix="rxt-quality-bench-")
    try:
        with timing.torch_threads(threads):
            payload = timing.new_payload(NAME, DESCRIPTION, smoke, {**opts, "seed": seed, "settings": settings})
            notes = payload["notes"]
            split = multi_turn_split(settings, settings["num_turns"])
            train_rows, test = split["train"], split["test"]
            if settings["eval_conversations"]:
                test = test.select(range(min(int(settings["eval_conversations"]), len(test))))
            test_rows = list(test)

            # --- RxT ------------------------------------------------------------------------------------
            if opts["rxt_model"]:
                folder = _resolve_path(opts["rxt_model"])
                if not (folder / "config.json").is_file():
                    raise ValueError(f"rxt_model={opts['rxt_model']!r} holds no saved model (config.json).")
                mode = "trained-rxt-folder"
                tokenizer = AutoTokenizer.from_pretrained(folder)
                rxt = RxTForCausalLM.from_pretrained(folder).eval()
                facts = trained_rxt_facts(folder)
                recorded = facts["run_summary_train_minutes"] if opts["rxt_minutes_source"] == "run_summary" else facts["stage_minutes"]
                recorded = recorded if recorded is not None else (facts["stage_minutes"] or facts["run_summary_train_minutes"])
                if recorded is None:
                    recorded = float(opts["minutes"])
                    notes.append(f"{folder} records no training time: the Llama gets minutes={recorded}.")
                rxt_training = {**facts, "train_minutes": float(recorded), "minutes_source": opts["rxt_minutes_source"],
                                "folder": str(folder)}
                if facts["smat_config"]:
                    if opts["learning_rate"] is None:
                        settings["learning_rate"] = float(facts["smat_config"].get("learning_rate", settings["learning_rate"]))
                    if opts["batch_size"] is None:
                        smat = facts["smat_config"]  # a model trained before the one vocabulary says per_device_batch_size
                        size = smat.get("per_device_train_batch_size", smat.get("per_device_batch_size"))
                        settings["batch_size"] = int(size if size is not None else settings["batch_size"])
                    settings["interaction_max_length"] = int(facts["smat_config"].get("max_length", settings["interaction_max_length"]))
                notes.append(
                    f"RxT: the trained model {folder} (not retrained here); its training time "
                    f"({float(recorded):.1f} min, from {'run_summary.json train_minutes (the whole recipe: every stage plus tokenizer and saving)' if opts['rxt_minutes_source'] == 'run_summary' else 'the sum of its stage runtimes'}) "
                    "is the Llama's budget. It was measured in another process, possibly with other threads: "
                    "run this benchmark with the threads the recipe used."
                )
                notes.append("Data / evaluation settings come from the recipe option: pass the recipe the model was trained with.")
            else:
                mode = "from-scratch-smat"
                tokenizer, rxt = build_fresh_rxt(settings)
                rxt_training = train_rxt_from_scratch(rxt, tokenizer, settings, float(opts["minutes"]), workdir)
                notes.append(
                    "RxT trained from scratch with the stages collapsed into SMAT (stage 4 only: every component "
                    "trainable from step 0, the recipe's turn curriculum / lr / batch / recall weight) for the budget; "
                    "the full recipe (stages 1-4) usually does better: pass rxt_model=outputs/default/final to compare "
                    "that model instead. max_steps comes from a probe of the step time per curriculum phase (excluded "
                    "from the budget) so that the cosine schedule ends with it."
                )
            rxt.eval()
            rxt_total = sum(p.numel() for p in rxt.parameters())

            # --- evaluation of the RxT -----------------------------------------------------------------------
            with torch.no_grad():
                eval_start = time.perf_counter()
                rxt_eval = evaluate_memory(
                    rxt, tokenizer, test_rows, max_new_tokens=settings["max_new_tokens"],
                    batch_size=settings["eval_batch_size"], memory_from="generated", progress=False,
                )
                rxt_eval_s = time.perf_counter() - eval_start

            # --- the stateless Llamas: 1x, 2x ... the RxT's parameter count, same tokenizer -------------------
            special = special_token_ids(tokenizer)
            train_conversations = [
                encode_conversation(tokenizer, row, settings["interaction_max_length"], settings["recall_weight"])
                for row in train_rows
            ]
            # room for whole conversations (test: generated answers may run to max_new_tokens)
            longest_test = max(
                sum(len(tokenizer(t["query"], add_special_tokens=False)["input_ids"]) + 4 + settings["max_new_tokens"]
                    + len(tokenizer(t["answer"], add_special_tokens=False)["input_ids"])
                    for t in conversation_turns(row))
                for row in test_rows
            )
            longest = max(max(len(ids) for ids, _ in train_conversations), longest_test)
            max_positions = max(256, int(math.ceil(longest / 64.0)) * 64)
            llama_minutes = float(opts["llama_minutes"]) if opts["llama_minutes"] is not None else rxt_training["train_minutes"]
            llamas = []
            for size in _llama_sizes(opts["llama_sizes"]):
                llama_config = matched_llama_config(rxt.config, int(round(size * rxt_total)), max_positions)
                for key, value in special.items():
                    if key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                        setattr(llama_config, key, value)
                torch.manual_seed(seed)
                llama = LlamaForCausalLM(llama_config)
                llama_training = train_llama(
                    llama, train_conversations, llama_minutes, settings["learning_rate"], settings["batch_size"],
                    special["pad_token_id"], seed=seed,
                )
                with torch.no_grad():
                    eval_start = time.perf_counter()
                    llama_eval = evaluate_stateless(
                        llama, tokenizer, test_rows, max_new_tokens=int(rxt_eval["max_new_tokens"]),
                        batch_size=settings["eval_batch_size"], interaction_limit=int(rxt_eval["max_length"]),
                    )
                    llama_eval_s = time.perf_counter() - eval_start
                llamas.append({
                    "size": size,
                    "parameters": sum(p.numel() for p in llama.parameters()),
                    "config": describe_llama(llama),
                    "training": {k: v for k, v in llama_training.items() if k != "log"},
                    "training_log": llama_training["log"],
                    "train_minutes": llama_training["train_minutes"],
                    "steps": llama_training["steps"],
                    "tokens": llama_training["tokens"],
                    "budget_minutes": llama_minutes,
                    "eval_s": llama_eval_s,
                    **llama_eval,
                })
                del llama

            payload["config"]["rxt"] = describe_rxt(rxt, settings["preset"])
            payload["config"]["llamas"] = [llama.pop("config") for llama in llamas]
            payload["config"]["parameters"] = {
                "rxt": {**rxt.num_parameters_by_component(), "total": rxt_total},
                "llamas": [{"size": llama["size"], "total": llama["parameters"],
                            "over_rxt": llama["parameters"] / rxt_total} for llama in llamas],
            }
            rxt_keys = ("answer_loss", "answer_perplexity", "answer_perplexity_no_memory", "recall_accuracy",
                        "recall_accuracy_no_memory", "recall_count", "recall_accuracy_overall",
                        "recall_accuracy_overall_no_memory", "num_answer_tokens", "num_conversations", "num_turns",
                        "max_new_tokens", "max_length", "examples")
            payload["results"] = {
                "mode": mode,
                "data": {
                    "train_conversations": len(train_rows),
                    "test_conversations": len(test_rows),
                    "num_turns": settings["num_turns"],
                    "max_recall_distance": settings["max_recall_distance"],
                },
                "rxt": {
                    "parameters": rxt_total,
                    "training": rxt_training,
                    "train_minutes": rxt_training["train_minutes"],
                    "steps": rxt_training["steps"],
                    "tokens": rxt_training["tokens"],
                    "eval_s": rxt_eval_s,
                    **{key: rxt_eval.get(key) for key in rxt_keys},
                },
                "llamas": llamas,
                "same_scored_answer_tokens": all(
                    rxt_eval["num_answer_tokens"] == llama["num_answer_tokens"] for llama in llamas
                ),
            }

        # --- targets: the RxT against every Llama -------------------------------------------------------
        rxt_ppl = rxt_eval["answer_perplexity"]
        distance, rxt_recall = _recall_at(rxt_eval["recall_accuracy"], TARGET_DISTANCE)
        if distance is None:
            notes.append(f"No recall turn at distance <= {TARGET_DISTANCE} in the test conversations: recall target not measurable.")
        elif distance != TARGET_DISTANCE:
            notes.append(f"No recall turn at distance {TARGET_DISTANCE} in the test conversations: the recall target uses distance {distance}.")
        payload["targets"] = {}
        for llama in llamas:
            name, llama_ppl = _llama_name(llama["size"]), llama["answer_perplexity"]
            llama_distance, llama_recall = _recall_at(llama["recall_accuracy"], distance or TARGET_DISTANCE)
            rxt_at = rxt_recall
            if distance is None or llama_distance != distance:
                rxt_at, llama_recall = 0.0, 0.0
            key = name.replace(".", "_")
            payload["targets"][f"rxt_perplexity_le_llama_{key}"] = timing.target(
                f"RxT answer perplexity <= the stateless Llama's of {name} its parameters (measured: RxT; goal: the "
                "Llama's), equal training minutes",
                float(rxt_ppl) if rxt_ppl is not None else math.inf,
                float(llama_ppl) if llama_ppl is not None else math.inf,
                "<=",
            )
            payload["targets"][f"rxt_recall_d{TARGET_DISTANCE}_gt_llama_{key}"] = timing.target(
                f"RxT recall accuracy at distance {distance or TARGET_DISTANCE} > the stateless Llama's of {name} its "
                "parameters (measured: RxT; goal: the Llama's)",
                rxt_at,
                llama_recall,
                ">",
            )
        payload["results"]["target_distance"] = distance or TARGET_DISTANCE
        notes.append(
            "Same tokenizer, data and answer tokens for all models; each Llama's hidden size, heads and vocabulary are "
            "the RxT's, its depth and feed-forward width are chosen to match its multiple of the RxT's total parameter "
            "count (encoder + memory attention + decoder). Its lr follows warmup + cosine over its time budget."
        )
        if plot:
            _plot(payload, output_dir)
        return timing.finish(NAME, payload, output_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _plot(payload: dict, output_dir) -> None:
    """Grouped bars of recall accuracy by distance: RxT, RxT without memory (control), each stateless Llama."""
    if not timing.have_matplotlib():
        print(timing.MATPLOTLIB_MISSING)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    rxt = results["rxt"]
    series = {
        f"RxT ({rxt['parameters'] / 1e6:.2f}M params, STM)": rxt["recall_accuracy"],
        "RxT, memory reset every turn (control)": rxt["recall_accuracy_no_memory"],
    }
    for llama in results["llamas"]:
        label = f"Llama {_llama_name(llama['size'])} ({llama['parameters'] / 1e6:.2f}M params, history in context)"
        series[label] = llama["recall_accuracy"]
    distances = sorted({int(d) for values in series.values() for d in (values or {})})
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        values = {int(k): v for k, v in (values or {}).items()}
        xs = [d + (i - (len(series) - 1) / 2) * width for d in distances]
        axes.bar(xs, [100.0 * values.get(d, 0.0) for d in distances], width=width, label=label)
    axes.set_xticks(distances)
    axes.set_xlabel("recall distance (turns back)")
    axes.set_ylabel("recall accuracy (%)")
    axes.set_ylim(0, 105)
    llama_minutes = " / ".join(f"{llama['train_minutes']:.1f}" for llama in results["llamas"])
    subtitle = (f"{rxt['train_minutes']:.1f} vs {llama_minutes} training minutes; "
                + timing.machine_subtitle(payload["machine"]))
    axes.set_title(f"Recall accuracy by distance, test split\n{subtitle}", fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = timing.results_dir(output_dir) / f"{NAME}.png"
    figure.savefig(path)
    plt.close(figure)
    payload["plots"].append(str(path))
