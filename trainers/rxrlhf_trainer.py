"""Stage 6: RxRLHF, preference alignment with memory, on TRL's DPO configuration.

``RxRLHFConfig`` subclasses ``trl.DPOConfig``; ``RxRLHFTrainer`` is a ``transformers.Trainer`` (with the stage mixin
:class:`~rxt_hf.trainers.trainer_base.RxTStageMixin`) that owns its scoring loop. It is not a ``trl.DPOTrainer``
subclass: DPOTrainer's ``__init__`` tokenizes the data through its private ``_prepare_dataset`` (single
prompt / chosen / rejected strings), patches the model's forward with a fused LM head, and its public
``compute_loss`` / ``log`` / ``evaluate`` run through the private ``_compute_loss``, ``_metrics`` and
``_set_signature_columns_if_needed``; a conversation scored through the STM would have to override those again,
tying the code to one TRL release. The data are conversations whose every turn has a query and two answers
(``interactions: [{query, chosen, rejected}]``, see :mod:`trainers.preference_data`).

How a conversation is scored (:func:`score_conversations`, on the conversation primitive
:class:`~rxt_hf.modeling_rxt.conversation_rxt.ConversationBatch`): the STM starts fresh (``init_memory``); at
turn ``k`` the decoder reads the current STM and scores ``[BOS][Q] query [A] answer [EOS]`` for the chosen and for
the rejected answer (sum of the answer tokens' log-probabilities, ``[EOS]`` included); then ``update_memory``
writes the turn's query + **chosen** answer into the STM. So the memory that scores turn ``k`` holds the chosen
history of turns ``< k`` only: never a rejected answer, never the answer being scored. The policy and the frozen
reference each play the conversation with their own encoder and memory attention over the same chosen history;
with the memory system frozen (the default ``trainable_components``, or LoRA on the decoder only) both build
exactly the same STM, so the reference reads the same memory as the policy. A Llama DPO pair would instead carry
the whole history in its prompt.

Library symbols used (all public):

- ``transformers``: ``Trainer`` and its public hooks (``compute_loss``, ``prediction_step``, ``training_step``,
  ``evaluate``, ``log``, ``compute_loss_context_manager``, the ``loss_is_scaled_for_ga`` attribute, callbacks),
  ``set_seed``; the Trainer loop itself (seeded sampler, optimizer / scheduler, gradient accumulation and
  clipping, ``checkpoint-N`` saving and ``train(resume_from_checkpoint=...)``, trackers) is unchanged;
- ``trl``: ``DPOConfig`` (the config's base), ``SyncRefModelCallback`` (``sync_ref_model``, TR-DPO);
  ``trl.models``: ``prepare_deepspeed`` / ``prepare_fsdp`` (the reference under DeepSpeed / FSDP),
  ``get_act_offloading_ctx_manager`` (``activation_offloading``); ``trl.trainer.utils``:
  ``disable_dropout_in_model`` (``disable_dropout``), ``use_adapter`` (the PEFT reference: adapters disabled, or
  the ``"ref"`` adapter). TRL's DPO loss lives in the private ``_compute_loss``, so the loss is
  :func:`preference_loss`; the per-token log-probs come from ``ConversationBatch`` (float32, chunked), so TRL's
  ``selective_log_softmax`` is not needed;
- ``accelerate``: ``Accelerator.unwrap_model`` / ``prepare_model`` / ``gather``, ``send_to_device``; ``peft``:
  ``get_peft_model``, ``LoraConfig``, ``PeftModel.add_adapter``; ``datasets``: ``Dataset.map``.

Kept from DPOTrainer's behaviour: ``set_seed(args.seed)`` before the PEFT wrap, the reference (an explicit
``ref_model``, a frozen copy of the starting model, or for PEFT the policy with its adapters disabled / a
``"ref"`` adapter copied from a given adapter), ``sync_ref_model``, dropout disabled, TRL's metric names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` with TRL's meaning, per pair = per turn; ``eval_`` prefix in evaluation), ``evaluate`` of a
raw preference data set. ``beta``, ``loss_type``, ``loss_weights`` and ``label_smoothing`` keep DPOConfig's names.
Not kept: TRL's ``README.md`` written into ``output_dir`` at every checkpoint (the RxT model card is written by
``save_rxt_model``); the ``checkpoint-N`` folders hold what they held.

Loss variants (``loss_type``, combinable with ``loss_weights`` as in TRL), with ``d = (logp_c - ref_c) -
(logp_r - ref_r)``:

- ``"sigmoid"`` (DPO): ``-(1 - eps) log s(beta d) - eps log s(-beta d)`` with ``eps = label_smoothing`` (the
  conservative DPO of the DPO paper's appendix; TRL 1.16's ``"sigmoid"`` ignores ``label_smoothing`` and keeps it
  for ``"robust"``);
- ``"apo_zero"`` (Anchored Preference Optimization, APO paper eq. 7, as TRL's): ``1 - s(beta (logp_c - ref_c)) +
  s(beta (logp_r - ref_r))``. Why an anchored variant here: a chosen and a rejected recall answer share their
  template and differ in a few fact words, and plain DPO can widen ``d`` by lowering *both* likelihoods (the
  known DPO failure mode); that would lower the probability of the correct answer that greedy decoding, and so
  recall accuracy, depends on. APO-zero rewards raising the chosen log-ratio and lowering the rejected one
  separately, so the chosen answer's likelihood is anchored upwards;
- ``"sft"``: negative log-likelihood per chosen answer token (TRL's ``"sft"``): ``loss_type=["sigmoid",
  "sft"]``, ``loss_weights=[1.0, 0.2]`` is the RPO-style anchor;
- ``"ipo"``: ``(d / len - 1 / (2 beta))^2`` with length-normalised log-ratios, as TRL's.

Not supported (refused by the config): ``precompute_ref_log_probs`` (reference log-probs depend on the memory
path, per turn), ``use_weighting``, ``ld_alpha``, non-default ``f_divergence_type``, ``truncation_mode=
"keep_end"``, ``padding_free``, ``remove_unused_columns=True`` (the collator reads the prepared turn columns,
which ``RxTForCausalLM.forward`` does not take).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from transformers import Trainer, set_seed
from trl import DPOConfig, SyncRefModelCallback
from trl.models import get_act_offloading_ctx_manager, prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from rxt_hf.modeling_rxt.conversation_rxt import ConversationBatch
from rxt_hf.modeling_rxt.format_rxt import IGNORE_INDEX, encode_texts, frame_interaction, pad_grid, special_token_ids

from .preference_data import check_preference_row
from .smat_trainer import SMAT_COMPONENTS, component_parameters
from .trainer_base import RxTStageMixin, is_peft_model

__all__ = [
    "DECODER_ATTENTION_LORA_TARGETS",
    "PreferenceCollator",
    "RxRLHFConfig",
    "RxRLHFTrainer",
    "add_reference_adapter",
    "decoder_lora_config",
    "evaluate_preferences",
    "format_preference_table",
    "freeze_reference",
    "preference_loss",
    "prepare_preference_dataset",
    "score_conversations",
]

SUPPORTED_LOSS_TYPES = ("sigmoid", "apo_zero", "sft", "ipo")
TOKENIZED_COLUMNS = ("turn_query_ids", "turn_chosen_ids", "turn_rejected_ids")
# LoRA on the decoder's self-attention and memory cross-attention projections (not the encoder / memory attention,
# so the memory the policy writes stays that of the reference).
DECODER_ATTENTION_LORA_TARGETS = r".*decoder\.layers\.\d+\.(self_attn|memory_cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"


def decoder_lora_config(r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0, target_modules=None):
    """A ``peft.LoraConfig`` for an RxT model: adapters on the decoder's attention projections (self-attention
    and memory cross-attention) unless ``target_modules`` says otherwise (PEFT semantics: a list of module-name
    suffixes or a regular expression)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules or DECODER_ATTENTION_LORA_TARGETS,
    )


