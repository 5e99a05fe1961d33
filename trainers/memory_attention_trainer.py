"""Stage 3: self-supervised pre-training of the memory attention network.

Before the decoder ever reads a memory written by the model itself (stage 4), the memory attention network
is taught to *write* something sensible: given the old Short-Term Memory and the encoder's states of a new
interaction, the new memory should point in the direction of a weighted mean of the two. The weight of the
new data starts high (the first interaction lands in an initial, content-free memory) and decays over the
turns of a conversation, so that older content is kept. There is no decoder and no language-model loss in
this stage, only a negative cosine similarity between the new STM and that target (the RxT-Alpha recipe).

Unlike an encoder-decoder model (T5) there is no cross-attention target to supervise directly; unlike Llama
there is no memory at all. The only design question is how to compare ``T`` encoded positions with ``S``
memory slots; see :func:`pool_encoded_to_slots`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .trainer_base import RxTStageModule, RxTStageTrainer, RxTTrainingArguments, StageOutput

__all__ = [
    "MemoryAttentionConfig",
    "MemoryAttentionObjective",
    "MemoryAttentionTrainer",
    "pool_encoded_to_slots",
    "memory_attention_labels",
    "new_data_weight_schedule",
]


# --------------------------------------------------------------------------------------------
# Label construction (public: tests and notebooks use these directly)
# --------------------------------------------------------------------------------------------


def pool_encoded_to_slots(
    encoded: torch.Tensor,  # [B, L, T, D]
    attention_mask: torch.Tensor | None,  # [B, T] 1 = real token
    num_slots: int,
) -> torch.Tensor:  # [B, L, S, D]
    """Map the encoded positions of one interaction onto the ``S`` memory slots, per layer.

    Only the valid (non-padding) positions take part; with ``n`` of them, slot ``s`` (0-based) gets:

    * ``n == S``: position ``s`` exactly, one slot per position (the published stage 3 pairing, where the
      STM size equals the interaction length);
    * ``n > S``: the average of the contiguous chunk ``[floor(s*n/S), ceil((s+1)*n/S))`` (adaptive
      average pooling: every position is used, neighbouring chunks overlap by at most one position);
    * ``n < S``: position ``floor(s*n/S)`` (positions repeated in order, each about ``S/n`` times, no
      averaging).

    So the slot order follows the token order, and each slot's target is a *local* piece of the interaction
    rather than one mean broadcast to every slot (which makes all slot targets identical and, measured,
    taught nothing). Rows without any valid position get zeros. Padding can sit anywhere in the row.
    """
    if encoded.dim() != 4:
        raise ValueError(f"encoded must have shape [B, L, T, D], got {list(encoded.shape)}.")
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots={num_slots!r} must be a positive integer (config.stm_size).")
    batch, _, length, _ = encoded.shape
    device = encoded.device
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, expected [B={batch}, T={length}]."
            )
        valid = attention_mask.to(device).bool()
    count = valid.sum(-1, keepdim=True)  # [B, 1]
    rank = valid.long().cumsum(-1) - 1  # [B, T] index of each valid position among the valid ones
    slots = torch.arange(num_slots, device=device)[None]  # [1, S]
    start = (slots * count) // num_slots  # [B, S]
    pooled_end = ((slots + 1) * count + num_slots - 1) // num_slots  # ceil
    end = torch.where(count >= num_slots, pooled_end, start + 1)  # [B, S]
    member = (
        valid[:, None, :]
        & (rank[:, None, :] >= start[:, :, None])
        & (rank[:, None, :] < end[:, :, None])
    )  # [B, S, T]
    weights = member.to(encoded.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("bst,bltd->blsd", weights, encoded)


def memory_attention_labels(
    stm: torch.Tensor,  # [B, L, S, D] the memory before this interaction
    encoded_slots: torch.Tensor,  # [B, L, S, D] the new interaction mapped to slots
    new_data_weight: float | torch.Tensor,  # scalar or [B]
) -> torch.Tensor:  # [B, L, S, D]
    """The stage 3 target ``w * E + (1 - w) * STM`` (no gradient flows into it)."""
    if stm.shape != encoded_slots.shape:
        raise ValueError(
            f"stm {list(stm.shape)} and encoded_slots {list(encoded_slots.shape)} must have the same shape "
            "[B, L, S, D]; map the encoded positions with pool_encoded_to_slots first."
        )
    weight = torch.as_tensor(new_data_weight, dtype=stm.dtype, device=stm.device)
    if weight.dim() == 1:
        weight = weight.view(-1, 1, 1, 1)
    elif weight.dim() != 0:
        raise ValueError(f"new_data_weight must be a float or a [B] tensor, got shape {list(weight.shape)}.")
    return (weight * encoded_slots + (1 - weight) * stm).detach()


def new_data_weight_schedule(
    step_index: int,
    generator: torch.Generator | None = None,
    *,
    first_step_new_data_weight: float = 0.9,
    step_decay_start: float = 0.5,
    step_decay: float = 0.05,
    min_new_data_weight: float = 0.05,
    weight_jitter: float = 0.15,
) -> float:
    """Weight of the new encoded data in the label of turn ``step_index`` (0-based) of a conversation.

    Turn 0 writes into a fresh memory: ``first_step_new_data_weight`` (0.9). Follow-up turn ``k >= 1``:
    ``step_decay_start - (k - 1) * step_decay`` (0.5, 0.45, 0.40, ... as the seed's "50% - step * 5%"
    with the follow-up steps counted from 0). A uniform jitter in ``[-weight_jitter, +weight_jitter]`` is
    added (drawn from ``generator`` when given, so a seeded run is reproducible; ``weight_jitter=0`` gives
    the plain schedule), and the result is clamped to ``[min_new_data_weight, 1]``.
    """
    if step_index < 0:
        raise ValueError(f"step_index={step_index} must be >= 0.")
    if step_index == 0:
        weight = first_step_new_data_weight
    else:
        weight = step_decay_start - (step_index - 1) * step_decay
    if weight_jitter > 0:
        device = generator.device if generator is not None else "cpu"
        u = torch.rand((), generator=generator, device=device).item()
        weight = weight + (2.0 * u - 1.0) * weight_jitter
    return float(min(1.0, max(min_new_data_weight, weight)))


def _relative_noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` plus Gaussian noise whose std is ``std`` times the RMS of ``x`` (scale-free, like the cosine)."""
    if std <= 0:
        return x
    scale = x.detach().pow(2).mean().sqrt().clamp(min=1e-6)
    noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device)
    return x + noise.to(device=x.device, dtype=x.dtype) * (std * scale)


