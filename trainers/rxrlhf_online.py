"""Online RxRLHF: align an RxT model with a reward model on live generations, without pairwise data.

This reuses the MRL trainer (``trainers.mrl_trainer``: a ``transformers.Trainer`` on TRL's ``GRPOConfig`` and
public utilities) unchanged: conversations are played with the STM, the policy samples ``num_generations`` answers
per rewarded turn, the reward functions (TRL's signature) score them, GRPO's group baseline gives the advantages
and the IMPO loss (clipped surrogate + KL) trains the policy. Like MRL it overrides no private TRL / transformers
method and touches no private attribute. What this module adds:

- :class:`RewardModelReward`: a reward function in TRL's signature (``fn(prompts, completions, **columns)``)
  built from an ``AutoModelForSequenceClassification`` (score = logit 0, as TRL does) or from any callable
  ``texts -> scores``. Unlike TRL's built-in reward-model path (which scores ``prompt + completion``), it can show
  the reward model the remembered interaction a recall question refers to (MRL's ``memory`` column), so the
  reward model can judge whether the answer uses the memory correctly;
- :class:`RxRLHFOnlineConfig`: an ``MRLConfig`` preset for alignment rather than memory training (one fixed
  episode length, every follow-up rewarded, KL to the *initial* policy like RLHF's reference, memory writing
  frozen so what the model remembers does not drift);
- :class:`RxRLHFOnlineTrainer`: ``MRLTrainer`` that requires a reward model or reward functions (no default
  BLEU rewards) and also accepts preference conversations (their chosen answers become the reference answers
  and the memory of the episode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .mrl_trainer import MRLConfig, MRLTrainer
from .preference_data import preference_to_multi_turn
from .rewards import completion_text

__all__ = ["RewardModelReward", "RxRLHFOnlineConfig", "RxRLHFOnlineTrainer"]

DEFAULT_TEMPLATE = "{memory}\n{query}\n{completion}"


class RewardModelReward:
    """A TRL reward function from a reward model.

    ``reward_model`` is an ``nn.Module`` sequence classifier (e.g. ``AutoModelForSequenceClassification`` with
    ``num_labels=1``; the reward is ``logits[:, 0]``, needs ``tokenizer``) or any callable ``list[str] ->
    list[float]`` (a judge, a rule, a remote service). Each completion is shown as ``template`` filled with
    ``query`` (the dataset column, else the prompt), ``completion`` and ``memory`` (the remembered interaction of
    a recall question, ``""`` when there is none or ``with_memory=False``). ``__name__`` (``name``) is what TRL
    logs the reward under (``rewards/<name>/mean``).

    Example:

    ```python
    >>> reward = RewardModelReward(lambda texts: [float("Greywater" in t) for t in texts], name="judge")
    >>> reward(prompts=["Where does Talia live?"], completions=["Talia lives in Greywater."],
    ...        memory=["My friend Talia lives in Greywater. Okay."])
    [1.0]

    ```
    """

    def __init__(self, reward_model: nn.Module | Callable[[list[str]], Sequence[float]], tokenizer=None, *,
                 with_memory: bool = True, template: str = DEFAULT_TEMPLATE, batch_size: int = 32,
                 max_length: int = 512, name: str | None = None):
        if isinstance(reward_model, nn.Module) and tokenizer is None:
            raise ValueError("RewardModelReward(reward_model=<nn.Module>) needs tokenizer=<the reward model's "
                             "tokenizer>; or pass a callable texts -> scores.")
        if not isinstance(reward_model, nn.Module) and not callable(reward_model):
            raise TypeError(f"reward_model must be an nn.Module sequence classifier or a callable texts -> scores, "
                            f"got {type(reward_model).__name__}.")
        for key in ("{query}", "{completion}"):
            if key not in template:
                raise ValueError(f"template={template!r} must contain {key}.")
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.with_memory = with_memory
        self.template = template
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        default_name = "reward_model"
        if isinstance(reward_model, nn.Module):
            path = getattr(getattr(reward_model, "config", None), "name_or_path", "") or ""
            default_name = path.rstrip("/").split("/")[-1] or default_name
        self.__name__ = name or default_name

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[str]:
        """The reward model's input text of every completion."""
        queries = kwargs.get("query") or [completion_text(p) for p in prompts]
        memories = kwargs.get("memory") if self.with_memory else None
        memories = memories or [None] * len(completions)
        return [
            self.template.format(memory=m or "", query=q, completion=completion_text(c)).strip()
            for q, c, m in zip(queries, completions, memories)
        ]

    @torch.no_grad()
    def model_scores(self, texts: list[str]) -> list[float]:
        """The reward model's score (logit 0) of every text, in batches of `batch_size`."""
        model = self.reward_model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length)
                enc = {k: v.to(device) for k, v in enc.items()}
                scores.extend(model(**enc).logits[:, 0].float().tolist())
        finally:
            model.train(was_training)
        return scores

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions, **kwargs)
        if isinstance(self.reward_model, nn.Module):
            return self.model_scores(texts)
        scores = list(self.reward_model(texts))
        if len(scores) != len(texts):
            raise ValueError(f"reward_model returned {len(scores)} scores for {len(texts)} texts; it must return one "
                             "score per text.")
        return [None if s is None else float(s) for s in scores]


