"""Stage 5: Memory Reinforcement Learning (MRL) for RxT, on TRL's GRPO configuration and public utilities.

``MRLConfig`` subclasses ``trl.GRPOConfig``; ``MRLTrainer`` is a ``transformers.Trainer`` (with the stage mixin
:class:`~rxt_hf.trainers.trainer_base.RxTStageMixin`) that owns its rollout loop. It is not a ``trl.GRPOTrainer``
subclass: GRPOTrainer's public ``training_step`` / ``compute_loss`` / ``prediction_step`` run through its private
methods (``_prepare_inputs``, ``_generate_and_score_completions``, ``_compute_loss``) and private state (the
generation buffer, ``_metrics``), and an MRL episode is a conversation played through the STM, not one completion
per prompt; subclassing would mean overriding those private methods again. So MRL uses only public API:

- from ``transformers``: ``Trainer`` and its public hooks (``get_train_dataloader``, ``get_eval_dataloader``,
  ``training_step``, ``compute_loss``, ``prediction_step``, ``log``, ``train``, the ``loss_is_scaled_for_ga``
  attribute, callbacks), ``seed_worker``, ``PREFIX_CHECKPOINT_DIR``, ``get_last_checkpoint``,
  ``is_rich_available``; from ``accelerate``: ``set_seed``, ``gather_object``; the Trainer loop itself (optimizer / scheduler, gradient accumulation and clipping, ``checkpoint-N`` saving and
  ``train(resume_from_checkpoint=...)``, trackers) is unchanged;
- from TRL (``trl.trainer.utils``): ``RepeatSampler`` (every conversation repeated ``num_generations`` times,
  ``steps_per_generation`` x ``num_iterations`` times in a row: GRPO's data order), ``shuffle_sequence_dict`` and
  ``split_tensor_dict`` (GRPO's generation buffer: one rollout per ``steps_per_generation * num_iterations``
  micro-steps, shuffled and split into ``steps_per_generation`` micro-batches), ``nanstd``, ``get_callable_name``,
  ``identity`` (the collator), ``print_prompt_completions_sample`` (``log_completions``);
  (TRL's ``selective_log_softmax`` / ``entropy_from_logits`` are not needed: ``ConversationBatch`` returns the
  per-token log-probs and entropies, in float32 and chunked);
- reward functions in TRL's signature ``fn(prompts, completions, completion_ids=..., **columns, trainer_state,
  log_extra, log_metric)`` (``None`` -> NaN, weighted by ``reward_weights``), and TRL's metric names.

The episodes are played with the one conversation primitive,
:class:`~rxt_hf.modeling_rxt.conversation_rxt.ConversationBatch`:

- **rollout** (:meth:`MRLTrainer.rollout`, no gradients): the STM for turn ``k`` is built by encoder + memory
  attention from turns ``< k``; at the turns the curriculum rewards, every one of the ``G`` copies of the
  conversation samples its own answer (``ConversationBatch.play(queries=...)``), the answers are scored with the
  reward functions and turned into group advantages (group = the G rollouts of one conversation at one turn). The
  interaction written into memory is the reference one, or the rollout's own answer once the curriculum says so
  (``own_answers_from_stage``). It returns per-turn tensors ``[R, N, ...]`` (R = rows, N = turns).
- **loss** (:meth:`MRLTrainer.compute_loss` via :meth:`MRLTrainer.replay`): the episode is re-played *with
  gradients* (``ConversationBatch.play(input_ids=...)``, teacher-forced on the sampled answers): the STM for turn k
  is recomputed from the stored interactions of turns < k (starting from the stored initial STM), so the policy
  loss of turn k reaches memory attention and, when unfrozen, the encoder. The loss is IMPO (Implicit Memory
  Policy Optimization): the clipped surrogate (no GAE; advantage = group baseline), plus ``kl_coef`` x KL to the
  previous step's policy (or the initial policy), plus ``memory_reg_coef`` x the mean squared difference between
  consecutive STMs. Optionally (``supervised_coef`` > 0, off by default) plus a supervised term in the manner of
  InstructGPT's PPO-ptx: the teacher-forced cross-entropy of the reference answers of every turn
  (``supervised_turns="all"``) or of the rewarded turns (``"rewarded"``), each read with the re-played STM, one
  pass per conversation.
- ``training_step`` applies the freezing schedule (``freeze_schedule``), takes the micro-batch from the rollout
  buffer and runs ``Trainer.training_step`` on it.

The GRPO group baseline (``(r - mean_group) / (std_group + 1e-4)`` with ``scale_rewards`` "group" / "batch" /
"none") is :func:`group_advantages`; the clipped surrogate with ``epsilon`` / ``epsilon_high`` and the k3 KL
estimator is :func:`impo_loss`.

``beta`` (TRL's reference-model KL, which would reload the model from the Hub by name) must stay 0: the IMPO
KL is ``kl_coef`` with ``kl_reference`` ("previous": a copy of the policy of the previous optimizer step,
"initial": a frozen copy of the starting policy). Both copies are plain ``deepcopy``s of the RxT model; the
reference log-probs are computed by re-playing the episode with the copy's own memory system.

Curriculum: ``curriculum_steps`` (e.g. ``[2, 4, 8, 12, 16]``) is the number of follow-up interactions in an
episode (after the first, memory-only interaction); ``curriculum_starts`` says from which optimizer step each
stage runs (ints, or fractions of ``max_steps``; default: equal parts). ``curriculum_strategies`` per stage:

- ``"cumulative"``: every follow-up turn is answered and rewarded (with the synthetic data: recall questions
  about the last turns and the filler turns in between);
- ``"long-range"``: only recall questions about facts at least ``long_range_min_distance`` turns back are
  answered and rewarded; the unrelated turns in between are written into memory with their reference answers
  (an episode without such a question rewards its last turn). Build the data set with a large enough
  ``max_recall_distance``.

With probability ``stm_reset_probability`` an episode (all G rollouts of a conversation) starts from a random
normal STM (std ``stm_reset_std``) instead of ``init_memory``. ``freeze_schedule`` maps components
(``decoder``, ``memory_attention``, ``encoder``, ``embedding``) to the optimizer step (int) or fraction of
``max_steps`` from which they train (default: memory attention first, then everything but the embedding).

Metrics logged every logging step (``logging_steps=1`` for every step): ``rewards/<fn>/mean`` and ``/std``
per reward function (and ``rewards/<component>/mean`` from a ``CombinedReward``), ``reward``, ``reward_std``,
``kl``, ``stm_change`` (mean squared STM difference per memory update), ``memory_loss``, ``clip_fraction``,
``answer_length``, ``entropy``, ``policy_loss``, ``curriculum/steps``, ``curriculum/stage``, ``stm_reset``
(and ``supervised_loss`` when the supervised term is on). With several processes the reward statistics are over
every process's answers, the loss statistics are the main process's.

Advantage: the group baseline by default; with ``advantage_estimator="critic"`` the reward minus the memory-aware
critic's ``V(query, STM)`` (:mod:`rxt_hf.trainers.mrl_critic`: a copy of the policy's embedding + decoder with a
value head, fitted by MSE to the rewards of every generation round, saved as ``critic.pt`` in each checkpoint).

Not implemented: vLLM generation (``use_vllm`` is refused); reward models passed as ``reward_funcs`` (ids or
``nn.Module``: wrap a sequence classifier in ``rxt_hf.trainers.rxrlhf_online.RewardModelReward``); streamed
(``IterableDataset``) training data; the "previous" KL snapshot is not stored in checkpoints (after a resume it
restarts from the resumed weights, so the first KL after a resume is 0).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, seed_worker
from transformers.utils import is_rich_available
from trl import GRPOConfig
from trl.trainer.utils import (
    RepeatSampler,
    get_callable_name,
    identity,
    nanstd,
    print_prompt_completions_sample,
    shuffle_sequence_dict,
    split_tensor_dict,
)

from rxt_hf.modeling_rxt.conversation_rxt import ConversationBatch
from rxt_hf.modeling_rxt.format_rxt import (
    IGNORE_INDEX,
    encode_texts,
    frame_interaction,
    pad_grid,
    pad_rows,
    special_token_ids,
)

from .mrl_critic import MemoryAwareCritic, critic_advantages, explained_variance
from .rewards import REWARDS_BY_NAME
from .smat_trainer import SMAT_COMPONENTS, component_parameters, resolve_schedule_step
from .trainer_base import RxTStageMixin, is_peft_model

__all__ = ["MRLConfig", "MRLTrainer", "MRLCurriculum", "group_advantages", "impo_loss", "rewarded_turns", "weighted_rewards"]

STRATEGIES = ("cumulative", "long-range")
KL_REFERENCES = ("previous", "initial")
SUPERVISED_TURNS = ("all", "rewarded")
LOSS_TYPES = ("grpo", "bnpo", "dapo")
ADVANTAGE_ESTIMATORS = ("group", "critic")
DEFAULT_REWARDS = ("reference_bleu", "memory_bleu", "length")


def _default_freeze() -> dict[str, int | float | None]:
    return {"memory_attention": 0, "memory_cross_attention": 0.25, "encoder": 0.25, "decoder": 0.25, "embedding": None}


# ------------------------------------------------------------------------------------------------------
# config


@dataclass
class MRLConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the MRL / IMPO fields. GRPO fields keep their meaning (``num_generations`` = G
    rollouts per conversation, ``max_completion_length`` = answer tokens, ``temperature`` / ``top_p`` /
    ``top_k``, ``epsilon`` / ``epsilon_high``, ``scale_rewards``, ``reward_weights``, ``num_iterations``...).

    Changed defaults: ``loss_type="grpo"`` (mean over each answer's tokens, then over answers),
    ``gradient_checkpointing=False``, ``bf16=False``, ``logging_steps=1``, ``report_to="none"``. ``beta`` must
    stay 0 (use ``kl_coef``); ``use_vllm`` is not supported.
    """

    curriculum_steps: list[int] = field(
        default_factory=lambda: [2, 4, 8, 12, 16],
        metadata={"help": "Episode lengths (follow-up interactions after the first, memory-only one) of the "
                          "curriculum stages, e.g. [2, 4, 8, 12, 16]."},
    )
    curriculum_starts: list[float] | None = field(
        default=None,
        metadata={"help": "Optimizer step (int) or fraction of max_steps (float in [0, 1)) at which each stage "
                          "starts; the first is 0. None: equal parts of max_steps."},
    )
    curriculum_strategies: list[str] | None = field(
        default=None,
        metadata={"help": "Strategy per stage: 'cumulative' (reward every follow-up turn) or 'long-range' "
                          "(reward only recall questions at least long_range_min_distance turns back). None: "
                          "'cumulative' for the first stage, then alternating 'long-range' / 'cumulative'."},
    )
    long_range_min_distance: int = field(
        default=2, metadata={"help": "Minimum recall distance of the questions rewarded by 'long-range'."}
    )
    own_answers_from_stage: int | None = field(
        default=None,
        metadata={"help": "From this curriculum stage (index) on, memory is updated with the rollout's own "
                          "answers instead of the reference answers. None: always reference answers."},
    )
    stm_reset_probability: float = field(
        default=0.0,
        metadata={"help": "Probability that an episode starts from a random normal STM instead of init_memory."},
    )
    stm_reset_std: float = field(default=0.02, metadata={"help": "Std of the random STM of a reset."})
    memory_reg_coef: float = field(
        default=0.1,
        metadata={"help": "IMPO memory regularisation: weight of the mean squared difference between consecutive "
                          "STMs."},
    )
    kl_coef: float = field(
        default=0.01,
        metadata={"help": "IMPO policy stabilisation: weight of the (k3) KL between the current policy and "
                          "kl_reference, on the sampled answer tokens. 0 disables it."},
    )
    supervised_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of a supervised term added to IMPO (like InstructGPT's PPO-ptx): the teacher-forced "
                          "cross-entropy of every turn's reference answer, read with the episode's STM (one pass "
                          "per conversation). 0 disables it (pure IMPO)."},
    )
    supervised_turns: str = field(
        default="all",
        metadata={"help": "Turns of the supervised term: 'all' (every turn of the episode) or 'rewarded' (only the "
                          "turns the curriculum rewards, e.g. the long-range recall questions)."},
    )
    kl_reference: str = field(
        default="previous",
        metadata={"help": "'previous' (the policy of the previous optimizer step) or 'initial' (the starting "
                          "policy, like TRL's reference model)."},
    )
    freeze_schedule: dict | str | None = field(
        default=None,
        metadata={"help": "Component -> optimizer step (int) or fraction of max_steps (float) from which it trains "
                          "(decoder incl. lm_head, memory_attention, encoder, embedding; missing or None: frozen). "
                          "A JSON string is accepted. None: {'memory_attention': 0, 'encoder': 0.25, 'decoder': 0.25, "
                          "'embedding': None}. Ignored for PEFT models."},
    )
    max_interaction_length: int = field(
        default=128, metadata={"help": "Maximum tokens of one interaction ([BOS][Q] query [A] answer [EOS])."}
    )
    reward_functions: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the reward functions when the trainer gets no reward_funcs: any of "
                          "'reference_bleu', 'memory_bleu', 'length', 'keyword_recall' (weighted by reward_weights). "
                          "None: ['reference_bleu', 'memory_bleu', 'length']."},
    )
    advantage_estimator: str = field(
        default="group",
        metadata={"help": "'group' (TRL's group baseline: reward minus the mean of the conversation's G rollouts) or "
                          "'critic' (reward minus the memory-aware critic's V(query, STM), see trainers.mrl_critic)."},
    )
    critic_learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate of the memory-aware critic (advantage_estimator='critic')."}
    )
    critic_epochs: int = field(
        default=1, metadata={"help": "Critic updates (full-batch MSE steps) per generation round."}
    )
    # changed GRPO defaults
    loss_type: str = field(default="grpo", metadata={"help": "'grpo' (per-answer token mean), 'bnpo' / 'dapo' "
                                                             "(token mean over the batch)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Not used by MRL."})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers (transformers)."})

    def summary(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the stage history / model card."""
        keys = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "num_generations", "max_completion_length", "temperature", "curriculum_steps", "curriculum_starts",
                "curriculum_strategies", "long_range_min_distance", "own_answers_from_stage", "stm_reset_probability",
                "memory_reg_coef", "kl_coef", "supervised_coef", "supervised_turns", "kl_reference", "freeze_schedule",
                "reward_functions", "reward_weights",
                "advantage_estimator", "scale_rewards", "loss_type", "epsilon", "lr_scheduler_type", "seed")
        return {k: getattr(self, k) for k in keys}

    def __post_init__(self):
        if isinstance(self.freeze_schedule, str):
            self.freeze_schedule = json.loads(self.freeze_schedule)
        super().__post_init__()

        def fail(name, value, fix):
            raise ValueError(f"MRLConfig.{name}={value!r} is invalid: {fix}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.beta != 0.0:
            fail("beta", self.beta, "MRL uses kl_coef / kl_reference for its KL term; keep beta=0.0.")
        if self.use_vllm:
            fail("use_vllm", self.use_vllm, "RxT generation needs the STM; vLLM is not supported, set use_vllm=False.")
        if self.loss_type not in LOSS_TYPES:
            fail("loss_type", self.loss_type, f"choose one of {LOSS_TYPES}.")
        if self.remove_unused_columns:
            fail("remove_unused_columns", True, "MRL needs the conversation columns; set it to False.")
        steps = self.curriculum_steps
        if not isinstance(steps, (list, tuple)) or not steps or not all(is_int(s) and s >= 1 for s in steps):
            fail("curriculum_steps", steps, "give a non-empty list of ints >= 1, e.g. [2, 4, 8, 12, 16].")
        self.curriculum_steps = list(steps)
        n = len(self.curriculum_steps)
        if self.curriculum_starts is not None:
            starts = list(self.curriculum_starts)
            if len(starts) != n:
                fail("curriculum_starts", starts, f"give one start per stage ({n}).")
            resolved = [resolve_schedule_step(s, max(self.max_steps, 0), f"curriculum_starts[{i}]")
                        for i, s in enumerate(starts)]
            if any(s is None for s in resolved) or starts[0] != 0 or resolved != sorted(resolved):
                fail("curriculum_starts", starts, "the first start must be 0 and starts must not decrease.")
            self.curriculum_starts = starts
        if self.curriculum_strategies is not None:
            strategies = list(self.curriculum_strategies)
            if len(strategies) != n or any(s not in STRATEGIES for s in strategies):
                fail("curriculum_strategies", strategies, f"give one of {STRATEGIES} per stage ({n}).")
            self.curriculum_strategies = strategies
        if not is_int(self.long_range_min_distance) or self.long_range_min_distance < 1:
            fail("long_range_min_distance", self.long_range_min_distance, "it must be an int >= 1.")
        if self.own_answers_from_stage is not None and (
            not is_int(self.own_answers_from_stage) or not 0 <= self.own_answers_from_stage < n
        ):
            fail("own_answers_from_stage", self.own_answers_from_stage, f"give a stage index in [0, {n}) or None.")
        if not isinstance(self.stm_reset_probability, (int, float)) or not 0 <= self.stm_reset_probability <= 1:
            fail("stm_reset_probability", self.stm_reset_probability, "it must be a number in [0, 1].")
        for name in ("stm_reset_std", "memory_reg_coef", "kl_coef", "supervised_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
                fail(name, value, "it must be a finite number >= 0.")
        if self.supervised_turns not in SUPERVISED_TURNS:
            fail("supervised_turns", self.supervised_turns, f"choose one of {SUPERVISED_TURNS}.")
        if self.kl_reference not in KL_REFERENCES:
            fail("kl_reference", self.kl_reference, f"choose one of {KL_REFERENCES}.")
        if self.freeze_schedule is None:
            self.freeze_schedule = _default_freeze()
        if not isinstance(self.freeze_schedule, Mapping):
            fail("freeze_schedule", self.freeze_schedule, f"give a dict like {_default_freeze()}.")
        self.freeze_schedule = dict(self.freeze_schedule)
        for key, value in self.freeze_schedule.items():
            if key not in SMAT_COMPONENTS:
                fail("freeze_schedule", self.freeze_schedule, f"unknown component {key!r}; use {SMAT_COMPONENTS}.")
            resolve_schedule_step(value, max(self.max_steps, 0), f"freeze_schedule[{key!r}]")
        if all(v is None for v in self.freeze_schedule.values()):
            fail("freeze_schedule", self.freeze_schedule, "it trains nothing; give a component a start step.")
        if not is_int(self.max_interaction_length) or self.max_interaction_length < 8:
            fail("max_interaction_length", self.max_interaction_length, "it must be an int >= 8.")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            fail("advantage_estimator", self.advantage_estimator, f"choose one of {ADVANTAGE_ESTIMATORS}.")
        if (not isinstance(self.critic_learning_rate, (int, float)) or isinstance(self.critic_learning_rate, bool)
                or not self.critic_learning_rate > 0 or not math.isfinite(self.critic_learning_rate)):
            fail("critic_learning_rate", self.critic_learning_rate, "it must be a finite number > 0.")
        if not is_int(self.critic_epochs) or self.critic_epochs < 1:
            fail("critic_epochs", self.critic_epochs, "it must be an int >= 1.")
        if self.reward_functions is not None:
            names = self.reward_functions
            if isinstance(names, str) or not names or any(n not in REWARDS_BY_NAME for n in names):
                fail("reward_functions", names, f"give a non-empty list of names from {sorted(REWARDS_BY_NAME)}.")
            self.reward_functions = list(names)


# ------------------------------------------------------------------------------------------------------
# pure pieces (unit-tested)


class MRLCurriculum:
    """Which stage (episode length, strategy, memory answers) optimizer step ``step`` uses."""

    def __init__(self, args: MRLConfig):
        self.steps = list(args.curriculum_steps)
        n = len(self.steps)
        max_steps = max(int(args.max_steps), 1)
        if args.curriculum_starts is None:
            self.starts = [int(math.floor(i * max_steps / n)) for i in range(n)]
        else:
            self.starts = [resolve_schedule_step(s, max_steps) for s in args.curriculum_starts]
        if args.curriculum_strategies is None:
            self.strategies = ["cumulative"] + ["long-range" if i % 2 else "cumulative" for i in range(1, n)]
        else:
            self.strategies = list(args.curriculum_strategies)
        self.own_answers_from_stage = args.own_answers_from_stage

    def stage(self, step: int) -> int:
        index = 0
        for i, start in enumerate(self.starts):
            if step >= start:
                index = i
        return index

    def num_steps(self, step: int) -> int:
        return self.steps[self.stage(step)]

    def strategy(self, step: int) -> str:
        return self.strategies[self.stage(step)]

    def own_answers(self, step: int) -> bool:
        return self.own_answers_from_stage is not None and self.stage(step) >= self.own_answers_from_stage


def rewarded_turns(distances: Sequence[int], strategy: str, min_distance: int = 2) -> list[int]:
    """Turn indices (1-based follow-ups; turn 0 is memory-only) an episode rewards.

    ``distances[t]`` is the recall distance of turn ``t`` (0: not a recall question; ``distances[0]`` is 0).
    """
    follow = list(range(1, len(distances)))
    if strategy == "cumulative":
        return follow
    if strategy == "long-range":
        picked = [t for t in follow if distances[t] >= min_distance]
        return picked or follow[-1:]
    raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}.")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's group baseline as in TRL 1.16 (``sum_then_normalize``): ``(r - mean_group) / (std_group + 1e-4)``.

    ``rewards`` ``[M]`` holds consecutive groups of ``num_generations``; NaN rewards are left out of the
    statistics and get advantage 0. ``scale_rewards``: "group" (std per group), "batch" (std of the whole
    batch) or "none" (no division).
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards={scale_rewards!r}: choose 'group', 'batch' or 'none'.")
    advantages = rewards - mean
    if std is not None:
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def impo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_per_token_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    stm_mse: torch.Tensor | None = None,
    memory_reg_coef: float = 0.0,
    loss_type: str = "grpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The IMPO objective on ``M`` sampled answers of ``L`` tokens.

    ``ratio = exp(logp - old_logp)``; ``per_token = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    + kl_coef * (exp(ref - logp) - (ref - logp) - 1)`` (TRL's clipped surrogate and k3 KL estimator);
    aggregated over the ``mask`` by ``loss_type`` ("grpo": mean over each answer's tokens, then over answers;
    "bnpo"/"dapo": mean over all tokens); plus ``memory_reg_coef * stm_mse`` (mean squared difference between
    consecutive STMs). Returns ``(loss, stats)`` with ``policy_loss``, ``kl``, ``clip_fraction``,
    ``memory_loss`` (detached).

    Shapes: ``per_token_logps``, ``old_per_token_logps``, ``ref_per_token_logps``, ``mask`` ``[M, L]``;
    ``advantages`` ``[M]``.
    """
    mask = mask.to(per_token_logps.dtype)
    adv = advantages.unsqueeze(1)  # [M, 1]
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_per_token_logps is not None and kl_coef != 0.0:
        delta = ref_per_token_logps - per_token_logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl

    def aggregate(x):
        if loss_type == "grpo":
            return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if loss_type in ("bnpo", "dapo"):
            return (x * mask).sum() / mask.sum().clamp(min=1.0)
        raise ValueError(f"loss_type={loss_type!r}: choose one of {LOSS_TYPES}.")

    loss = aggregate(per_token)
    memory_loss = stm_mse if stm_mse is not None else per_token_logps.new_zeros(())
    if stm_mse is not None and memory_reg_coef != 0.0:
        loss = loss + memory_reg_coef * stm_mse
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    tokens = mask.sum().clamp(min=1.0)
    stats = {
        "policy_loss": aggregate(-torch.min(ratio * adv, clipped * adv)).detach(),
        "kl": ((kl * mask).sum() / tokens).detach() if kl is not None else per_token.new_zeros(()),
        "clip_fraction": ((is_clipped.to(mask.dtype) * mask).sum() / tokens).detach(),
        "memory_loss": memory_loss.detach(),
    }
    return loss, stats


# ------------------------------------------------------------------------------------------------------
# trainer


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[M]`` reward of each completion: the ``weights`` ``[F]``-weighted sum of ``rewards_per_func`` ``[M, F]``
    over the functions that scored it (NaN = no value); NaN when none did."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    return rewards


def _first_of_groups(memory_group: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: the first row of every memory group (ids in any order, as after the buffer's shuffling)."""
    _, inverse = torch.unique(memory_group, return_inverse=True)
    rows = torch.arange(memory_group.numel(), device=memory_group.device)
    first = torch.full((int(inverse.max()) + 1,), memory_group.numel(), device=memory_group.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, rows, "amin")
    leaders = torch.zeros(memory_group.numel(), dtype=torch.bool, device=memory_group.device)
    leaders[first] = True
    return leaders


class _CriticCheckpoint(TrainerCallback):
    """Saves the memory-aware critic into every ``checkpoint-N`` folder the Trainer writes."""

    def __init__(self, trainer: "MRLTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.trainer.save_critic(folder)
        return control


class MRLTrainer(RxTStageMixin, Trainer):
    """Memory Reinforcement Learning (stage 5) with IMPO: a ``transformers.Trainer`` over conversations, configured
    by an ``MRLConfig`` (a ``trl.GRPOConfig``).

    Why not a ``trl.GRPOTrainer`` subclass: its public ``training_step`` / ``compute_loss`` / ``prediction_step``
    go through private methods (``_prepare_inputs``, ``_generate_and_score_completions``, ``_compute_loss``) and
    private state that an MRL episode (a conversation played through the STM) would have to override, which ties
    the code to one TRL release. This class keeps GRPO's configuration, data order (TRL's ``RepeatSampler``),
    generation buffer (``shuffle_sequence_dict`` / ``split_tensor_dict``), reward-function signature and metric
    names, and overrides only public ``transformers.Trainer`` hooks.

    ``train_dataset`` holds multi-turn rows (``query``, ``answer``, ``interactions: [{query, answer}]``,
    optional ``recall_distance`` per follow-up and ``conversation_id``), e.g. from
    ``build_synthetic_dataset("multi-turn", ...)``. ``reward_funcs`` are TRL reward functions (callables); they
    receive the columns ``answer`` (reference text), ``reference_ids``, ``memory`` / ``memory_ids`` (the remembered
    interaction a recall question refers to, else ``None``), ``answer_keywords`` (the key words of the fact it
    asks for, ``[]`` for none), ``recall_distance``, ``turn`` and ``query``.
    Default: the functions ``args.reward_functions`` names (``[reference_bleu_reward, memory_bleu_reward,
    length_reward]`` when None). ``peft_config`` (a ``peft.PeftConfig``) wraps the model with
    ``peft.get_peft_model`` (the freezing schedule then does not apply). See the module docstring for the episode
    and the loss.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
    >>> from rxt_hf.trainers.synthetic_data import build_synthetic_dataset
    >>> from rxt_hf.trainers.mrl_trainer import MRLConfig, MRLTrainer
    >>> data = build_synthetic_dataset("multi-turn", num_conversations=16, num_turns=4, max_recall_distance=2,
    ...                                seed=0)["train"]
    >>> tokenizer = build_tokenizer([r["query"] + " " + r["answer"] for r in data], vocab_size=300,
    ...                             min_frequency=1, model_max_length=64)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))
    >>> args = MRLConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
    ...                  num_generations=2, max_completion_length=6, curriculum_steps=[1, 3],
    ...                  use_cpu=True, disable_tqdm=True, save_strategy="no")
    >>> trainer = MRLTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints each log record
    ...     _ = trainer.train()
    >>> trainer.curriculum.num_steps(0), trainer.curriculum.num_steps(1)
    (1, 3)
    >>> sorted(k for k in trainer.state.log_history[0] if k in ("kl", "stm_change", "clip_fraction"))
    ['clip_fraction', 'kl', 'stm_change']

    ```
    """

    stage_name = "mrl"
    loss_is_scaled_for_ga = False  # compute_loss returns the micro-batch's loss; the Trainer divides it

    def __init__(self, model, reward_funcs=None, args: MRLConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 peft_config=None):
        if not isinstance(args, MRLConfig):
            raise TypeError(f"args must be an MRLConfig, got {type(args).__name__}; build one with "
                            "MRLConfig(output_dir=...).")
        if isinstance(model, str):
            raise TypeError("MRLTrainer needs an instantiated RxTForCausalLM (load it with from_pretrained first).")
        if processing_class is None:
            raise ValueError("MRLTrainer needs processing_class=<the RxT tokenizer>.")
        if train_dataset is None:
            raise ValueError("MRLTrainer needs a multi-turn train_dataset (query, answer, interactions).")
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if isinstance(data, IterableDataset):
                raise TypeError(f"{name} is a streamed IterableDataset; MRLTrainer samples conversations by index "
                                "(GRPO's RepeatSampler): load it as a datasets.Dataset (e.g. streaming=False).")
        missing = [c for c in ("query", "answer", "interactions") if c not in (train_dataset.column_names or [])]
        if missing:
            raise ValueError(f"train_dataset lacks the multi-turn columns {missing}; build it with "
                             "build_synthetic_dataset('multi-turn', ...) or load_rxt_dataset(..., kind='multi-turn').")
        if reward_funcs is None:
            reward_funcs = [REWARDS_BY_NAME[n] for n in (args.reward_functions or DEFAULT_REWARDS)]
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for func in reward_funcs:
            if isinstance(func, (str, torch.nn.Module)) or not callable(func):
                raise TypeError(
                    f"reward_funcs holds {func!r}: MRLTrainer takes callables in TRL's reward-function signature "
                    "fn(prompts, completions, **columns) -> list[float | None]; wrap a reward model in "
                    "rxt_hf.trainers.rxrlhf_online.RewardModelReward(model, tokenizer)."
                )
        if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
            raise ValueError(f"MRLConfig.reward_weights={args.reward_weights!r} has {len(args.reward_weights)} "
                             f"weights for {len(reward_funcs)} reward functions; give one weight per function.")
        self.peft_adapters = is_peft_model(model) or peft_config is not None
        self.start_stage_record(self.peft_adapters)
        if not self.peft_adapters:
            # Every parameter trainable while the optimizer is built; the schedule freezes per step.
            for param in model.parameters():
                param.requires_grad_(True)
        self.curriculum = MRLCurriculum(args)
        self.special_ids = special_token_ids(processing_class)
        # The optional memory-aware critic: its own copy of embedding + decoder, its own optimizer.
        self.critic = MemoryAwareCritic(model) if args.advantage_estimator == "critic" else None
        # The model generates with the tokenizer's padding; LoRA adapters start from the seed (as in TRL).
        model.config.pad_token_id = processing_class.pad_token_id
        model.generation_config.pad_token_id = processing_class.pad_token_id
        set_seed(args.seed)
        if peft_config is not None:
            from peft import get_peft_model

            if is_peft_model(model):
                raise ValueError("peft_config was given with a PeftModel; merge its adapters first "
                                 "(model.merge_and_unload()) or pass the PeftModel without peft_config.")
            model = get_peft_model(model, peft_config)
        # The KL reference: a frozen copy of the starting policy (with its adapters, so "previous" can load the
        # policy's state dict).
        self.kl_model = None
        if args.kl_coef > 0:
            self.kl_model = copy.deepcopy(model).eval()
            for param in self.kl_model.parameters():
                param.requires_grad_(False)
        self.reward_funcs = reward_funcs
        self.reward_func_names = [get_callable_name(func) for func in reward_funcs]
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        super().__init__(model=model, args=args, data_collator=identity, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self.refuse_data_parallel()
        if self.kl_model is not None:
            self.kl_model.to(self.accelerator.device)
        self.critic_optimizer = None
        if self.critic is not None:
            self.critic.to(self.accelerator.device)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_learning_rate)
            self.add_callback(_CriticCheckpoint(self))
        self.reset_generator = torch.Generator().manual_seed(int(args.seed) + 17)
        self.freeze_steps = {
            name: resolve_schedule_step(args.freeze_schedule.get(name), max(args.max_steps, 1))
            for name in SMAT_COMPONENTS
        }
        # Metrics averaged per logging step ("train" / "eval"), reward-function metrics of the current rollout,
        # the last rollout's completions (log_completions), the rollout buffer and the micro-steps run.
        self.step_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.reward_metrics = defaultdict(list)
        self.completion_table: dict[str, Any] = {}
        self.rollout_buffer: list[dict[str, Any]] | None = None
        self.micro_steps = 0
        # Each process samples its own answers (the seed differs per process, as in TRL).
        set_seed(args.seed, device_specific=True)

    def data_description(self) -> str:
        data = self.train_dataset
        size = len(data) if hasattr(data, "__len__") else "streamed"
        return (f"Multi-turn conversations ({size} training conversations), rolled out as MRL episodes of "
                f"{'/'.join(str(s) for s in self.curriculum.steps)} follow-up interactions.")

    # --- data: GRPO's order ---------------------------------------------------------------------------

    def conversation_loader(self, dataset, batch_size: int, sampler: RepeatSampler, training: bool) -> DataLoader:
        """A prepared DataLoader of conversation rows (lists of dicts, TRL's ``identity`` collator)."""
        args = self.args
        params = dict(batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
                      drop_last=args.dataloader_drop_last, num_workers=args.dataloader_num_workers,
                      pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
                      prefetch_factor=args.dataloader_prefetch_factor)
        if training:
            params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers,
                                               rank=args.process_index)
        return self.accelerator.prepare(DataLoader(dataset, **params))

    def get_train_dataloader(self) -> DataLoader:
        """GRPO's training order: every loader batch is one generation batch (``per_device_train_batch_size x
        steps_per_generation`` rows), each conversation repeated ``num_generations`` times, the batch repeated
        ``num_iterations x steps_per_generation`` times (see TRL's ``RepeatSampler``)."""
        args = self.args
        sampler = RepeatSampler(self.train_dataset, mini_repeat_count=args.num_generations,
                                batch_size=args.generation_batch_size // args.num_generations,
                                repeat_count=args.num_iterations * args.steps_per_generation,
                                shuffle=args.shuffle_dataset, seed=args.seed)
        return self.conversation_loader(self.train_dataset, args.per_device_train_batch_size * args.steps_per_generation,
                                        sampler, training=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("MRLTrainer.evaluate needs an eval_dataset (multi-turn rows).")
        generations = self.args.num_generations_eval or self.args.num_generations
        sampler = RepeatSampler(dataset, mini_repeat_count=generations, seed=self.args.seed)
        return self.conversation_loader(dataset, self.args.eval_batch_size, sampler, training=False)

    # --- critic --------------------------------------------------------------------------------------

    CRITIC_FILE = "critic.pt"

    def save_critic(self, folder: str) -> None:
        """Write the critic and its optimizer state to ``folder/critic.pt``."""
        state = {"critic": self.critic.state_dict(), "optimizer": self.critic_optimizer.state_dict()}
        torch.save(state, os.path.join(folder, self.CRITIC_FILE))

    def load_critic(self, folder: str) -> bool:
        """Restore the critic from ``folder/critic.pt``; False if the checkpoint has none (it then starts fresh)."""
        path = os.path.join(folder, self.CRITIC_FILE)
        if not os.path.isfile(path):
            return False
        state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["optimizer"])
        return True

    def train(self, resume_from_checkpoint=None, **kwargs):
        if self.critic is not None and resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            if folder and not self.load_critic(folder):
                warnings.warn(f"{folder} holds no {self.CRITIC_FILE}; the memory-aware critic starts fresh.",
                              stacklevel=2)
        self.rollout_buffer, self.micro_steps = None, 0
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def critic_values(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, stm: torch.Tensor,
                      rewards: torch.Tensor, fit: bool) -> torch.Tensor:
        """V for the scored answers (before fitting), then ``critic_epochs`` MSE steps on the finite rewards."""
        self.critic.eval()
        values = self.critic(prompt_ids, prompt_mask, stm)
        if fit:
            keep = torch.isfinite(rewards)
            target = rewards[keep].to(values.device, torch.float32)
            self.critic.train()
            with torch.enable_grad():
                for _ in range(self.args.critic_epochs):
                    loss = F.mse_loss(self.critic(prompt_ids[keep], prompt_mask[keep], stm[keep]), target)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
                    self.critic_optimizer.step()
            self.step_metrics["train"]["critic/loss"].append(loss.item())
        metrics = self.step_metrics["train" if fit else "eval"]
        metrics["critic/value_mean"].append(values.mean().item())
        metrics["critic/explained_variance"].append(explained_variance(values.cpu(), rewards.cpu()))
        return values

    # --- freezing ------------------------------------------------------------------------------------

    def component_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters per schedulable component (shared with the SMAT trainer)."""
        return component_parameters(self.accelerator.unwrap_model(self.model))

    def trainable_components(self, step: int) -> list[str]:
        steps = self.freeze_steps
        return [n for n in SMAT_COMPONENTS if steps.get(n) is not None and step >= steps[n]]

    def apply_freeze(self, step: int) -> list[str]:
        """Set ``requires_grad`` for optimizer step ``step`` (no-op for PEFT models); returns trainable parts."""
        if self.peft_adapters:
            return []
        active = self.trainable_components(step)
        for name, params in self.component_parameters().items():
            for param in params:
                param.requires_grad_(name in active)
        return active

    # --- Trainer hooks --------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Freeze for this step, roll out the generation batch ``inputs`` when the buffer is due (GRPO's
        generation buffer), then ``Trainer.training_step`` on this micro-step's share of the rollout."""
        self.apply_freeze(self.state.global_step)
        model.train()
        args = self.args
        if self.micro_steps % (args.steps_per_generation * args.num_iterations) == 0 or self.rollout_buffer is None:
            episodes = shuffle_sequence_dict(self.rollout(inputs, mode="train"))
            self.rollout_buffer = split_tensor_dict(episodes, args.steps_per_generation)
        episodes = self.rollout_buffer[self.micro_steps % args.steps_per_generation]
        loss = super().training_step(model, episodes, num_items_in_batch)
        self.micro_steps += 1
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: roll out the batch's conversations and return the IMPO loss (no labels, no logits)."""
        episodes = self.rollout(inputs, mode="eval")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, episodes)
        return loss.mean().detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the metrics recorded since the last log (NaN left out; ``eval_`` in evaluation)."""
        mode = "train" if self.model.training else "eval"
        for key, values in self.step_metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            logs[f"eval_{key}" if mode == "eval" else key] = sum(valid) / len(valid) if valid else None
        super().log(logs, start_time)
        self.step_metrics[mode].clear()
        table = self.completion_table
        if self.args.log_completions and table and self.accelerator.is_main_process and is_rich_available():
            print_prompt_completions_sample(table["prompt"], table["completion"], table["rewards"],
                                            table["advantages"], self.state.global_step,
                                            self.args.num_completions_to_print, extra=dict(table.get("extra", {})))
            self.completion_table = {}  # printed once

    # --- reward functions ------------------------------------------------------------------------------

    def log_metric(self, name: str, value: float) -> None:
        """``log_metric`` of the reward functions: a scalar averaged into this rollout's metrics."""
        self.reward_metrics[name].append(value)

    def log_completion_extra(self, column: str, values: list) -> None:
        """``log_extra`` of the reward functions: an extra column of the completions table."""
        self.completion_table.setdefault("extra", defaultdict(list))[column].extend(values)

    def score_rewards(self, columns: list[dict[str, Any]], prompts: list[str], completions: list[str],
                      completion_ids: list[list[int]]) -> torch.Tensor:
        """``[M, F]`` rewards of M completions by the F reward functions, called in TRL's signature with the
        dataset ``columns`` (one dict per completion) as lists; ``None`` becomes NaN. Async functions are awaited."""
        device = self.accelerator.device
        kwargs = {key: [row[key] for row in columns] for key in (columns[0] if columns else {})}
        rewards = torch.zeros(len(prompts), len(self.reward_funcs), device=device)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs,
                          trainer_state=self.state, log_extra=self.log_completion_extra, log_metric=self.log_metric)
            if inspect.isawaitable(values):
                values = asyncio.run(values)
            values = [torch.nan if v is None else v for v in values]
            if len(values) != len(prompts):
                raise ValueError(f"the reward function {name!r} returned {len(values)} rewards for {len(prompts)} "
                                 "completions; it must return one reward (or None) per completion.")
            rewards[:, i] = torch.tensor(values, dtype=torch.float32, device=device)
        if bool(torch.isnan(rewards).all(dim=1).any()):
            warnings.warn("every reward function returned None for some completions; they get advantage 0.",
                          stacklevel=2)
        return rewards

    # --- episodes ------------------------------------------------------------------------------------

    def episode_turns(self, row: dict, num_steps: int) -> list[dict]:
        """The first ``num_steps + 1`` turns of a conversation row, with ``distance`` and ``keywords``."""
        turns = [{"query": row["query"], "answer": row["answer"]}, *[dict(t) for t in row["interactions"] or []]]
        dist = [0, *list(row.get("recall_distance") or [0] * (len(turns) - 1))]
        keywords = [[], *list(row.get("answer_keywords") or [[]] * (len(turns) - 1))]
        for t, (d, kws) in enumerate(zip(dist, keywords)):
            turns[t]["distance"] = int(d or 0)
            turns[t]["keywords"] = list(kws or [])
        return turns[: num_steps + 1]

    def initial_stm(self, model, groups: int, generations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[R, L, S, D]`` initial STM and ``[R]`` reset flags (one draw per conversation group)."""
        stm = model.init_memory(groups * generations).detach()
        draw = torch.rand(groups, generator=self.reset_generator) < self.args.stm_reset_probability
        reset = draw.repeat_interleave(generations).to(stm.device)
        if reset.any():
            shape = (groups, *stm.shape[1:])  # one random state per conversation, shared by its G rollouts
            noise = torch.randn(shape, generator=self.reset_generator).to(stm) * self.args.stm_reset_std
            noise = noise.repeat_interleave(generations, dim=0)
            stm = torch.where(reset.view(-1, *[1] * (stm.dim() - 1)), noise, stm)
        return stm, reset

    @torch.no_grad()
    def rollout(self, inputs: list[dict[str, Any]], mode: str = "train") -> dict[str, Any]:
        """Play the conversations ``inputs`` (G consecutive copies each) as MRL episodes: sample answers at the
        rewarded turns, score them, compute advantages. Returns the per-turn tensors the loss re-plays."""
        args = self.args
        device = self.accelerator.device
        G = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        step = self.state.global_step
        num_steps = self.curriculum.num_steps(step)
        strategy = self.curriculum.strategy(step)
        own = self.curriculum.own_answers(step)
        R = len(inputs)
        if R % G:
            raise ValueError(f"the batch has {R} rows, not a multiple of num_generations={G}.")
        tok = self.processing_class
        ids = self.special_ids
        pad, eos = ids["pad_token_id"], ids["eos_token_id"]
        unwrapped = self.accelerator.unwrap_model(self.model)
        limit = getattr(unwrapped.config, "max_position_embeddings", None) or args.max_interaction_length
        max_len = min(args.max_interaction_length, int(limit))
        if max_len - args.max_completion_length < 4:
            raise ValueError(f"max_completion_length={args.max_completion_length} leaves no room for a query in "
                             f"{max_len}-token interactions; lower it or raise max_interaction_length.")

        episodes = [self.episode_turns(row, num_steps) for row in inputs]
        for g in range(0, R, G):  # the repeat sampler puts the G copies of a conversation next to each other
            key = [(inputs[g + i].get("conversation_id"), inputs[g + i]["query"]) for i in range(G)]
            if any(k != key[0] for k in key):
                raise ValueError("rows of a generation group differ; MRLTrainer needs GRPO's RepeatSampler order.")
        N = max(len(e) for e in episodes)
        scored_turns = [rewarded_turns([t["distance"] for t in e], strategy, args.long_range_min_distance)
                        for e in episodes]
        # tokenised queries / reference answers; prompts [BOS][Q] query [A] (the query cut as in a whole interaction)
        flat = [(r, t) for r, e in enumerate(episodes) for t in range(len(e))]
        texts = [episodes[r][t]["query"] for r, t in flat] + [episodes[r][t]["answer"] for r, t in flat]
        enc = encode_texts(tok, texts)
        q_ids = {rt: enc[i] for i, rt in enumerate(flat)}
        a_ids = {rt: enc[len(flat) + i] for i, rt in enumerate(flat)}
        references = {rt: frame_interaction(ids, q_ids[rt], a_ids[rt], max_length=max_len, truncate=True)
                      for rt in flat}
        prompts_tok = {}
        for rt in flat:
            framed = frame_interaction(ids, q_ids[rt], [], max_length=max_len - args.max_completion_length,
                                       truncate=True)
            prompts_tok[rt] = framed.input_ids[: framed.prompt_length]
        present = torch.tensor([[t < len(e) for t in range(N)] for e in episodes], dtype=torch.bool)
        scored = torch.tensor([[t in s for t in range(N)] for s in scored_turns], dtype=torch.bool)

        stm, reset = self.initial_stm(unwrapped, R // G, G)
        # With reference answers in memory the G rollouts of a conversation share every STM: update it once per
        # conversation. With their own answers each rollout has its own memory.
        memory_group = torch.arange(R, device=device) if own else torch.arange(R, device=device) // G
        initial_stm = stm.clone()
        sampled = []  # the sampled tokens of each generate call (ConversationBatch returns them [EOS]-closed)

        def sample(model, input_ids, attention_mask, stm_state, **kwargs):
            sequences = model.generate(input_ids, attention_mask=attention_mask, stm_state=stm_state, **kwargs)
            sampled.append(sequences[:, input_ids.shape[1]:].tolist())
            return sequences

        conversations = ConversationBatch(unwrapped, stm, memory_group=memory_group)
        play = conversations.play(
            queries=[[prompts_tok[r, t] for t in range(len(e))] for r, e in enumerate(episodes)],
            present=present, scored=scored, memory_from="generated" if own else "input",
            memory_ids=[[references[r, t].input_ids for t in range(len(e))] for r, e in enumerate(episodes)],
            generate_fn=sample,
            generate_kwargs=dict(do_sample=True, max_new_tokens=args.max_completion_length,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
                                 pad_token_id=pad, eos_token_id=eos),
        )
        completions: dict[tuple[int, int], list[int]] = {}  # the sampled answers, as scored by the loss
        mem_seqs = {rt: references[rt].input_ids for rt in flat}  # the interactions written into memory
        states: dict[tuple[int, int], torch.Tensor] = {}  # the STM each scored answer read (for the critic)
        for turn in play:
            t, rows = turn.turn, turn.rows.tolist()
            if not rows:
                continue
            for r, seq in zip(rows, sampled.pop()):
                completions[r, t] = seq[: seq.index(eos) + 1] if eos in seq else [s for s in seq if s != pad]
                if self.critic is not None:
                    states[r, t] = turn.stm_before[r]
            if own:
                written = conversations.interactions([prompts_tok[r, t] for r in rows], turn.answers)
                mem_seqs.update({(r, t): seq for r, seq in zip(rows, written)})

        # per-turn tensors [R, N, ...]
        mem_ids, mem_mask = pad_grid(mem_seqs, (R, N), pad)  # [R, N, Tm]
        L = max([len(prompts_tok[k]) + len(completions[k]) for k in completions] + [2])
        seq_ids, seq_mask = pad_grid({k: prompts_tok[k] + c for k, c in completions.items()}, (R, N), pad, length=L)
        completion_mask, _ = pad_grid(  # [R, N, L]: 1 on the generated tokens
            {k: [0] * len(prompts_tok[k]) + [1] * len(c) for k, c in completions.items()}, (R, N), 0, length=L
        )

        # rewards, in (turn, row) order so that the G rollouts of a conversation at a turn are consecutive
        order = [(r, t) for t in range(N) for r in range(R) if scored[r, t]]
        columns, prompts, texts_out, comp_ids = [], [], [], []
        for r, t in order:
            turn = episodes[r][t]
            d = turn["distance"]
            remembered = episodes[r][t - d] if 0 < d <= t else None
            mem_tokens = (q_ids[r, t - d] + a_ids[r, t - d]) if remembered is not None else None
            columns.append({
                "query": turn["query"], "answer": turn["answer"], "reference_ids": a_ids[r, t],
                "memory": (remembered["query"] + " " + remembered["answer"]) if remembered else None,
                "memory_ids": mem_tokens, "recall_distance": d, "turn": t, "answer_keywords": turn["keywords"],
            })
            prompts.append(turn["query"])
            clean = [s for s in completions[r, t] if s not in (eos, pad)]
            comp_ids.append(clean)
            texts_out.append(tok.decode(clean, skip_special_tokens=True))
        self.completion_table = {}
        rewards_per_func = self.score_rewards(columns, prompts, texts_out, comp_ids)  # [M, F]
        rewards = weighted_rewards(rewards_per_func, self.reward_weights)  # [M]
        if self.critic is None:
            adv_flat = group_advantages(rewards, G, args.scale_rewards)
        else:
            c_ids, c_mask = pad_rows([prompts_tok[k] for k in order], pad, side="left")
            c_stm = torch.stack([states[k] for k in order])
            values = self.critic_values(c_ids.to(device), c_mask.to(device), c_stm, rewards.to(device),
                                        fit=mode == "train")
            adv_flat = critic_advantages(rewards, values.to(rewards.device), args.scale_rewards)
        advantages = torch.zeros((R, N), dtype=torch.float32)
        for (r, t), a in zip(order, adv_flat.tolist()):
            advantages[r, t] = a
        self.record_rollout_metrics(mode, rewards_per_func, G, comp_ids, num_steps, step, reset)
        self.completion_table.update(
            prompt=prompts, completion=texts_out, advantages=adv_flat.tolist(),
            rewards={name: rewards_per_func[:, i].tolist() for i, name in enumerate(self.reward_func_names)},
        )

        batch = {
            "initial_stm": initial_stm,
            "mem_ids": mem_ids.to(device), "mem_mask": mem_mask.to(device),
            "turn_present": present.to(device), "scored": scored.to(device),
            "seq_ids": seq_ids.to(device), "seq_mask": seq_mask.to(device),
            "completion_mask": completion_mask.to(device),
            "advantages": advantages.to(device),
            "memory_group": memory_group,
        }
        if args.supervised_coef > 0:  # reference interactions with answer-only labels, for the supervised term
            batch["ref_ids"], _ = pad_grid({k: f.input_ids for k, f in references.items()}, (R, N), pad, device=device)
            batch["ref_labels"], _ = pad_grid({k: f.labels for k, f in references.items()}, (R, N), IGNORE_INDEX,
                                              device=device)
        if args.num_iterations > 1:
            batch["old_per_token_logps"] = self.replay(unwrapped, batch)[0].detach()
        if self.kl_model is not None and args.kl_coef > 0:
            batch["ref_per_token_logps"] = self.replay(self.kl_model, batch)[0].detach()
            if args.kl_reference == "previous" and mode == "train":
                self.kl_model.load_state_dict(unwrapped.state_dict())
        return batch

    def record_rollout_metrics(self, mode, rewards_per_func, generations, completion_ids, num_steps, step,
                               reset) -> None:
        """TRL's reward statistics (over every process's answers) and the curriculum's state."""
        if self.accelerator.num_processes > 1:  # the processes may score different numbers of answers
            rewards_per_func = torch.tensor(gather_object(rewards_per_func.tolist()), dtype=torch.float32)
            completion_ids = gather_object(completion_ids)
        rewards = weighted_rewards(rewards_per_func, self.reward_weights)
        metrics = self.step_metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        grouped_std = nanstd(rewards.view(-1, generations), dim=1)
        metrics["frac_reward_zero_std"].append(torch.isclose(grouped_std, torch.zeros_like(grouped_std)).float()
                                               .mean().item())
        metrics["answer_length"].append(sum(len(c) for c in completion_ids) / max(len(completion_ids), 1))
        metrics["curriculum/steps"].append(float(num_steps))
        metrics["curriculum/stage"].append(float(self.curriculum.stage(step)))
        metrics["stm_reset"].append(reset.float().mean().item())
        for name, values in self.reward_metrics.items():
            if values:
                metrics[name].append(sum(values) / len(values))
        self.reward_metrics.clear()

    def replay(self, model, inputs: dict[str, torch.Tensor], forward_model=None, supervised: bool = False):
        """Re-play the episodes: ``(per_token_logps [R, N, L], entropies [R, N, L], stm_mse, supervised_loss)``.

        ``per_token_logps[r, t, j]`` is ``log p(seq[j] | seq[<j], STM_t)`` (position 0 is 0); ``STM_t`` is built
        from the initial STM and the stored interactions of turns ``< t`` with the model's own encoder and memory
        attention (``ConversationBatch.play``), with gradients when grad mode is on. ``stm_mse`` is the mean over
        memory updates of the mean squared STM difference of the rows written. ``forward_model`` (default
        ``model``) runs the decoder (the prepared wrapper). With ``supervised`` (and ``ref_ids`` / ``ref_labels``
        in ``inputs``), ``supervised_loss`` is the token-mean cross-entropy of the reference answers of the turns
        ``supervised_turns`` names, one row per memory group; otherwise None.
        """
        seq_ids, scored, present = inputs["seq_ids"], inputs["scored"], inputs["turn_present"]
        R, N, L = seq_ids.shape
        logps = seq_ids.new_zeros((R, N, L), dtype=torch.float32)
        entropies = seq_ids.new_zeros((R, N, L), dtype=torch.float32)
        group = inputs.get("memory_group")
        supervised = supervised and "ref_ids" in inputs
        taught = torch.zeros_like(scored)
        if supervised:
            # [R, N]: the (row, turn) pairs taught, one teacher-forced row per memory group
            taught = scored if self.args.supervised_turns == "rewarded" else present
            if group is not None:
                taught = taught & _first_of_groups(group)[:, None]
        read = (scored | taught).any(0)  # [N] turns the decoder reads
        last = int(read.nonzero().max()) if read.any() else -1
        # memory is written up to the last turn read; a row writes turn t when it has a later turn <= last
        within = present & (torch.arange(N, device=present.device) <= last)
        conversations = ConversationBatch(model, inputs["initial_stm"], memory_group=group,
                                          forward_model=forward_model or model)
        logp_rows, ent_rows, index, mse_terms = [], [], [], []
        nll_sum, nll_tokens = logps.new_zeros(()), 0
        for turn in conversations.play(seq_ids, inputs["seq_mask"], within.cpu(), scored=scored.cpu(),
                                       memory_ids=inputs["mem_ids"], memory_mask=inputs["mem_mask"],
                                       return_logps=True, return_entropy=True, temperature=self.args.temperature):
            t, rows = turn.turn, turn.rows
            if rows.numel():
                logp_rows.append(F.pad(turn.token_logps, (1, 0)))
                ent_rows.append(F.pad(turn.entropies, (1, 0)))
                index.append((rows, t))
            taught_rows = taught[:, t].nonzero().squeeze(1)
            if taught_rows.numel():
                ref, labels = inputs["ref_ids"][taught_rows, t], inputs["ref_labels"][taught_rows, t]  # [n, T]
                out = conversations.read(ref, (ref != self.special_ids["pad_token_id"]).long(),
                                         stm_state=turn.stm_before[taught_rows], return_logits=True)
                targets = labels[:, 1:]
                nll_sum = nll_sum + F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
                nll_tokens += int((targets != IGNORE_INDEX).sum())
            if turn.written is not None and turn.written.numel():
                written = turn.written
                mse_terms.append(((turn.stm_after[written] - turn.stm_before[written]) ** 2).mean())
        for (rows, t), lp, ent in zip(index, logp_rows, ent_rows):
            logps = logps.index_put((rows, torch.full_like(rows, t)), lp)
            entropies = entropies.index_put((rows, torch.full_like(rows, t)), ent.detach())
        stm_mse = torch.stack(mse_terms).mean() if mse_terms else logps.new_zeros(())
        supervised_loss = nll_sum / max(nll_tokens, 1) if supervised else None
        return logps, entropies, stm_mse, supervised_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The IMPO loss of a rollout micro-batch (see :func:`impo_loss`), re-played with gradients."""
        if return_outputs:
            raise ValueError("MRLTrainer.compute_loss has no model outputs to return (return_outputs=False).")
        unwrapped = self.accelerator.unwrap_model(model)
        args = self.args
        supervised = args.supervised_coef > 0
        logps, entropies, stm_mse, supervised_loss = self.replay(unwrapped, inputs, forward_model=model,
                                                                 supervised=supervised)
        scored = inputs["scored"]
        pick = scored.nonzero(as_tuple=True)  # (rows, turns) of the sampled answers
        lp = logps[pick]  # [M, L]
        mask = inputs["completion_mask"][pick]
        old = inputs.get("old_per_token_logps")
        old = lp.detach() if old is None else old[pick]
        ref = inputs.get("ref_per_token_logps")
        ref = None if ref is None else ref[pick]
        loss, stats = impo_loss(
            lp, old, inputs["advantages"][pick], mask,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
            ref_per_token_logps=ref, kl_coef=args.kl_coef,
            stm_mse=stm_mse, memory_reg_coef=args.memory_reg_coef, loss_type=args.loss_type,
        )
        if supervised_loss is not None:
            loss = loss + args.supervised_coef * supervised_loss
        metrics = self.step_metrics["train" if self.model.training else "eval"]
        if supervised_loss is not None:
            metrics["supervised_loss"].append(supervised_loss.item())
        for key in ("policy_loss", "kl", "clip_fraction", "memory_loss"):
            metrics[key].append(stats[key].item())
        metrics["stm_change"].append(float(stm_mse.detach()))
        ent_mask = mask.float()
        metrics["entropy"].append(((entropies[pick] * ent_mask).sum() / ent_mask.sum().clamp(min=1)).item())
        return loss