# --------------------------------------------------------------------------------------------
# Config and trainer
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryAttentionConfig(RxTTrainingArguments):
    """Stage 3 hyper-parameters on top of :class:`~trainers.trainer_base.RxTTrainingArguments`."""

    first_step_new_data_weight: float = field(
        default=0.9, metadata={"help": "Weight of the new encoded data in the label of a conversation's first turn."}
    )
    step_decay_start: float = field(
        default=0.5, metadata={"help": "New-data weight of the second turn; later turns subtract step_decay each."}
    )
    step_decay: float = field(default=0.05, metadata={"help": "Decay of the new-data weight per follow-up turn."})
    min_new_data_weight: float = field(
        default=0.05, metadata={"help": "Lower clamp of the new-data weight (after jitter)."}
    )
    weight_jitter: float = field(
        default=0.15, metadata={"help": "Uniform random jitter (+-) added to the new-data weight at each turn."}
    )
    input_noise_std: float = field(
        default=0.1,
        metadata={"help": "Gaussian noise on the memory attention inputs (old STM and encoded states), as a "
                          "fraction of each tensor's RMS. 0 disables."},
    )
    label_noise_std: float = field(
        default=0.1, metadata={"help": "Gaussian noise on the labels, as a fraction of their RMS. 0 disables."}
    )
    initial_stm_noise_std: float = field(
        default=0.0,
        metadata={"help": "Std of Gaussian noise added to the fresh memory (init_memory) at the start of each "
                          "conversation; 0 uses the model's initial STM as is."},
    )
    detach_between_turns: bool = field(
        default=True,
        metadata={"help": "Detach the new STM before the next turn (no back-propagation through turns)."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("first_step_new_data_weight", "step_decay_start", "min_new_data_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1].")
        for name in ("step_decay", "weight_jitter", "input_noise_std", "label_noise_std", "initial_stm_noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0.")


class MemoryAttentionObjective(RxTStageModule):
    """The stage 3 module: the RxT model (only its memory attention trains); ``forward(batch)`` is the negative
    cosine between the new STM and the self-supervised label, see :class:`MemoryAttentionTrainer`."""

    # --- schedule and labels bound to the config --------------------------------------------------------

    def new_data_weight_schedule(self, step_index: int, generator: torch.Generator | None = None) -> float:
        """:func:`new_data_weight_schedule` with the stage's hyper-parameters (jitter from ``generator``, default
        ``self.generator``, which the trainer re-seeds from ``(seed, process, step, micro-batch)`` before every
        forward, so a resumed run draws the same jitter and noise)."""
        a = self.args
        return new_data_weight_schedule(
            step_index,
            self.generator if generator is None else generator,
            first_step_new_data_weight=a.first_step_new_data_weight,
            step_decay_start=a.step_decay_start,
            step_decay=a.step_decay,
            min_new_data_weight=a.min_new_data_weight,
            weight_jitter=a.weight_jitter,
        )

    def memory_attention_labels(self, stm, encoded_slots, new_data_weight):
        """:func:`memory_attention_labels` (kept as a method so subclasses can change the target)."""
        return memory_attention_labels(stm, encoded_slots, new_data_weight)

    # --- loss ---------------------------------------------------------------------------------------------

    # --- loss ---------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> StageOutput:
        backbone = self.model.model
        a = self.args
        training = self.model.training
        input_ids = batch["input_ids"]  # [B, N, T]
        attention_mask = batch.get("attention_mask")  # [B, N, T]
        if input_ids.dim() != 3:
            raise ValueError(
                f"MemoryAttentionTrainer needs multi-turn batches input_ids [B, N, T], got {list(input_ids.shape)}; "
                "use trainers.data.ConversationCollator."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size, num_turns, _ = input_ids.shape
        turn_mask = batch.get("turn_mask")  # [B, N]
        if turn_mask is None:
            turn_mask = attention_mask.sum(-1) > 0
        turn_mask = turn_mask.bool()
        num_slots = backbone.config.stm_size
        generator = self.generator if training else None
        input_noise = a.input_noise_std if training else 0.0
        label_noise = a.label_noise_std if training else 0.0

        stm = backbone.init_memory(batch_size)  # [B, L, S, D]
        if a.initial_stm_noise_std > 0 and training:
            noise = torch.randn(stm.shape, generator=generator, device=generator.device if generator is not None else "cpu")
            noise = noise.to(device=stm.device, dtype=stm.dtype)
            stm = stm + a.initial_stm_noise_std * noise

        cos_sum = stm.new_zeros(())
        rows_total = 0
        metrics: dict[str, float] = {}
        norms = []
        tokens = 0
        for k in range(num_turns):
            rows = turn_mask[:, k]  # [B]
            n_rows = int(rows.sum())
            if n_rows == 0:
                continue
            ids_k, mask_k = input_ids[:, k], attention_mask[:, k]  # [B, T]
            tokens += int(mask_k[rows].sum())
            with torch.no_grad():
                encoded = backbone.encode(ids_k, mask_k).layer_states  # [B, L, T, D]
            if training:
                weight = self.new_data_weight_schedule(k, generator)
            else:  # evaluation: the plain schedule, no randomness
                weight = new_data_weight_schedule(
                    k,
                    first_step_new_data_weight=a.first_step_new_data_weight,
                    step_decay_start=a.step_decay_start,
                    step_decay=a.step_decay,
                    min_new_data_weight=a.min_new_data_weight,
                    weight_jitter=0.0,
                )
            slots = pool_encoded_to_slots(encoded, mask_k, num_slots)  # [B, L, S, D]
            label = _relative_noise(self.memory_attention_labels(stm.detach(), slots, weight), label_noise, generator)
            new_stm = backbone.memory_attention(
                _relative_noise(stm, input_noise, generator),
                _relative_noise(encoded, input_noise, generator),
                mask_k,
            )  # [B, L, S, D]
            cos = F.cosine_similarity(new_stm.float(), label.float(), dim=-1)  # [B, L, S]
            cos_rows = cos.mean(dim=(1, 2))  # [B]
            turn_sum = torch.where(rows, cos_rows, torch.zeros_like(cos_rows)).sum()
            cos_sum = cos_sum + turn_sum
            rows_total += n_rows
            metrics[f"cosine_turn_{k}"] = float(turn_sum.detach()) / n_rows
            metrics[f"new_data_weight_turn_{k}"] = weight
            norms.append(new_stm.detach()[rows].float().pow(2).mean(-1).sqrt().mean())
            new_stm = torch.where(rows[:, None, None, None], new_stm, stm)  # keep old memory on missing turns
            stm = new_stm.detach() if a.detach_between_turns else new_stm

        if rows_total == 0:
            # No valid turn at all: a zero loss that still touches the graph of trainable parameters.
            loss = sum(p.sum() * 0.0 for p in backbone.memory_attention.parameters())
            return StageOutput(loss, {"loss": 0.0, "cosine": 0.0}, 0)
        cosine = cos_sum / rows_total
        loss = -cosine
        metrics.update(
            loss=float(loss.detach()),
            cosine=float(cosine.detach()),
            stm_norm=float(torch.stack(norms).mean()),
        )
        return StageOutput(loss, metrics, tokens)


class MemoryAttentionTrainer(RxTStageTrainer):
    """Stage 3 trainer: self-supervised memory attention pre-training (only memory attention learns).

    For each conversation of a ``[B, N, T]`` batch (``ConversationCollator``) the memory starts fresh; for each
    turn ``k`` present (``turn_mask``) the frozen encoder encodes the interaction (no gradient), the memory
    attention writes ``new_stm = MemAttn(stm + noise, encoded + noise)``, and the loss is
    ``-cos(new_stm, w_k * E_k + (1 - w_k) * stm + noise)`` averaged over the valid rows, layers and slots,
    where ``E_k`` is the interaction mapped to the slots by :func:`pool_encoded_to_slots` and ``w_k`` follows
    :func:`new_data_weight_schedule`. ``new_stm`` (detached by default) is the memory of turn ``k + 1``.

    Everything except ``model.model.memory_attention`` is frozen when the trainer is built. The stage module is
    :class:`MemoryAttentionObjective`; the default collator a ``ConversationCollator`` of ``processing_class``.

    Example:

    ```python
    >>> import tempfile
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
    >>> from rxt_hf.trainers.data import ConversationCollator
    >>> from rxt_hf.trainers.synthetic_data import build_synthetic_dataset
    >>> from rxt_hf.trainers.memory_attention_trainer import MemoryAttentionConfig, MemoryAttentionTrainer
    >>> data = build_synthetic_dataset("multi-turn", num_conversations=20, num_turns=3, seed=0)
    >>> texts = [r["query"] + " " + r["answer"] for r in data["train"]]
    >>> tokenizer = build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=64)
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))
    >>> args = MemoryAttentionConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
    ...                              max_length=64, report_to="none", disable_tqdm=True)
    >>> trainer = MemoryAttentionTrainer(model, args, train_dataset=data["train"], processing_class=tokenizer,
    ...                                  data_collator=ConversationCollator(tokenizer, max_length=64))
    >>> metrics = trainer.train().metrics
    >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[0].startswith("model.memory_attention")
    True

    ```
    """

    args_class = MemoryAttentionConfig
    stage_name = "memory-attention"

    def __init__(self, model, args: MemoryAttentionConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if not isinstance(args, MemoryAttentionConfig):
            raise TypeError(
                f"args must be a MemoryAttentionConfig, got {type(args).__name__}; build one with "
                "MemoryAttentionConfig(output_dir=..., ...)."
            )
        # Freeze before the optimizer is built and before a distributed wrapper registers the parameters.
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("model.memory_attention."))
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)

    def build_stage_module(self, model, args: MemoryAttentionConfig) -> MemoryAttentionObjective:
        return MemoryAttentionObjective(model, args)

    def default_data_collator(self, args, processing_class, train_dataset):
        from .data import ConversationCollator

        return None if processing_class is None else ConversationCollator(processing_class, max_length=args.max_length)