def freeze_reference(model):
    """Make ``model`` a frozen reference: ``eval()`` mode and no parameter requires a gradient."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def add_reference_adapter(model) -> None:
    """Give a ``PeftModel`` a ``"ref"`` adapter, a copy of its ``"default"`` adapter as it is now: the reference of
    a model that came with trained adapters (as TRL's DPOTrainer does)."""
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(param)


# ------------------------------------------------------------------------------------------------------
# config


@dataclass
class RxRLHFConfig(DPOConfig):
    """``trl.DPOConfig`` plus the RxRLHF fields. DPO fields keep their meaning (``beta``, ``loss_type``,
    ``loss_weights``, ``label_smoothing``, ``sync_ref_model``...); ``max_length`` is the token limit of **one
    interaction** (``[BOS][Q] query [A] answer [EOS]``, capped by the model's ``max_position_embeddings``).

    Changed defaults: ``learning_rate=1e-4`` (small RxT models; TRL: 1e-6), ``max_length=256``, no gradient
    (activation) checkpointing, ``bf16=False``, ``logging_steps=1``, ``report_to="none"``,
    ``remove_unused_columns=False`` (the collator reads the prepared turn columns).
    """

    trainable_components: list[str] = field(
        default_factory=lambda: ["decoder", "memory_cross_attention"],
        metadata={"help": "Components trained without PEFT: decoder (with lm_head), memory_cross_attention (the "
                          "decoder's memory reading), memory_attention, encoder, embedding (shared by decoder and "
                          "encoder). Default: the decoder and its memory reading; the memory writing stays frozen, "
                          "so what the model remembers does not change. Ignored for PEFT models."},
    )
    lora_r: int | None = field(
        default=None,
        metadata={"help": "LoRA rank: train LoRA adapters (peft) instead of the full model. None: full fine-tuning "
                          "of trainable_components. A peft_config passed to the trainer takes precedence."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules that get LoRA adapters (peft semantics: list of name suffixes or a regex). None: "
                          "the decoder's self-attention and memory cross-attention projections."},
    )
    # changed DPO defaults
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    max_length: int | None = field(
        default=256,
        metadata={"help": "Maximum tokens of one interaction [BOS][Q] query [A] answer [EOS] (answer cut first); "
                          "None: the model's max_position_embeddings."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,  # transformers 5: a deprecated alias of activation_checkpointing (off unless set)
        metadata={"help": "Deprecated alias of activation_checkpointing (not used by RxRLHF)."},
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers (transformers)."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator reads the turn columns RxRLHF prepares, which the model's "
                          "forward does not take (transformers would drop them)."},
    )

    def __post_init__(self):
        super().__post_init__()

        def fail(name, value, fix):
            raise ValueError(f"RxRLHFConfig.{name}={value!r} is invalid: {fix}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        unknown = [t for t in self.loss_type if t not in SUPPORTED_LOSS_TYPES]
        if unknown:
            fail("loss_type", self.loss_type, f"RxRLHF supports {SUPPORTED_LOSS_TYPES} (combine them with "
                                              "loss_weights).")
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or not self.beta > 0:
            fail("beta", self.beta, "it must be a number > 0 (e.g. 0.1).")
        if not isinstance(self.label_smoothing, (int, float)) or not 0.0 <= self.label_smoothing < 0.5:
            fail("label_smoothing", self.label_smoothing, "it must be in [0, 0.5) (probability of a flipped label).")
        if self.precompute_ref_log_probs:
            fail("precompute_ref_log_probs", True, "the reference log-probs of a turn depend on its memory; they are "
                                                   "computed on the fly. Set it to False.")
        if self.use_weighting:
            fail("use_weighting", True, "WPO weighting is not implemented for conversations; set it to False.")
        if self.ld_alpha is not None:
            fail("ld_alpha", self.ld_alpha, "LD-DPO weighting is not implemented for conversations; set it to None.")
        if self.f_divergence_type != "reverse_kl":
            fail("f_divergence_type", self.f_divergence_type, "only 'reverse_kl' (standard DPO) is implemented.")
        if self.truncation_mode != "keep_start":
            fail("truncation_mode", self.truncation_mode, "interactions are cut answer-first; use 'keep_start'.")
        if self.padding_free:
            fail("padding_free", True, "conversations are padded per turn; set it to False.")
        if self.remove_unused_columns:
            fail("remove_unused_columns", True, "the collator reads the prepared turn columns, which transformers "
                                                "would drop (the model's forward does not take them); set it to False.")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 8):
            fail("max_length", self.max_length, "it must be an int >= 8 (tokens of one interaction) or None.")
        components = self.trainable_components
        if (not isinstance(components, (list, tuple)) or not components
                or any(c not in SMAT_COMPONENTS for c in components)):
            fail("trainable_components", components, f"give a non-empty list from {list(SMAT_COMPONENTS)}.")
        self.trainable_components = list(components)
        if self.lora_r is not None and (not is_int(self.lora_r) or self.lora_r < 1):
            fail("lora_r", self.lora_r, "it must be an int >= 1 or None (full fine-tuning).")
        if not is_int(self.lora_alpha) or self.lora_alpha < 1:
            fail("lora_alpha", self.lora_alpha, "it must be an int >= 1.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", self.lora_dropout, "it must be in [0, 1).")

    def summary(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the stage history / model card."""
        keys = ("beta", "loss_type", "loss_weights", "label_smoothing", "learning_rate", "max_steps",
                "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                "trainable_components", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "sync_ref_model", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed")
        return {k: getattr(self, k) for k in keys}


# ------------------------------------------------------------------------------------------------------
# loss (pure, unit-tested)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RxRLHF loss on ``M`` pairs (see the module docstring for each ``loss_type``).

    Inputs are ``[M]`` sums of answer-token log-probabilities; ``chosen_lengths`` / ``rejected_lengths`` ``[M]``
    are the answer-token counts (needed by ``"ipo"`` and ``"sft"``). Each loss type is averaged over the pairs
    (``"sft"``: over the chosen tokens), weighted by ``loss_weights`` and summed. Returns ``(loss, stats)`` with the
    detached ``[M]`` tensors ``chosen_rewards`` / ``rejected_rewards`` (``beta`` x log-ratios) and ``margins``.
    """
    loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    if len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights={loss_weights} needs one weight per loss type {list(loss_types)}.")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    loss = chosen_logps.new_zeros(())
    for loss_type, weight in zip(loss_types, loss_weights):
        if loss_type == "sigmoid":
            eps = float(label_smoothing)
            per_pair = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
            term = per_pair.mean()
        elif loss_type == "apo_zero":
            term = (1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)).mean()
        elif loss_type == "ipo":
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths.")
            normalised = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
            term = ((normalised - 1 / (2 * beta)) ** 2).mean()
        elif loss_type == "sft":
            if chosen_lengths is None:
                raise ValueError("loss_type 'sft' needs chosen_lengths.")
            term = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
        else:
            raise ValueError(f"loss_type {loss_type!r}: choose from {SUPPORTED_LOSS_TYPES}.")
        loss = loss + weight * term
    stats = {
        "chosen_rewards": (beta * chosen_ratio).detach(),
        "rejected_rewards": (beta * rejected_ratio).detach(),
        "margins": (beta * delta).detach(),
    }
    return loss, stats


# ------------------------------------------------------------------------------------------------------
# data: collation of preference conversations


def _tokenize_turns(tokenizer, turns: Sequence[Mapping[str, str]]) -> dict[str, list[list[int]]]:
    texts = [t[key] for t in turns for key in ("query", "chosen", "rejected")]
    enc = encode_texts(tokenizer, texts)
    return {
        "turn_query_ids": enc[0::3],
        "turn_chosen_ids": enc[1::3],
        "turn_rejected_ids": enc[2::3],
    }


def prepare_preference_dataset(dataset, tokenizer, dataset_name: str = "train", num_proc: int | None = None):
    """Validate and tokenize preference conversations for :class:`RxRLHFTrainer`: every row is checked
    (:func:`trainers.preference_data.check_preference_row`: the error names the row, the turn and the missing /
    empty field) and its query / chosen / rejected texts per turn become ``turn_query_ids`` / ``turn_chosen_ids`` /
    ``turn_rejected_ids`` (the other columns are kept). A prepared data set is returned as it is; a dict of data
    sets is prepared split by split; ``None`` and a split name (``str``) are returned as they are."""
    if dataset is None or isinstance(dataset, str):
        return dataset
    if isinstance(dataset, Mapping):
        return {name: prepare_preference_dataset(part, tokenizer, name, num_proc) for name, part in dataset.items()}
    columns = dataset.column_names
    if columns is not None and all(c in columns for c in TOKENIZED_COLUMNS):
        return dataset  # already prepared
    if columns is not None and "interactions" not in columns:
        raise ValueError(
            f"{dataset_name}_dataset has no 'interactions' column (columns: {list(columns)}); RxRLHF needs "
            "interactions: [{query, chosen, rejected}] per row. Fix: rename with column_mapping or build it with "
            "trainers.preference_data.build_preference_dataset."
        )
    name = f"{dataset_name}_dataset"

    def tokenize(row, index):
        check_preference_row(row, index, name)
        return _tokenize_turns(tokenizer, row["interactions"])

    kwargs = {}
    if isinstance(dataset, datasets.Dataset):  # map-style: a description and optional processes
        kwargs = {"num_proc": num_proc, "desc": f"Tokenizing {name}"}
    return dataset.map(tokenize, with_indices=True, **kwargs)


@dataclass
class PreferenceCollator:
    """Collate preference conversations into ``[B, N, 2, T]`` tensors (pair index 0: chosen, 1: rejected).

    A row is tokenized (``turn_query_ids`` / ``turn_chosen_ids`` / ``turn_rejected_ids``, as made by
    ``RxRLHFTrainer``) or raw (``interactions: [{query, chosen, rejected}]``, tokenized here). Each pair is framed
    as ``[BOS][Q] query [A] answer [EOS]`` (``format_rxt.frame_interaction``: answer cut first, at most ``max_length``).

    Returns ``pair_input_ids`` / ``pair_attention_mask`` / ``pair_completion_mask`` ``[B, N, 2, T]`` (completion:
    the answer tokens and ``[EOS]``, the tokens that are scored), ``turn_mask`` ``[B, N]`` (conversations may have
    different numbers of turns), ``recall_distance`` ``[B, N]`` (0 when unknown) and ``rejection_type`` (python
    list ``[B][N]``, ``""`` when unknown).
    """

    tokenizer: Any
    max_length: int = 256

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = special_token_ids(self.tokenizer)
        per_row = []
        for index, row in enumerate(rows):
            if all(k in row for k in TOKENIZED_COLUMNS):
                tokens = {k: [list(x) for x in row[k]] for k in TOKENIZED_COLUMNS}
            else:
                check_preference_row(row, index, "batch")
                tokens = _tokenize_turns(self.tokenizer, row["interactions"])
            per_row.append(tokens)
        size = len(rows)
        turns = max(len(t["turn_query_ids"]) for t in per_row)
        framed = {
            (b, k, j): frame_interaction(ids, q, tokens[key][k], max_length=self.max_length, truncate=True)
            for b, tokens in enumerate(per_row)
            for k, q in enumerate(tokens["turn_query_ids"])
            for j, key in enumerate(("turn_chosen_ids", "turn_rejected_ids"))
        }
        grid = (size, turns, 2)
        input_ids, attention = pad_grid({c: f.input_ids for c, f in framed.items()}, grid, ids["pad_token_id"])
        labels, _ = pad_grid({c: f.labels for c, f in framed.items()}, grid, IGNORE_INDEX)  # [B, N, 2, T]
        completion = (labels != IGNORE_INDEX).long()  # [B, N, 2, T]
        turn_mask = attention.any(dim=(2, 3))  # [B, N]
        distance = torch.zeros((size, turns), dtype=torch.long)  # [B, N]
        types = []
        for b, row in enumerate(rows):
            n = len(per_row[b]["turn_query_ids"])
            if row.get("recall_distance") is not None:
                distance[b, :n] = torch.tensor([int(d or 0) for d in row["recall_distance"]][:n])
            kinds = list(row.get("rejection_type") or [""] * n)[:n]
            types.append([str(x or "") for x in kinds] + [""] * (turns - n))
        return {
            "pair_input_ids": input_ids,
            "pair_attention_mask": attention,
            "pair_completion_mask": completion,
            "turn_mask": turn_mask,
            "recall_distance": distance,
            "rejection_type": types,
        }


# ------------------------------------------------------------------------------------------------------
# scoring conversations with memory


@dataclass
class ConversationScores:
    """Per (conversation, turn) results of :func:`score_conversations`; tensors ``[B, N]``."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    router_aux_loss: torch.Tensor | None
    num_tokens: int


def score_conversations(model, batch: Mapping[str, Any], forward_model=None) -> ConversationScores:
    """Play a batch of preference conversations and score both answers of every turn.

    ``model`` is an ``RxTForCausalLM`` (or a PEFT model around one): its ``init_memory`` / ``update_memory``
    build the STM; ``forward_model`` (default ``model``; e.g. the trainer's prepared wrapper) runs the decoder. For
    each turn ``k``: the decoder reads the STM built from turns ``< k`` and scores ``[BOS][Q] query [A] answer
    [EOS]`` for the chosen and the rejected answer (sum of the log-probabilities of the answer tokens and
    ``[EOS]``); then, for conversations that have a turn ``k + 1``, ``update_memory(stm, chosen interaction of
    turn k)``; the others keep their memory. Gradients flow wherever grad mode and ``requires_grad`` allow,
    including through the memory updates when the encoder / memory attention train.

    The turns are played by ``ConversationBatch.play`` over ``2B`` rows: the chosen answers of the ``B``
    conversations, then their rejected answers. Row ``b`` and row ``B + b`` are one memory group: they start from
    the same STM, and the group writes its chosen interaction once, so both answers of a turn read the same memory.
    """
    ids, mask = batch["pair_input_ids"], batch["pair_attention_mask"]  # [B, N, 2, T]
    completion = batch["pair_completion_mask"]  # [B, N, 2, T]
    present = batch["turn_mask"].bool()  # [B, N]
    size, turns = present.shape
    answers = torch.cat([ids[:, :, 0], ids[:, :, 1]])  # [2B, N, T]: chosen rows, then rejected rows
    answer_mask = torch.cat([mask[:, :, 0], mask[:, :, 1]])  # [2B, N, T]
    scored_tokens = torch.cat([completion[:, :, 0], completion[:, :, 1]])[..., 1:]  # [2B, N, T-1]
    chosen, chosen_mask = ids[:, :, 0].repeat(2, 1, 1), mask[:, :, 0].repeat(2, 1, 1)  # [2B, N, T] what is written
    conversations = ConversationBatch(
        model, model.init_memory(size).repeat(2, 1, 1, 1), memory_group=torch.arange(size).repeat(2),
        forward_model=forward_model,
    )
    logps = ids.new_zeros((2 * size, turns), dtype=torch.float32)  # [2B, N]
    is_moe = getattr(_base_config(model), "decoder_feed_forward", None) == "moe"
    aux_terms, tokens = [], 0
    for turn in conversations.play(answers, answer_mask, present.repeat(2, 1), memory_ids=chosen,
                                   memory_mask=chosen_mask, return_logps=True, return_stm=False):
        if turn.token_logps is None:  # no conversation has this turn
            continue
        width = turn.token_logps.shape[1]
        sums = (turn.token_logps * scored_tokens[turn.rows, turn.turn, :width]).sum(-1)  # [n]
        logps = logps.index_put((turn.rows, torch.full_like(turn.rows, turn.turn)), sums)
        tokens += int(turn.attention_mask.sum())
        if is_moe and turn.aux_loss is not None:
            aux_terms.append(turn.aux_loss)
    lengths = completion[..., 1:].sum(-1)  # [B, N, 2] scored tokens per answer
    return ConversationScores(
        chosen_logps=logps[:size], rejected_logps=logps[size:],
        chosen_lengths=lengths[..., 0], rejected_lengths=lengths[..., 1],
        router_aux_loss=torch.stack(aux_terms).mean() if aux_terms else None, num_tokens=tokens,
    )


def _base_config(model):
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, "config", None)


def _reference(model, ref_model):
    """``(scoring model, context factory)`` for the reference: ``ref_model``, or a PEFT policy with its adapters
    disabled (its ``"ref"`` adapter when there is one), as TRL's DPOTrainer does. Call the factory for a fresh
    context each time (``use_adapter`` contexts are single-use)."""
    if ref_model is not None:
        return ref_model, contextlib.nullcontext
    if not is_peft_model(model):
        raise ValueError("ref_model is None but the model is not a PEFT model: pass the frozen reference model "
                         "(e.g. the model before training).")
    adapter = "ref" if "ref" in model.peft_config else None
    return model, lambda: use_adapter(model, adapter_name=adapter)


# ------------------------------------------------------------------------------------------------------
# evaluation


def _pair_summary(margin: torch.Tensor, raw: torch.Tensor) -> dict[str, float | int | None]:
    count = int(margin.numel())
    if count == 0:
        return {"count": 0, "preference_accuracy": None, "logp_accuracy": None, "mean_margin": None}
    return {
        "count": count,
        "preference_accuracy": float((margin > 0).float().mean()),
        "logp_accuracy": float((raw > 0).float().mean()),
        "mean_margin": float(margin.mean()),
    }


@torch.no_grad()
def evaluate_preferences(model, ref_model, dataset, tokenizer, batch_size: int = 16, max_length: int | None = None,
                         max_conversations: int | None = None) -> dict[str, Any]:
    """Preference accuracy of ``model`` against ``ref_model`` on held-out preference conversations.

    Every turn is a pair. ``preference_accuracy``: fraction of pairs whose DPO margin ``(logp_c - ref_c) - (logp_r
    - ref_r)`` is > 0 (0 for a model compared with itself: the margins are exactly 0); ``logp_accuracy``: fraction
    with ``logp_c > logp_r`` for the model alone. Also ``mean_margin``, ``mean_logp_chosen`` /
    ``mean_logp_rejected`` (per pair), and the same accuracies ``by_rejection_type`` and, for recall turns,
    ``by_recall_distance``. The STM of turn ``k`` is built from the chosen answers of turns ``< k`` (as in
    training). ``ref_model=None`` with a PEFT ``model``: the reference is the model with its adapters disabled.
    """
    rows = list(dataset)[:max_conversations] if max_conversations else list(dataset)
    if not rows:
        raise ValueError("evaluate_preferences got an empty data set; pass held-out preference conversations.")
    limit = int(_base_config(model).max_position_embeddings)
    collator = PreferenceCollator(tokenizer, max_length=min(max_length or limit, limit))
    reference, ref_context = _reference(model, ref_model)
    training = [(m, m.training) for m in {id(model): model, id(reference): reference}.values()]
    for m, _ in training:
        m.eval()
    columns: dict[str, list] = {k: [] for k in ("margin", "raw", "chosen", "rejected", "type", "distance")}
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start:start + batch_size])
            batch = send_to_device(batch, device)
            policy = score_conversations(model, batch)
            with ref_context():
                ref = score_conversations(reference, batch)
            present = batch["turn_mask"]
            pick = present.nonzero(as_tuple=True)
            margin = (policy.chosen_logps - ref.chosen_logps) - (policy.rejected_logps - ref.rejected_logps)
            columns["margin"].append(margin[pick].cpu())
            columns["raw"].append((policy.chosen_logps - policy.rejected_logps)[pick].cpu())
            columns["chosen"].append(policy.chosen_logps[pick].cpu())
            columns["rejected"].append(policy.rejected_logps[pick].cpu())
            columns["distance"].append(batch["recall_distance"][pick].cpu())
            columns["type"].extend(batch["rejection_type"][b][k] for b, k in zip(*(p.tolist() for p in pick)))
    finally:
        for m, mode in training:
            m.train(mode)
    margin, raw = torch.cat(columns["margin"]), torch.cat(columns["raw"])
    distance = torch.cat(columns["distance"])
    types = columns["type"]
    result: dict[str, Any] = {
        "num_conversations": len(rows),
        "num_pairs": int(margin.numel()),
        **{k: v for k, v in _pair_summary(margin, raw).items() if k != "count"},
        "mean_logp_chosen": float(torch.cat(columns["chosen"]).mean()),
        "mean_logp_rejected": float(torch.cat(columns["rejected"]).mean()),
        "by_rejection_type": {},
        "by_recall_distance": {},
    }
    for kind in sorted({t for t in types if t}):
        sel = torch.tensor([t == kind for t in types])
        result["by_rejection_type"][kind] = _pair_summary(margin[sel], raw[sel])
    for d in sorted({int(x) for x in distance.tolist() if x > 0}):
        sel = distance == d
        result["by_recall_distance"][d] = _pair_summary(margin[sel], raw[sel])
    return result


def format_preference_table(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_preferences` results before / after training."""
    def pct(value):
        return "n/a" if value is None else f"{100.0 * value:.1f}%"

    lines = ["| pairs | count | preference acc. before | after | logp acc. before | after |", "|---|---|---|---|---|---|"]
    groups = [("all", after, before)]
    groups += [(f"rejected: {k}", v, (before or {}).get("by_rejection_type", {}).get(k))
               for k, v in after.get("by_rejection_type", {}).items()]
    groups += [(f"recall distance {d}", v, (before or {}).get("by_recall_distance", {}).get(d))
               for d, v in after.get("by_recall_distance", {}).items()]
    for name, now, then in groups:
        then = then or {}
        count = now.get("count", now.get("num_pairs"))
        lines.append(f"| {name} | {count} | {pct(then.get('preference_accuracy'))} | "
                     f"{pct(now.get('preference_accuracy'))} | {pct(then.get('logp_accuracy'))} | "
                     f"{pct(now.get('logp_accuracy'))} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# trainer


class RxRLHFTrainer(RxTStageMixin, Trainer):
    """Memory-aware DPO (stage 6) over preference conversations: a ``transformers.Trainer`` configured by an
    ``RxRLHFConfig`` (a ``trl.DPOConfig``).

    Why not a ``trl.DPOTrainer`` subclass: its ``__init__`` tokenizes the data through the private
    ``_prepare_dataset`` (prompt / chosen / rejected strings, not conversations) and patches the model's forward
    with a fused LM head, and its ``compute_loss`` / ``log`` / ``evaluate`` run through the private
    ``_compute_loss`` / ``_metrics``; scoring conversations through the STM would mean overriding those again,
    which ties the code to one TRL release. This class keeps DPO's configuration, reference handling, loss names
    and metric names, and overrides only public ``transformers.Trainer`` hooks (see the module docstring).

    ``train_dataset`` holds rows ``interactions: [{query, chosen, rejected}]`` (optional per-turn
    ``recall_distance`` / ``rejection_type``), e.g. ``build_preference_dataset(...)["train"]`` or
    ``load_preference_dataset(...)``. Every row is validated first (clear error naming the row / turn / field).
    ``ref_model``: the frozen reference; ``None`` -> a frozen copy of ``model`` as it is now (or, with PEFT, the
    model with its adapters disabled, or its ``"ref"`` adapter: a copy of a given PeftModel's adapter). Without
    PEFT, ``args.trainable_components`` are trained (default: decoder and memory cross-attention); with
    ``args.lora_r`` (or ``peft_config``) only the LoRA adapters train.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
    >>> from rxt_hf.trainers.preference_data import build_preference_dataset
    >>> from rxt_hf.trainers.rxrlhf_trainer import RxRLHFConfig, RxRLHFTrainer
    >>> data = build_preference_dataset(num_conversations=20, num_turns=3, max_recall_distance=2, seed=0)
    >>> texts = [t[k] for r in data["train"] for t in r["interactions"] for k in ("query", "chosen", "rejected")]
    >>> tokenizer = build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=64)
    >>> _ = torch.manual_seed(0)
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))
    >>> args = RxRLHFConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, beta=0.1,
    ...                     max_length=64, use_cpu=True, disable_tqdm=True, save_strategy="no")
    >>> trainer = RxRLHFTrainer(model, args=args, train_dataset=data["train"], processing_class=tokenizer)
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints each log record
    ...     _ = trainer.train()
    >>> sorted(k for k in trainer.state.log_history[0] if k.startswith("rewards/"))
    ['rewards/accuracies', 'rewards/chosen', 'rewards/margins', 'rewards/rejected']
    >>> result = trainer.evaluate_preferences(data["test"])
    >>> 0.0 <= result["preference_accuracy"] <= 1.0
    True

    ```
    """

    stage_name = "rxrlhf"
    loss_is_scaled_for_ga = False  # compute_loss returns the micro-batch's loss; the Trainer divides it

    def __init__(self, model, ref_model=None, args: RxRLHFConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if not isinstance(args, RxRLHFConfig):
            raise TypeError(f"args must be an RxRLHFConfig, got {type(args).__name__}; build one with "
                            "RxRLHFConfig(output_dir=...).")
        if isinstance(model, str):
            raise TypeError("RxRLHFTrainer needs an instantiated RxTForCausalLM (load it with from_pretrained first).")
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model are the same object; omit ref_model to train against a frozen copy "
                             "of the starting model.")
        if processing_class is None:
            raise ValueError("RxRLHFTrainer needs processing_class=<the RxT tokenizer>.")
        if train_dataset is None:
            raise ValueError("RxRLHFTrainer needs a preference train_dataset (interactions: [{query, chosen, "
                             "rejected}]), e.g. build_preference_dataset(...)['train'].")
        if isinstance(train_dataset, datasets.IterableDataset):
            args.accelerator_config.dispatch_batches = False  # as TRL: one process cannot concatenate streamed batches
        limit = int(_base_config(model).max_position_embeddings)
        self.max_interaction_length = min(args.max_length or limit, limit)
        if peft_config is None and args.lora_r is not None and not is_peft_model(model):
            peft_config = decoder_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                                              args.lora_target_modules)
        if peft_config is not None and is_peft_model(model):
            raise ValueError("peft_config was given with a PeftModel; merge its adapters first "
                             "(model.merge_and_unload()) or pass the PeftModel without peft_config.")
        self.uses_peft = peft_config is not None or is_peft_model(model)
        if args.sync_ref_model and self.uses_peft:
            raise ValueError("RxRLHFConfig.sync_ref_model=True does not work with PEFT: the reference is the model "
                             "with its adapters disabled, there is no copy to synchronise. Set it to False.")
        if ref_model is None and not self.uses_peft:
            ref_model = copy.deepcopy(model)  # the starting policy
        if ref_model is not None:
            freeze_reference(ref_model)
        if not self.uses_peft:
            active = set(args.trainable_components)
            for name, params in component_parameters(model).items():
                for param in params:
                    param.requires_grad_(name in active)
        if processing_class.pad_token_id is not None:  # the model agrees with the tokenizer's padding (as in TRL)
            model.config.pad_token_id = processing_class.pad_token_id
            model.generation_config.pad_token_id = processing_class.pad_token_id
        set_seed(args.seed)  # LoRA adapters start from the seed (as in TRL)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        elif is_peft_model(model) and ref_model is None:
            add_reference_adapter(model)
        if data_collator is None:
            data_collator = PreferenceCollator(processing_class, max_length=self.max_interaction_length)
        train_dataset = prepare_preference_dataset(train_dataset, processing_class, "train", args.dataset_num_proc)
        eval_dataset = prepare_preference_dataset(eval_dataset, processing_class, "eval", args.dataset_num_proc)
        self.start_stage_record(self.uses_peft)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self.refuse_data_parallel()
        self.activation_offload_context = (get_act_offloading_ctx_manager(model=self.model)
                                           if args.activation_offloading else contextlib.nullcontext())
        coef = args.router_aux_loss_coef
        self.router_aux_loss_coef = getattr(_base_config(model), "router_aux_loss_coef", 0.0) if coef is None else coef
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
            if ref_model is not None:
                disable_dropout_in_model(ref_model)
        self.ref_model = ref_model
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            elif self.is_fsdp_enabled:
                self.ref_model = prepare_fsdp(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            freeze_reference(self.ref_model)
        if args.sync_ref_model:
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        # TRL's metrics of the pairs scored since the last log, per mode; answer tokens read in training
        self.step_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.train_tokens = 0

    # --- scoring and the loss -----------------------------------------------------------------------------

    def compute_ref_log_probs(self, model, inputs):
        """The reference's ``([B, N] chosen, [B, N] rejected)`` log-probabilities of a multi-turn batch (as TRL's
        method of that name, per turn); the reference plays the conversation with its own memory from the chosen
        history."""
        unwrapped = self.accelerator.unwrap_model(model)
        ref = None if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
        reference, context = _reference(unwrapped, ref)
        with torch.no_grad(), context():
            scores = score_conversations(reference, inputs)
        return scores.chosen_logps, scores.rejected_logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Memory-aware DPO over conversation turns: the policy plays every conversation turn by turn with the STM
        (with gradients, also through the memory updates when memory components train), the reference does the
        same without, and :func:`preference_loss` is applied to every (conversation, turn) pair. Records TRL's
        metrics for :meth:`log`."""
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        policy = score_conversations(unwrapped, inputs, forward_model=model)
        ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        pick = inputs["turn_mask"].bool().nonzero(as_tuple=True)  # every (conversation, turn) is a pair
        args = self.args
        loss, stats = preference_loss(
            policy.chosen_logps[pick], policy.rejected_logps[pick], ref_chosen[pick], ref_rejected[pick],
            beta=args.beta, loss_types=args.loss_type, loss_weights=args.loss_weights,
            label_smoothing=args.label_smoothing,
            chosen_lengths=policy.chosen_lengths[pick].float(), rejected_lengths=policy.rejected_lengths[pick].float(),
        )
        metrics = self.step_metrics[mode]
        if policy.router_aux_loss is not None and self.router_aux_loss_coef:
            loss = loss + self.router_aux_loss_coef * policy.router_aux_loss
            metrics["aux_loss"].append(self.accelerator.gather(policy.router_aux_loss.detach()[None]).mean().item())
        # TRL's metrics, per pair; processes may hold different numbers of pairs, so gather sums and counts
        chosen_lp, rejected_lp = policy.chosen_logps[pick].detach(), policy.rejected_logps[pick].detach()
        sums = torch.stack([
            stats["chosen_rewards"].sum(), stats["rejected_rewards"].sum(),
            (stats["chosen_rewards"] > stats["rejected_rewards"]).float().sum(), stats["margins"].sum(),
            chosen_lp.sum(), rejected_lp.sum(), (chosen_lp > rejected_lp).float().sum(),
            chosen_lp.new_tensor(float(chosen_lp.numel())),
        ])
        totals = self.accelerator.gather(sums[None]).sum(0)
        count = totals[-1].clamp(min=1)
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logps/accuracies")
        for name, total in zip(names, totals[:-1]):
            metrics[name].append((total / count).item())
        metrics["pairs"].append(totals[-1].item())
        if mode == "train":
            self.train_tokens += policy.num_tokens
        metrics["num_tokens"] = [self.train_tokens]
        return (loss, None) if return_outputs else loss

    # --- Trainer hooks ------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step`` inside the activation-offloading context (``args.activation_offloading``)."""
        with self.activation_offload_context:
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss only (no per-token logits for a whole conversation)."""
        inputs = send_to_device(inputs, self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``; a preference data set passed here is validated and tokenized first (a name selects
        one of the prepared ``eval_dataset`` splits)."""
        eval_dataset = prepare_preference_dataset(eval_dataset, self.processing_class, "eval",
                                                  self.args.dataset_num_proc)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the metrics recorded since the last log (``eval_`` in evaluation)."""
        mode = "train" if self.model.training else "eval"
        for key, values in self.step_metrics[mode].items():
            logs[f"eval_{key}" if mode == "eval" else key] = sum(values) / len(values)
        super().log(logs, start_time)
        self.step_metrics[mode].clear()

    # --- evaluation and saving ------------------------------------------------------------------------

    def evaluate_preferences(self, dataset, batch_size: int | None = None, max_conversations: int | None = None):
        """:func:`evaluate_preferences` of the current policy against this trainer's reference."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        ref = None if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
        return evaluate_preferences(unwrapped, ref, dataset, self.processing_class,
                                    batch_size=batch_size or self.args.per_device_eval_batch_size,
                                    max_length=self.max_interaction_length, max_conversations=max_conversations)

    def data_description(self) -> str:
        data = self.train_dataset
        size = len(data) if hasattr(data, "__len__") else "streamed"
        return (f"Preference conversations ({size} training conversations; every turn a chosen / rejected pair, "
                "scored reading the memory of the chosen answers of the earlier turns).")
