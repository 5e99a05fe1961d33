"""Stage 4: supervised memory-aware training (SMAT).

The decoder answers turn ``k`` of a conversation reading the Short-Term Memory written by the encoder and the
memory attention from turns ``0..k-1``; the loss is the decoder's cross-entropy on the answer tokens, and its
gradient flows back through the memory into the memory attention and the encoder (and, through them, into
earlier turns). A Llama chat model would instead see the whole history in its prompt; a T5 model would
cross-attend to the encoding of the current input only. Here the only path from turn ``k - d`` to turn ``k``
is the fixed-size STM, so this is the stage in which the model learns to use it.

Two schedules make that work on a small budget:

* **gradual unfreezing** (``freeze_schedule``, the name stage 5 uses too): each component (decoder, the decoder's memory
  cross-attention, memory attention, encoder, shared embedding) becomes trainable at its own optimizer step;
* **turn-length curriculum** (``turn_curriculum``): short conversations first (two turns: every example is
  a one-step recall), longer ones later (DESIGN section 7 found it decisive in an earlier plain-PyTorch
  model). The default recipe uses it with every component trainable from step 0; its measured recall by
  distance is in docs/experiments.md.

:class:`SMATObjective` is the stage module (its ``forward(batch)`` returns the loss), :class:`SMATTrainer` the
``transformers.Trainer`` that trains it, reading its batches from :class:`TurnCurriculum`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rxt_hf.modeling_rxt.conversation_rxt import ConversationBatch
from rxt_hf.modeling_rxt.format_rxt import IGNORE_INDEX

from .trainer_base import RxTStageModule, RxTStageTrainer, RxTTrainingArguments, StageOutput

__all__ = [
    "SMAT_COMPONENTS",
    "component_parameters",
    "SMATConfig",
    "SMATObjective",
    "SMATTrainer",
    "TurnCurriculum",
    "resolve_schedule_step",
]

SMAT_COMPONENTS = ("decoder", "memory_cross_attention", "memory_attention", "encoder", "embedding")


def resolve_schedule_step(value: int | float | None, max_steps: int, name: str = "step") -> int | None:
    """An optimizer step from a schedule value: an ``int`` is a step, a ``float`` in ``[0, 1)`` a fraction of
    ``max_steps`` (rounded down), ``None`` never."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be an int (optimizer step), a float in [0, 1) or None.")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}={value!r}: an optimizer step must be >= 0.")
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name}={value!r}: a float is a fraction of max_steps and must be in [0, 1); use an int for a step."
        )
    return int(math.floor(value * max_steps + 1e-9))


