"""Stages 1 and 2 of the RxT curriculum: joint encoder (MLM) + decoder (autoregressive) training.

One sequence feeds both components. The encoder reads it with BERT-style masking and learns masked-language
modelling through a training-only head ([`RxTMLMHead`]). The decoder reads the same (unmasked) sequence
causally while its memory cross-attention reads the *detached* per-layer encoder states of the masked
sequence as if they were the STM (`[B, L, T, D]`: one memory slot per encoder position), optionally with
Gaussian noise and slot dropout so it does not learn to copy. This aligns the vector spaces of encoder and
decoder before any memory is trained; the detach keeps the decoder's loss from shaping the encoder.

- `mode="pretraining"` (stage 1): plain text, decoder loss on every token (`TextCollator`);
- `mode="sft"` (stage 2): single interactions `[BOS][Q] query [A] answer [EOS]`, decoder loss on the answer
  tokens only (`InteractionCollator`; its `loss_weights`, e.g. recall answers x3, are honoured).

[`JointLMObjective`] is the stage module (its `forward(batch)` returns the loss), [`JointLMTrainer`] the
`transformers.Trainer` that trains it ([`~trainers.trainer_base.RxTStageTrainer`]); multi-GPU, FSDP and DeepSpeed
need no code change (see `trainers.trainer_base`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .mlm_head import MLM_HEAD_FILE, RxTMLMHead, mask_tokens, mlm_loss
from .trainer_base import RxTStageModule, RxTStageTrainer, RxTTrainingArguments, StageOutput

JOINT_LM_MODES = ("pretraining", "sft")


@dataclass
class JointLMConfig(RxTTrainingArguments):
    """[`RxTTrainingArguments`] plus the joint LM loss settings of stages 1-2."""

    mode: str = field(
        default="pretraining",
        metadata={"help": "'pretraining' (decoder loss on every token) | 'sft' (decoder loss on answer tokens)."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens selected for MLM."})
    mlm_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the encoder MLM loss."})
    decoder_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the decoder LM loss."})
    memory_noise_std: float = field(
        default=0.0, metadata={"help": "Std of Gaussian noise added to the detached encoder states the decoder reads."}
    )
    memory_slot_dropout: float = field(
        default=0.0,
        metadata={"help": "Probability of hiding each encoder position from the decoder's memory cross-attention."},
    )
    save_mlm_head: bool = field(
        default=True, metadata={"help": "save_model also writes mlm_head.safetensors next to the model."}
    )

    def __post_init__(self):
        def fail(name, value, fix):
            raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: {fix}")

        if self.mode not in JOINT_LM_MODES:
            fail("mode", self.mode, f"choose one of {JOINT_LM_MODES}.")
        for name in ("mlm_probability", "memory_slot_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                fail(name, value, "it must be a number in [0, 1).")
        for name in ("mlm_loss_weight", "decoder_loss_weight", "memory_noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                fail(name, value, "it must be a number >= 0.")
        if self.mlm_loss_weight == 0 and self.decoder_loss_weight == 0:
            fail("decoder_loss_weight", 0, "mlm_loss_weight and decoder_loss_weight cannot both be 0.")
        if not isinstance(self.save_mlm_head, bool):
            fail("save_mlm_head", self.save_mlm_head, "it must be True or False.")
        super().__post_init__()


class JointLMObjective(RxTStageModule):
    """The stage 1-2 module: the RxT model and the MLM head; `forward(batch)` is the joint loss.

    The encoder reads the BERT-masked sequence (MLM loss through the head); the decoder reads the unmasked
    sequence causally with the detached encoder layer states as its memory (noised and slot-dropped as the args
    say); loss = `mlm_loss_weight` x MLM + `decoder_loss_weight` x decoder CE (weighted by `loss_weights` when the
    collator gives them) + the MoE router auxiliary loss.
    """

    def __init__(self, model: nn.Module, args: JointLMConfig, mlm_head: RxTMLMHead):
        super().__init__(model, args)
        self.mlm_head = mlm_head
        config = model.config
        if config.mask_token_id is None:
            raise ValueError("model.config.mask_token_id is None; set it from the tokenizer (special_token_ids).")
        self._special_ids = [getattr(config, name) for name in config.special_token_fields()]

    def forward(self, batch: dict) -> StageOutput:
        args, config = self.args, self.model.config
        input_ids = batch["input_ids"]  # [B, T]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        backbone = self.model.model

        # encoder: MLM on masked ids
        masked_ids, mlm_labels = mask_tokens(
            input_ids,
            attention_mask,
            config.mask_token_id,
            config.vocab_size,
            self._special_ids,
            probability=args.mlm_probability,
            generator=self.generator,
        )
        encoded = backbone.encode(masked_ids, attention_mask)
        encoder_loss = mlm_loss(self.mlm_head(encoded.last_hidden_state), mlm_labels)

        # decoder: reads the detached encoder layer states as memory [B, L, T, D]
        memory = encoded.layer_states.detach()
        if args.memory_noise_std > 0:
            noise = torch.randn(memory.shape, generator=self.generator, device=self.random_device(memory))
            memory = memory + args.memory_noise_std * noise.to(memory.device, memory.dtype)
        memory_mask = attention_mask.bool()
        if args.memory_slot_dropout > 0:
            keep = torch.rand(memory_mask.shape, generator=self.generator, device=self.random_device(memory))
            dropped = memory_mask & (keep.to(memory_mask.device) >= args.memory_slot_dropout)
            # never hide every slot of a row
            memory_mask = torch.where(dropped.any(-1, keepdim=True), dropped, memory_mask)
        decoded = backbone.decode(
            memory,
            input_ids=input_ids,
            attention_mask=attention_mask,
            memory_attention_mask=memory_mask.long(),
        )
        logits = self.model.lm_head(decoded.last_hidden_state)  # [B, T, V]
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        valid = shift_labels != -100
        token_loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(shift_labels.shape)
        weights = batch.get("loss_weights")
        weights = valid.float() if weights is None else weights[:, 1:].float() * valid.float()
        decoder_loss = (token_loss * weights).sum() / weights.sum().clamp(min=1e-8)
        if not bool(valid.any()):
            decoder_loss = shift_logits.sum() * 0.0
        aux = decoded.router_aux_loss
        aux = aux if aux is not None else decoder_loss.new_zeros(())
        aux_coef = config.router_aux_loss_coef if config.decoder_feed_forward == "moe" else 0.0

        loss = args.mlm_loss_weight * encoder_loss + args.decoder_loss_weight * decoder_loss + aux_coef * aux
        with torch.no_grad():
            correct = ((shift_logits.argmax(-1) == shift_labels) & valid).sum()
            accuracy = correct.float() / valid.sum().clamp(min=1)
        metrics = {
            "mlm_loss": encoder_loss.detach().float().item(),
            "decoder_loss": decoder_loss.detach().float().item(),
            "aux_loss": aux.detach().float().item(),
            "decoder_accuracy": accuracy.item(),
        }
        return StageOutput(loss, metrics, int(attention_mask.sum().item()))


class JointLMTrainer(RxTStageTrainer):
    """Joint LM pre-training (stage 1) and joint interaction SFT (stage 2) of an RxT, on `transformers.Trainer`.

    The MLM head is `mlm_head`, else the one saved beside the model (`mlm_head.safetensors` in the folder it was
    loaded from), else a new one; it trains and is checkpointed with the model, and `save_rxt_model` writes it
    beside the model (`save_mlm_head`). The default collator: `TextCollator` for `mode="pretraining"` on a `text`
    column, else `InteractionCollator` (answer-only labels for `mode="sft"`).

    Example:

    ```python
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer, special_token_ids
    >>> from rxt_hf.trainers.joint_lm_trainer import JointLMConfig, JointLMTrainer
    >>> from rxt_hf.trainers.synthetic_data import build_synthetic_dataset
    >>> data = build_synthetic_dataset("interaction-sft", num_conversations=50)
    >>> tokenizer = build_tokenizer([r["query"] + " " + r["answer"] for r in data["train"]], vocab_size=512)
    >>> config = RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    >>> model = RxTForCausalLM(config)
    >>> args = JointLMConfig(output_dir="/tmp/rxt-sft", mode="sft", max_steps=5, per_device_train_batch_size=8,
    ...                      max_length=64, report_to="none", disable_tqdm=True)
    >>> trainer = JointLMTrainer(model, args, train_dataset=data["train"], eval_dataset=data["validation"],
    ...                          processing_class=tokenizer)
    >>> metrics = trainer.train().metrics
    >>> path = trainer.save_rxt_model()  # model.safetensors, tokenizer, README.md card, mlm_head.safetensors
    ```
    """

    args_class = JointLMConfig
    stage_name = "joint-lm-pretraining"

    def __init__(self, model: nn.Module, args: JointLMConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, mlm_head: RxTMLMHead | None = None, **kwargs):
        args = args if args is not None else JointLMConfig()
        if isinstance(args, JointLMConfig):
            self.stage_name = "joint-sft" if args.mode == "sft" else "joint-lm-pretraining"
        self._given_mlm_head = mlm_head
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)

    def build_stage_module(self, model: nn.Module, args: JointLMConfig) -> JointLMObjective:
        head = self._given_mlm_head
        if head is None:
            source = getattr(getattr(model, "config", None), "name_or_path", None)
            try:
                head = RxTMLMHead.from_directory(source, model.config) if source else None
            except ValueError:
                head = None
        head = head if head is not None else RxTMLMHead(model.config)
        head.to(next(model.parameters()).device)
        return JointLMObjective(model, args, head)

    @property
    def mlm_head(self) -> RxTMLMHead:
        return self.stage_module.mlm_head

    def default_data_collator(self, args, processing_class, train_dataset):
        from .data import InteractionCollator, TextCollator

        if processing_class is None:
            return None
        columns = getattr(train_dataset, "column_names", None)
        if columns is None and len(train_dataset) > 0:
            columns = list(train_dataset[0])
        if args.mode == "pretraining" and "text" in set(columns or []):
            return TextCollator(processing_class, max_length=args.max_length)
        return InteractionCollator(processing_class, max_length=args.max_length, answer_only_loss=args.mode == "sft")

    def save_extra_modules(self, output_dir: str) -> None:
        if self.args.save_mlm_head:
            self.mlm_head.save(output_dir)


__all__ = ["JointLMConfig", "JointLMObjective", "JointLMTrainer", "JOINT_LM_MODES", "MLM_HEAD_FILE"]