def _online_freeze() -> dict[str, int | float | None]:
    return {"decoder": 0, "memory_cross_attention": 0}


@dataclass
class RxRLHFOnlineConfig(MRLConfig):
    """``MRLConfig`` preset for online preference alignment with a reward model (see the module docstring).

    Changed defaults: ``curriculum_steps=[5]`` (6-turn episodes, every follow-up answered and rewarded:
    ``curriculum_strategies=["cumulative"]``), ``kl_coef=0.05`` with ``kl_reference="initial"`` (stay close to the
    starting policy, as RLHF's reference model), ``memory_reg_coef=0.0`` and ``freeze_schedule={"decoder": 0,
    "memory_cross_attention": 0}`` (the memory writing is not trained), ``learning_rate=1e-5``. Memory is updated
    with the reference (chosen) answers unless ``own_answers_from_stage=0``.
    """

    curriculum_steps: list[int] = field(
        default_factory=lambda: [5],
        metadata={"help": "Follow-up interactions per episode (one stage: a fixed episode length)."},
    )
    curriculum_strategies: list[str] | None = field(
        default_factory=lambda: ["cumulative"],
        metadata={"help": "'cumulative': every follow-up turn is answered and rewarded."},
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the (k3) KL to kl_reference."})
    kl_reference: str = field(default="initial", metadata={"help": "'initial': the starting policy (RLHF-style)."})
    memory_reg_coef: float = field(default=0.0, metadata={"help": "Memory regularisation (memory writing frozen)."})
    freeze_schedule: dict | str | None = field(
        default_factory=_online_freeze,
        metadata={"help": "Components trained from which step; default: the decoder and its memory reading."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
    gradient_checkpointing: bool | None = field(
        default=None,  # transformers 5: a deprecated alias of activation_checkpointing (off unless set)
        metadata={"help": "Deprecated alias of activation_checkpointing (not used)."},
    )


class RxRLHFOnlineTrainer(MRLTrainer):
    """Online RxRLHF: ``MRLTrainer`` (GRPO with memory episodes) driven by a reward model.

    Give ``reward_model`` (an ``AutoModelForSequenceClassification`` with ``reward_tokenizer``, or a callable
    ``texts -> scores``; wrapped in :class:`RewardModelReward`, which shows it the remembered interaction) and/or
    ``reward_funcs`` (reward functions with TRL's signature, which see ``query + completion`` only; a model id or
    module is refused: wrap it in :class:`RewardModelReward`). ``train_dataset``: multi-turn rows (``query`` / ``answer`` / ``interactions``) or preference rows
    (``interactions: [{query, chosen, rejected}]``: the chosen answers are used, the rejected ones ignored).

    Example:

    ```python
    >>> import tempfile, torch, contextlib, io
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
    >>> from rxt_hf.trainers.preference_data import build_preference_dataset
    >>> from rxt_hf.trainers.rxrlhf_online import RxRLHFOnlineConfig, RxRLHFOnlineTrainer
    >>> data = build_preference_dataset(num_conversations=16, num_turns=3, max_recall_distance=2)["train"]
    >>> texts = [t[k] for r in data for t in r["interactions"] for k in ("query", "chosen", "rejected")]
    >>> tokenizer = build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=64)
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))
    >>> judge = lambda texts: [float(len(t.split()) < 20) for t in texts]  # any scorer: texts -> scores
    >>> args = RxRLHFOnlineConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=4,
    ...                           num_generations=2, max_completion_length=6, curriculum_steps=[2],
    ...                           use_cpu=True, disable_tqdm=True, save_strategy="no")
    >>> trainer = RxRLHFOnlineTrainer(model, reward_model=judge, args=args, train_dataset=data,
    ...                               processing_class=tokenizer)
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     _ = trainer.train()
    >>> "rewards/reward_model/mean" in trainer.state.log_history[0]
    True

    ```
    """

    def __init__(self, model, reward_funcs=None, args: MRLConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_model=None, reward_tokenizer=None,
                 reward_with_memory: bool = True, **kwargs):
        funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple))
                                                 else [reward_funcs])
        if reward_model is not None:
            funcs.append(reward_model if isinstance(reward_model, RewardModelReward)
                         else RewardModelReward(reward_model, reward_tokenizer, with_memory=reward_with_memory))
        if not funcs:
            raise ValueError("RxRLHFOnlineTrainer needs reward_model=<a sequence classifier or a callable texts -> "
                             "scores> or reward_funcs=[...] (TRL reward functions); for pairwise preference data "
                             "use RxRLHFTrainer.")
        train_dataset = _as_multi_turn(train_dataset)
        eval_dataset = _as_multi_turn(eval_dataset)
        super().__init__(model, reward_funcs=funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)


def _as_multi_turn(data):
    """Preference rows -> multi-turn rows; anything else unchanged."""
    if data is None:
        return None
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list) and "query" not in columns and "interactions" in columns:
        inner = getattr(data.features.get("interactions"), "feature", None)
        if isinstance(inner, dict) and "chosen" in inner:
            return preference_to_multi_turn(data)
    return data