def component_parameters(model) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters of each schedulable component of an `RxTForCausalLM` (SMAT unfreezing, MRL freezing). The LM
    head goes with the decoder unless tied to the shared embedding (then it is the embedding); the decoder's
    memory cross-attention and memory norms are their own component; the learned initial STM goes with memory
    attention."""
    backbone = model.model
    embedding = list(backbone.embed_tokens.parameters())
    shared = {id(p) for p in embedding}
    head = [p for p in model.get_output_embeddings().parameters() if id(p) not in shared]
    reading = [
        p
        for layer in backbone.decoder.layers
        for module in (layer.memory_cross_attn, layer.memory_norm, layer.cross_attn_norm)
        for p in module.parameters()
    ]
    reading_ids = shared | {id(p) for p in reading}
    return {
        "decoder": [p for p in backbone.decoder.parameters() if id(p) not in reading_ids] + head,
        "memory_cross_attention": reading,
        "memory_attention": [p for p in backbone.memory_attention.parameters() if id(p) not in shared],
        "encoder": [p for p in backbone.encoder.parameters() if id(p) not in shared],
        "embedding": embedding,
    }


# --------------------------------------------------------------------------------------------
# Turn-length curriculum: deterministic, resumable batches
# --------------------------------------------------------------------------------------------


class TurnCurriculum:
    """Which conversations each micro-batch of a run holds, as a pure function of ``(step, micro)``.

    ``phases`` is a list of ``(start, num_turns)``; ``start`` is a step or a fraction of ``max_steps``
    (see :func:`resolve_schedule_step`), the first phase starts at 0. ``datasets`` is one data set (every
    phase reads it, its conversations cut to the phase's ``num_turns`` by the collator) or a dict
    ``{num_turns: data set}`` (each phase reads its own; e.g. one synthetic set per turn count, so that a
    2-turn phase really is plant-then-recall).

    Data order: phase ``p`` visits its data set in epochs; the order of epoch ``e`` is a permutation drawn
    from a generator seeded by ``(seed, num_turns, e)``; batches of the phase are consecutive slices of the
    concatenated epochs (the incomplete tail of an epoch is dropped). The micro-batch ``micro`` of
    optimizer step ``step`` is batch number ``(step - start_p) * grad_accum + micro`` of phase ``p``; with
    several processes each global batch is split between them by ``process_index``. So a run resumed at
    any ``global_step`` reads exactly the batches an uninterrupted run would, with no state to save.
    """

    def __init__(
        self,
        datasets,
        phases: list[tuple[int | float, int]] | None,
        max_steps: int,
        batch_size: int,
        collator,
        seed: int = 0,
        gradient_accumulation_steps: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.is_dict = isinstance(datasets, Mapping)
        if self.is_dict:
            if not datasets:
                raise ValueError("train_dataset is an empty dict; give {num_turns: Dataset}.")
            for key in datasets:
                if isinstance(key, bool) or not isinstance(key, int) or key < 1:
                    raise ValueError(
                        f"train_dataset dict keys must be turn counts (int >= 1), got {key!r}."
                    )
            if phases is None:
                if len(datasets) != 1:
                    raise ValueError(
                        f"train_dataset is a dict with turn counts {sorted(datasets)} but turn_curriculum is "
                        "None; set turn_curriculum=[(0.0, n), (fraction, m), ...] to say when each is used."
                    )
                phases = [(0, next(iter(datasets)))]
        self.datasets = datasets
        if phases is None:
            phases = [(0, None)]
        resolved = []
        for i, entry in enumerate(phases):
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"turn_curriculum[{i}]={entry!r} must be a pair (start, num_turns).")
            start, turns = entry
            start = resolve_schedule_step(start, max_steps, f"turn_curriculum[{i}][0]")
            if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 1):
                raise ValueError(f"turn_curriculum[{i}][1]={turns!r}: num_turns must be an int >= 1.")
            if self.is_dict and turns not in datasets:
                raise ValueError(
                    f"turn_curriculum[{i}] uses num_turns={turns} but train_dataset has only turn counts "
                    f"{sorted(datasets)}; add a data set for {turns} turns or change the curriculum."
                )
            if resolved and start < resolved[-1][0]:
                raise ValueError(f"turn_curriculum starts must not decrease; got {phases!r}.")
            resolved.append((start, turns))
        if resolved[0][0] != 0:
            raise ValueError(f"turn_curriculum must start at step 0 (first entry (0.0, n)); got {phases!r}.")
        self.phases = resolved
        self.batch_size = int(batch_size)
        self.collator = collator
        self.seed = int(seed)
        self.grad_accum = int(gradient_accumulation_steps)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        for start, turns in self.phases:
            n = len(self.dataset_for(turns))
            if n < self.batch_size * self.num_processes:
                raise ValueError(
                    f"the data set for num_turns={turns} has {n} conversations, fewer than one global batch "
                    f"({self.batch_size} x {self.num_processes} processes)."
                )

    # --- schedule -------------------------------------------------------------------------------------

    def phase_index(self, step: int) -> int:
        index = 0
        for i, (start, _) in enumerate(self.phases):
            if step >= start:
                index = i
        return index

    def num_turns(self, step: int) -> int | None:
        """Turn count of the phase that holds optimizer step ``step`` (None: whole conversations)."""
        return self.phases[self.phase_index(step)][1]

    def dataset_for(self, num_turns: int | None):
        return self.datasets[num_turns] if self.is_dict else self.datasets

    def position(self, step: int, micro: int = 0) -> tuple[int | None, int]:
        """``(num_turns, global batch index within its phase)`` of micro-batch ``micro`` of step ``step``."""
        p = self.phase_index(step)
        start, turns = self.phases[p]
        return turns, (step - start) * self.grad_accum + micro

    # --- data ---------------------------------------------------------------------------------------

    def _phase_seed(self, num_turns: int | None, epoch: int) -> int:
        return (self.seed * 1_000_003 + (num_turns or 0) * 10_007 + epoch) % (2**63 - 1)

    def example_indices(self, step: int, micro: int = 0) -> tuple[int | None, list[int]]:
        """Row indices (in the phase's data set) of this process's part of micro-batch ``(step, micro)``."""
        turns, index = self.position(step, micro)
        size = len(self.dataset_for(turns))
        global_batch = self.batch_size * self.num_processes
        per_epoch = size // global_batch
        epoch, within = divmod(index, per_epoch)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self._phase_seed(turns, epoch)))
        lo = within * global_batch + self.process_index * self.batch_size
        return turns, order[lo:lo + self.batch_size].tolist()

    def collate(self, rows: list[dict], num_turns: int | None) -> dict[str, Any]:
        collator = self.collator
        if num_turns is not None and dataclasses.is_dataclass(collator) and hasattr(collator, "max_turns"):
            if collator.max_turns is None or collator.max_turns > num_turns:
                collator = dataclasses.replace(collator, max_turns=num_turns)
        batch = collator(rows)
        if num_turns is not None and batch["input_ids"].shape[1] > num_turns:
            batch = _truncate_turns(batch, num_turns)
        return batch

    def batch(self, step: int, micro: int = 0) -> dict[str, Any]:
        """The collated micro-batch ``micro`` of optimizer step ``step`` (with ``num_turns`` attached)."""
        turns, indices = self.example_indices(step, micro)
        dataset = self.dataset_for(turns)
        rows = [dataset[i] for i in indices]
        batch = self.collate(rows, turns)
        batch["num_turns"] = batch["input_ids"].shape[1]
        return batch

    def iter_batches(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Micro-batches in training order from optimizer step ``start_step`` on (endless)."""
        step = start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.batch(step, micro)
            step += 1


class CurriculumBatches(Dataset):
    """The training batches of a run as a map-style data set: item ``i`` is micro-batch ``i % grad_accum`` of
    optimizer step ``i // grad_accum`` (:meth:`TurnCurriculum.batch`), ``max_steps x grad_accum`` items in all.
    Read in order by a ``DataLoader`` (``batch_size=1``, :func:`first_item` as collate function), it is the
    trainer's train loader; a resumed run skips the first ``global_step x grad_accum`` items (transformers'
    ``skip_first_batches`` does, without building them) and reads the same batches as an uninterrupted run."""

    def __init__(self, curriculum: "TurnCurriculum", max_steps: int):
        self.curriculum = curriculum
        self.max_steps = int(max_steps)

    def __len__(self) -> int:
        return self.max_steps * self.curriculum.grad_accum

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, micro = divmod(int(index), self.curriculum.grad_accum)
        return self.curriculum.batch(step, micro)


def first_item(items: list):
    """Collate function of a loader over already collated batches (``batch_size=1``)."""
    return items[0]


def _truncate_turns(batch: dict[str, Any], num_turns: int) -> dict[str, Any]:
    """Keep the first ``num_turns`` turns of a collated ``[B, N, ...]`` batch (any collator)."""
    size, turns = batch["input_ids"].shape[:2]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (size, turns):
            out[key] = value[:, :num_turns]
        elif isinstance(value, list) and len(value) == size and all(isinstance(v, list) and len(v) == turns for v in value):
            out[key] = [v[:num_turns] for v in value]
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Config and trainer
# --------------------------------------------------------------------------------------------


def _default_freeze() -> dict[str, int | float | None]:
    return {"decoder": 0, "memory_cross_attention": 0, "memory_attention": 0, "encoder": 0, "embedding": 0}


@dataclass
class SMATConfig(RxTTrainingArguments):
    """Stage 4 hyper-parameters on top of :class:`~trainers.trainer_base.RxTTrainingArguments`."""

    freeze_schedule: dict[str, int | float | None] = field(
        default_factory=_default_freeze,
        metadata={"help": "Component -> optimizer step (int) or fraction of max_steps (float in [0, 1)) from which "
                          "it is trained; components: decoder (with lm_head; without its memory cross-attention), "
                          "memory_cross_attention (the decoder's memory cross-attention and memory norms), "
                          "memory_attention, encoder, embedding (shared). A component that is missing or None stays "
                          "frozen."},
    )
    turn_curriculum: list[tuple[int | float, int]] | None = field(
        default=None,
        metadata={"help": "Turn-length curriculum [(start, num_turns), ...]; start is a step or a fraction of "
                          "max_steps, the first start is 0. None: whole conversations throughout."},
    )
    recall_weight: float | None = field(
        default=None,
        metadata={"help": "Loss weight of the answers that recall an earlier fact (rows with recall_distance), in the "
                          "default ConversationCollator; None: 1 (every answer token counts the same)."},
    )
    backprop_turns: int | None = field(
        default=None,
        metadata={"help": "Truncated back-propagation through turns: the STM is detached before the memory "
                          "update of every turn k with k % backprop_turns == 0, so a loss reaches back through at "
                          "most this many memory updates (1: only the update just before it). None: through the "
                          "whole conversation."},
    )

    def __post_init__(self):
        if not isinstance(self.freeze_schedule, Mapping):
            raise TypeError(
                f"freeze_schedule={self.freeze_schedule!r} must be a dict like {_default_freeze()}."
            )
        self.freeze_schedule = dict(self.freeze_schedule)
        for key, value in self.freeze_schedule.items():
            if key not in SMAT_COMPONENTS:
                raise ValueError(
                    f"freeze_schedule has unknown component {key!r}; choose from {list(SMAT_COMPONENTS)}."
                )
            resolve_schedule_step(value, self.max_steps or 0, f"freeze_schedule[{key!r}]")
        if not any(v is not None for v in self.freeze_schedule.values()):
            raise ValueError("freeze_schedule trains nothing: give at least one component a start step.")
        if self.turn_curriculum is not None:
            if not isinstance(self.turn_curriculum, (list, tuple)) or not self.turn_curriculum:
                raise ValueError(
                    f"turn_curriculum={self.turn_curriculum!r} must be a non-empty list of (start, num_turns)."
                )
            self.turn_curriculum = [tuple(entry) for entry in self.turn_curriculum]
            for i, entry in enumerate(self.turn_curriculum):
                if len(entry) != 2:
                    raise ValueError(f"turn_curriculum[{i}]={entry!r} must be a pair (start, num_turns).")
                resolve_schedule_step(entry[0], self.max_steps or 0, f"turn_curriculum[{i}][0]")
                if isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 1:
                    raise ValueError(f"turn_curriculum[{i}][1]={entry[1]!r}: num_turns must be an int >= 1.")
            if self.turn_curriculum[0][0] != 0:
                raise ValueError(
                    f"turn_curriculum={self.turn_curriculum!r} must start at step 0 (first entry (0.0, num_turns))."
                )
        if self.backprop_turns is not None and (
            isinstance(self.backprop_turns, bool) or not isinstance(self.backprop_turns, int) or self.backprop_turns < 1
        ):
            raise ValueError(f"backprop_turns={self.backprop_turns!r} must be None or an int >= 1.")
        if self.recall_weight is not None and (
            isinstance(self.recall_weight, bool) or not isinstance(self.recall_weight, (int, float))
            or not self.recall_weight > 0
        ):
            raise ValueError(f"recall_weight={self.recall_weight!r} must be None or a number > 0.")
        super().__post_init__()


class SMATObjective(RxTStageModule):
    """The stage 4 module: the RxT model; ``forward(batch)`` plays each ``[B, N, T]`` conversation through the
    STM and returns the mean answer cross-entropy of its turns (see :class:`SMATTrainer`)."""

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def forward(self, batch: dict[str, Any]) -> StageOutput:
        unwrapped = self.model
        input_ids = batch["input_ids"]  # [B, N, T]
        if input_ids.dim() != 3:
            raise ValueError(
                f"SMATTrainer needs multi-turn batches input_ids [B, N, T], got {list(input_ids.shape)}; use "
                "trainers.data.ConversationCollator."
            )
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = batch["labels"]  # [B, N, T]
        loss_weights = batch.get("loss_weights")  # [B, N, T] or None
        turn_mask = batch.get("turn_mask")  # [B, N]
        if turn_mask is None:
            turn_mask = attention_mask.sum(-1) > 0
        turn_mask = turn_mask.bool()
        recall = batch.get("recall_distance")  # [B, N]
        batch_size, num_turns, _ = input_ids.shape
        config = unwrapped.config
        use_aux = getattr(config, "decoder_feed_forward", None) == "moe"

        conversations = ConversationBatch(unwrapped, batch_size=batch_size, backprop_turns=self.args.backprop_turns)
        turn_losses, aux_losses = [], []
        metrics: dict[str, float] = {}
        tokens = 0
        recall_hits = recall_total = 0
        for turn in conversations.play(input_ids, attention_mask, turn_mask, return_logits=True, return_stm=False):
            k, rows = turn.turn, turn.rows
            if rows.numel() == 0:
                continue
            pick = slice(None) if rows.numel() == batch_size else rows  # the rows the decoder read at turn k
            tokens += int(turn.attention_mask.sum())
            logits = turn.logits[:, :-1].float()  # [n, T-1, V]
            targets = labels[pick, k, 1:]  # [n, T-1] next-token targets
            valid = targets != IGNORE_INDEX  # [n, T-1]
            if bool(valid.any()):
                ce = F.cross_entropy(
                    logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
                )  # [n, T-1]
                weights = valid.to(ce.dtype)
                if loss_weights is not None:
                    weights = weights * loss_weights[pick, k, 1:].to(ce.dtype)
                turn_loss = torch.where(valid, ce * weights, torch.zeros_like(ce)).sum() / weights.sum().clamp(min=1e-8)
                turn_losses.append(turn_loss)
                metrics[f"loss_turn_{k}"] = float(turn_loss.detach())
                if recall is not None:
                    recall_rows = valid & (recall[pick, k] > 0)[:, None]
                    if bool(recall_rows.any()):
                        hits = (logits.detach().argmax(-1) == targets) & recall_rows
                        recall_hits += int(hits.sum())
                        recall_total += int(recall_rows.sum())
            if use_aux and turn.aux_loss is not None:
                aux_losses.append(turn.aux_loss)

        if not turn_losses:
            zero = sum(p.sum() * 0.0 for p in unwrapped.parameters() if p.requires_grad)
            return StageOutput(zero, {"loss": 0.0}, tokens)
        ce_loss = torch.stack(turn_losses).mean()
        loss = ce_loss
        if aux_losses:
            aux = torch.stack(aux_losses).mean()
            loss = loss + config.router_aux_loss_coef * aux
            metrics["router_aux_loss"] = float(aux.detach())
        metrics.update(
            loss=float(loss.detach()),
            ce_loss=float(ce_loss.detach()),
            num_turns=float(num_turns),
            trainable_parameters=float(self.trainable_parameter_count()),
        )
        if recall_total:
            metrics["recall_accuracy"] = recall_hits / recall_total
        return StageOutput(loss, metrics, tokens)


class SMATTrainer(RxTStageTrainer):
    """Stage 4 trainer: supervised memory-aware training with gradual unfreezing and a turn curriculum.

    A batch is ``[B, N, T]`` (``ConversationCollator``). The memory starts fresh (``init_memory``); for each
    turn ``k`` the decoder reads the current STM and is scored on the answer tokens of turn ``k``
    (cross-entropy weighted by ``loss_weights`` when the collator gives them, e.g. recall answers x3; rows
    whose conversation has no turn ``k`` are excluded), then ``update_memory`` writes the whole interaction
    into the STM (rows without turn ``k`` keep their memory). The loss is the mean over turns of the
    token-weighted cross-entropy, plus the MoE router auxiliary loss. Gradients flow through the memory
    across all turns unless ``backprop_turns`` truncates them (the STM is detached before the update of every
    turn ``k`` with ``k % backprop_turns == 0``).

    ``train_dataset`` is one data set, or a dict ``{num_turns: data set}`` selected by ``turn_curriculum``;
    batches come from :class:`TurnCurriculum` (deterministic and resumable from ``global_step`` alone) through
    :class:`CurriculumBatches`. The default collator is ``ConversationCollator(processing_class, max_length,
    recall_weight)``. Every parameter is trainable when the optimizer and a distributed wrapper are built;
    ``freeze_schedule`` then sets ``requires_grad`` before each optimizer step (a frozen parameter gets no
    gradient, and AdamW leaves a parameter without one alone: no update, no weight decay).

    Example:

    ```python
    >>> import tempfile
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
    >>> from rxt_hf.trainers.data import ConversationCollator
    >>> from rxt_hf.trainers.synthetic_data import build_synthetic_dataset
    >>> from rxt_hf.trainers.smat_trainer import SMATConfig, SMATTrainer
    >>> sets = {n: build_synthetic_dataset("multi-turn", num_conversations=20, num_turns=n, max_recall_distance=n - 1,
    ...                                    seed=n)["train"] for n in (2, 3)}
    >>> texts = [r["query"] + " " + r["answer"] for r in sets[3]]
    >>> tokenizer = build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=64)
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))
    >>> args = SMATConfig(output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4, max_length=64,
    ...                   turn_curriculum=[(0.0, 2), (0.5, 3)], recall_weight=3.0,
    ...                   freeze_schedule={"decoder": 0, "memory_attention": 0, "encoder": 2, "embedding": 2},
    ...                   report_to="none", disable_tqdm=True)
    >>> trainer = SMATTrainer(model, args, train_dataset=sets, processing_class=tokenizer)
    >>> metrics = trainer.train().metrics
    >>> trainer.curriculum.num_turns(0), trainer.curriculum.num_turns(3)
    (2, 3)

    ```
    """

    args_class = SMATConfig
    stage_name = "smat"

    def __init__(self, model, args: SMATConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        # Every parameter trainable while the optimizer and any distributed wrapper are built; `freeze_schedule`
        # freezes what must wait at each step (`on_step_begin`).
        for param in model.parameters():
            param.requires_grad_(True)
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        args = self.args
        self.curriculum = TurnCurriculum(
            train_dataset,
            args.turn_curriculum,
            max_steps=args.max_steps,
            batch_size=args.per_device_train_batch_size,
            collator=self.data_collator,
            seed=args.seed,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
        )
        self.freeze_steps = {
            name: resolve_schedule_step(args.freeze_schedule.get(name), args.max_steps, f"freeze_schedule[{name!r}]")
            for name in SMAT_COMPONENTS
        }
        self.current_num_turns = self.curriculum.num_turns(0)

    def build_stage_module(self, model, args: SMATConfig) -> SMATObjective:
        return SMATObjective(model, args)

    def default_data_collator(self, args, processing_class, train_dataset):
        from .data import ConversationCollator

        if processing_class is None:
            return None
        return ConversationCollator(processing_class, max_length=args.max_length, recall_weight=args.recall_weight)

    def get_train_dataloader(self) -> DataLoader:
        """The curriculum's batches in training order (:class:`CurriculumBatches`); each process reads its own
        share (the curriculum splits every global batch by process), so the loader is not sharded again."""
        return DataLoader(CurriculumBatches(self.curriculum, self.args.max_steps), batch_size=1, shuffle=False,
                          collate_fn=first_item, num_workers=self.args.dataloader_num_workers)

    # --- gradual unfreezing -------------------------------------------------------------------------

    def component_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return component_parameters(self.rxt_model)

    def data_description(self) -> str:
        if not self.curriculum.is_dict:
            return super().data_description()
        sizes = ", ".join(f"{n} turns: {len(d)}" for n, d in sorted(self.curriculum.datasets.items()))
        phases = ", ".join(f"from step {start}: {turns} turns" for start, turns in self.curriculum.phases)
        return f"Multi-turn conversations, one set per turn count ({sizes} conversations); curriculum: {phases}."

    def trainable_components(self, step: int) -> list[str]:
        steps = self.freeze_steps
        return [n for n in SMAT_COMPONENTS if steps.get(n) is not None and step >= steps[n]]

    def apply_unfreeze(self, step: int) -> list[str]:
        """Set ``requires_grad`` for optimizer step ``step``; returns the trainable components."""
        active = self.trainable_components(step)
        for name, params in self.component_parameters().items():
            for param in params:
                param.requires_grad_(name in active)
        return active

    def on_step_begin(self, step: int) -> None:
        super().on_step_begin(step)
        self.apply_unfreeze(step)
        self.current_num_turns = self.curriculum.num_turns(step)
