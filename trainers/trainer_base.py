"""The one base of the RxT stage trainers.

[`RxTStageMixin`] is what every curriculum stage adds to a `transformers.Trainer`, on both stacks (stages 1-4 below,
MRL and RxRLHF on TRL): the stage history (`rxt_training_history.json`), the model card, `log.jsonl`
([`LogFileCallback`]) and the saved RxT model folder (`save_rxt_model`).

Stages 1-4 are [`RxTStageTrainer`] subclasses, TRL style: an args class (a subclass of [`RxTTrainingArguments`],
itself `transformers.TrainingArguments` with one vocabulary for every stage) and a trainer that builds the stage's
training wrapper, an [`RxTStageModule`] whose `forward(batch)` returns the loss ([`StageOutput`]). An RxT stage
does not call `model(**batch)`: it drives the encoder, the decoder and the memory attention itself and may train
extra modules (the MLM head of stage 1). The wrapper holds the model and those modules, so `transformers.Trainer`
treats the stage as one module: its data loader and seeded sampler, optimizer and weight-decay groups, scheduler,
gradient accumulation and clipping, mixed precision, trackers, `checkpoint-N` checkpoints with rotation and
`train(resume_from_checkpoint=...)`, DDP / FSDP / DeepSpeed all apply unchanged.

Distributed training is configuration only
------------------------------------------
The same script runs on one CPU, several CPU processes, several GPUs, FSDP or DeepSpeed:

```bash
# 2 CPU processes (gloo), e.g. to test the distributed path on a laptop. `accelerate launch --cpu
# --num_processes 2` needs mpirun for multi-CPU; without MPI use torchrun (what `--multi_gpu` wraps):
ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py
# all GPUs of a machine (DDP)
accelerate launch --multi_gpu --num_processes 8 train.py
# FSDP or DeepSpeed: answer the questions once, then launch as usual
accelerate config
accelerate launch train.py
```

`per_device_train_batch_size` is per process: the effective batch is `per_device_train_batch_size *
num_processes * gradient_accumulation_steps`; `max_steps` counts optimizer steps. DDP runs with
`ddp_find_unused_parameters=True`: the memory attention gets no gradient in stages 1-2, the components stage 4
has not unfrozen yet get none, nor do MoE experts no token was routed to. Parameters a stage never trains are
frozen before the trainer is built (stage 3); parameters a schedule unfreezes later stay trainable until the
optimizer and the distributed wrapper exist and are frozen per step (`on_step_begin`, stage 4).

Reproducibility and resume
--------------------------
The data order is transformers' seeded sampler (stage 4: the turn curriculum, a pure function of the step).
Randomness inside a step (MLM masking, memory noise, slot dropout, label jitter) comes from the stage module's
`generator`, re-seeded from `(seed, process index, optimizer step, micro-batch)` before every forward. A
`checkpoint-N` holds the stage module's weights (model and training-only modules), optimizer, scheduler, RNG states
and trainer state; `train(resume_from_checkpoint=...)` restores them and skips the batches already consumed, so the
resumed run reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_NAME

HISTORY_FILE = "rxt_training_history.json"


def load_training_history(path: str | os.PathLike | None) -> list[dict]:
    """The stage history stored in a saved model folder (`rxt_training_history.json`), or []."""
    if not path:
        return []
    file = Path(path) / HISTORY_FILE
    if not file.is_file():
        return []
    try:
        history = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); delete or fix it.") from error
    if not isinstance(history, list):
        raise ValueError(f"{file} must hold a JSON list of stage entries, got {type(history).__name__}.")
    return history


# ------------------------------------------------------------------------------------------------------
# what every stage trainer shares (stages 1-4 below, MRL and RxRLHF on TRL): the stage record, log.jsonl, the folder


LOG_FILE = "log.jsonl"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class LogFileCallback(TrainerCallback):
    """Appends every logged record to ``output_dir/log.jsonl`` (main process), one JSON object a line with its
    ``step``; the end-of-training summary (the record with ``train_loss``) is marked ``"final": true``. When a run
    starts (or resumes at step N) the records of later steps left by an earlier run are dropped first, so the file
    holds each step once. ``rxt train`` draws the stages' curves from these files (``recipes/plots.py``)."""

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / LOG_FILE
        if not state.is_world_process_zero or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= state.global_step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {**logs, "step": state.global_step}
        if "train_loss" in logs:
            record["final"] = True
        path = Path(args.output_dir) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


class RxTStageMixin:
    """What turns a ``transformers.Trainer`` (or a TRL trainer) into a curriculum stage; put it first in the bases.

    A stage leaves a folder the next stage and the model card build on: the (merged) weights, the tokenizer,
    ``rxt_training_history.json`` (the previous stages' entries + this one), the RxT model card and ``log.jsonl``.
    :meth:`save_rxt_model` writes it; :meth:`train` adds the :class:`LogFileCallback`.

    The trainer sets ``stage_name`` and calls :meth:`start_stage_record` in ``__init__``; its args have
    ``summary()`` (the hyper-parameters recorded in the history). Hooks: :meth:`stage_config`,
    :meth:`data_description`, :meth:`save_extra_modules` (training-only modules saved beside the model),
    :attr:`rxt_model` (the model to save) and ``rxt_state_dict_prefix`` (its key prefix in the trained module).
    Tokens seen: transformers' ``state.num_input_tokens_seen``.
    """

    stage_name = "stage"
    rxt_state_dict_prefix = ""

    def start_stage_record(self, uses_peft: bool = False) -> None:
        self._run_id = uuid.uuid4().hex[:12]
        self._started = time.time()
        self._uses_peft = bool(uses_peft)

    def refuse_data_parallel(self) -> None:
        """The rollout / conversation stages keep per-row STMs that ``nn.DataParallel`` cannot split: one GPU per
        process only."""
        if self.args.n_gpu > 1:
            raise ValueError(f"{type(self).__name__} does not run under nn.DataParallel (several GPUs in one process); "
                             "launch with torchrun / accelerate launch, or make one GPU visible (CUDA_VISIBLE_DEVICES).")

    @property
    def rxt_model(self):
        """The RxT model this stage trains (unwrapped from DDP / FSDP; a PEFT model as such)."""
        return self.accelerator.unwrap_model(self.model)

    def stage_config(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the stage history and the model card."""
        return self.args.summary()

    def data_description(self) -> str | None:
        return None

    def save_extra_modules(self, output_dir: str) -> None:
        """Hook: save training-only modules next to the model (stage 1-2 writes ``mlm_head.safetensors``)."""

    def history_entry(self) -> dict[str, Any]:
        """This stage's entry in ``rxt_training_history.json`` (the model card's curriculum table)."""
        runtime = next((r["train_runtime"] for r in reversed(self.state.log_history) if "train_runtime" in r), None)
        loss = next((r["loss"] for r in reversed(self.state.log_history) if "loss" in r), None)
        tokens = self.state.num_input_tokens_seen or None
        args = self.args
        return {
            "stage": self.stage_name,
            "trainer": type(self).__name__,
            "run_id": self._run_id,
            "steps": self.state.global_step,
            "num_processes": self.accelerator.num_processes,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "tokens_seen": tokens,
            "train_runtime_s": round(float(runtime if runtime is not None else time.time() - self._started), 1),
            "final_loss": loss,
            "config": {**self.stage_config(), "peft": self._uses_peft},
        }

    def train(self, *args, **kwargs):
        if not any(isinstance(callback, LogFileCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(LogFileCallback())
        return super().train(*args, **kwargs)

    def save_rxt_model(self, output_dir: str | None = None, evaluation: dict | None = None,
                       data_description: str | None = None) -> str:
        """Save a complete RxT model folder: weights (LoRA adapters merged into a copy of the model), tokenizer,
        ``rxt_training_history.json`` (the previous stages + this one), the README model card, ``log.jsonl`` and
        the stage's extra modules. The folder loads with ``RxTForCausalLM.from_pretrained`` /
        ``AutoModelForCausalLM`` (``trust_remote_code=True``) and is the starting point of a later stage. Returns
        the folder. Every process must call it (the main process writes)."""
        from .model_card import write_model_card

        output_dir = str(output_dir or self.args.output_dir)
        trained = self.rxt_model
        model = copy.deepcopy(trained).merge_and_unload() if is_peft_model(trained) else trained
        state_dict = None
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if sharded and model is trained:
            full = self.accelerator.get_state_dict(self.model_wrapped)  # a collective: all processes take part
            prefix = self.rxt_state_dict_prefix
            state_dict = {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}
        previous = getattr(trained, "rxt_training_history", None)
        if previous is None:
            previous = load_training_history(getattr(model.config, "name_or_path", None))
        history = [e for e in previous if e.get("run_id") != self._run_id] + [self.history_entry()]
        if self.accelerator.is_main_process:
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            (folder / HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str), encoding="utf-8")
            self.save_extra_modules(output_dir)
            log = Path(self.args.output_dir) / LOG_FILE
            if log.is_file():
                if log.resolve() != (folder / LOG_FILE).resolve():
                    shutil.copyfile(log, folder / LOG_FILE)
            else:  # trained without `train()` of this class: the records the trainer kept
                lines = [json.dumps(record, default=str) for record in self.state.log_history]
                (folder / LOG_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            write_model_card(model, output_dir, stage_history=history, evaluation=evaluation,
                             data_description=data_description or self.data_description())
        trained.rxt_training_history = history  # a later stage in this process continues this history
        self.accelerator.wait_for_everyone()
        return output_dir


# ------------------------------------------------------------------------------------------------------
# stages 1-4: transformers.Trainer with a stage module whose forward(batch) returns the loss


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


# The TrainingArguments fields recorded in the stage history next to every field a stage's args add.
SUMMARY_FIELDS = (
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "bf16", "seed",
)


@dataclass
class RxTTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] of the supervised RxT stages (1-4): transformers' own vocabulary, with
    the defaults of a short curriculum stage, plus `max_length`. Every stage's args subclass it.

    Changed defaults: `max_steps=100` (a stage runs by optimizer steps), `per_device_train_batch_size=16`,
    `learning_rate=1e-3`, `weight_decay=0.01`, `adam_beta2=0.95`, `warmup_steps=0.05` (5% of the steps),
    `lr_scheduler_type="cosine_with_min_lr"` decaying to 10% (`lr_scheduler_kwargs={"min_lr_rate": 0.1}`),
    `logging_steps=10`, `seed=0`, `report_to` TensorBoard when installed, `bf16` on a CUDA device that supports
    it (pinned batches with CUDA), tokens counted without padding, the incomplete last batch dropped, every column
    kept (the stage module reads them), and `ddp_find_unused_parameters=True`.
    """

    output_dir: str | None = field(
        default="outputs/run", metadata={"help": "Where logs, checkpoints and the model go."}
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of the stage (> 0)."})
    max_time_minutes: float | None = field(
        default=None,
        metadata={"help": "Optional wall-clock budget in minutes: stop (and save a checkpoint) when reached."},
    )
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Examples per process per micro-batch (conversations in stages 3-4)."}
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Evaluation batch size per process; None: per_device_train_batch_size."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (transformers' grouping: none on biases and norms)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warmup: optimizer steps (>= 1) or a fraction of max_steps (< 1)."}
    )
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr",
        metadata={"help": "A transformers scheduler name; the default decays by a cosine to min_lr_rate x the peak."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Scheduler options; None: {'min_lr_rate': 0.1} for cosine_with_min_lr, else none."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log (and write log.jsonl) every N optimizer steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the model RNG, the data order and in-step randomness."})
    report_to: None | str | list[str] = field(
        default=None, metadata={"help": "Trackers; None: 'tensorboard' when installed, else 'none'."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; None: on a CUDA device that supports it."}
    )
    include_num_input_tokens_seen: str | bool = field(
        default="non_padding", metadata={"help": "Count the tokens trained on ('non_padding', 'all' or 'no')."}
    )
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the incomplete last batch of an epoch."})
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin the batches' memory; None: when CUDA is available."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every column: the stage module reads the batch itself."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=True,
        metadata={"help": "DDP find_unused_parameters. True: a stage's loss leaves parameters without a gradient "
                          "(the memory attention in stages 1-2, components frozen for part of stage 4, MoE experts "
                          "no token was routed to); DDP must not wait for them."},
    )
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per sequence (interaction)."})

    def __post_init__(self):
        def fail(name, value, fix):
            raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: {fix}")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail(name, value, "it must be a positive integer.")
        if self.per_device_eval_batch_size is not None and (
            not is_int(self.per_device_eval_batch_size) or self.per_device_eval_batch_size < 1
        ):
            fail("per_device_eval_batch_size", self.per_device_eval_batch_size, "a positive integer or None.")
        if not is_number(self.learning_rate) or self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            fail("learning_rate", self.learning_rate, "it must be a positive finite number (e.g. 1e-3).")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                fail(name, value, "it must be a number >= 0.")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                fail(name, value, "it must be a number in [0, 1).")
        if self.max_time_minutes is not None and (not is_number(self.max_time_minutes) or self.max_time_minutes <= 0):
            fail("max_time_minutes", self.max_time_minutes, "it must be a positive number of minutes or None.")
        if not is_number(self.logging_steps) or self.logging_steps <= 0:
            fail("logging_steps", self.logging_steps, "it must be a number > 0.")
        if self.save_steps is None or not is_number(self.save_steps) or self.save_steps <= 0:
            fail("save_steps", self.save_steps, "it must be a number > 0 (save_strategy='no' saves no checkpoint).")
        if not is_int(self.seed):
            fail("seed", self.seed, "it must be an integer.")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        scheduler = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        if self.lr_scheduler_kwargs is None and scheduler == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        if self.report_to is None:
            self.report_to = "tensorboard" if _tensorboard_installed() else "none"
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()

    def summary(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the stage history / model card: the common ones and every field the
        stage's args class adds."""
        own = {f.name for f in dataclasses.fields(RxTTrainingArguments)}
        names = list(SUMMARY_FIELDS) + ["max_length"] + [f.name for f in dataclasses.fields(self) if f.name not in own]
        out = {}
        for name in names:
            value = getattr(self, name)
            value = getattr(value, "value", value)  # enums (lr_scheduler_type) as their string
            if isinstance(value, (list, tuple)):  # JSON-friendly: tuples (curriculum entries) as lists
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[name] = value
        return out


class StageOutput(NamedTuple):
    """What a stage module's `forward(batch)` returns: the loss to back-propagate, scalar metrics to log (averaged
    over the logging window, prefixed `eval_` in evaluation) and the number of tokens processed."""

    loss: torch.Tensor
    metrics: dict[str, float]
    num_tokens: int


class RxTStageModule(nn.Module):
    """A stage's training wrapper: the RxT model (`self.model`), the stage's training-only modules and
    `forward(batch) -> StageOutput`.

    An RxT stage does not call `model(**batch)`: it drives the encoder, the decoder and the memory attention
    itself. The trainer hands this module to `transformers.Trainer`, so DDP / FSDP / DeepSpeed, autocast,
    checkpoints and the optimizer see the model and the training-only modules as one module whose forward
    computes the stage loss. Randomness inside a step comes from `self.generator`, which the trainer re-seeds
    before every forward from `(seed, process index, optimizer step, micro-batch)`, so a resumed run draws the same
    numbers.
    """

    def __init__(self, model: nn.Module, args: RxTTrainingArguments):
        super().__init__()
        self.model = model
        self.args = args
        self.generator: torch.Generator | None = None

    @property
    def _no_split_modules(self) -> list[str]:
        """The model's layer classes: the stage module is what FSDP wraps, and Accelerate's transformer auto-wrap
        policy without class names (`accelerate config`) wraps the classes the wrapped module lists here."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def random_device(self, tensor: torch.Tensor):
        """Where random numbers are drawn: the generator's device (CPU generators give the same draws anywhere)."""
        return self.generator.device if self.generator is not None else tensor.device

    def forward(self, batch: dict[str, Any]) -> StageOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> StageOutput.")


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `args.max_time_minutes` of wall-clock time have passed since `train()` began, with a
    checkpoint of the step reached; every process stops at the same step (the decision is all-reduced)."""

    def __init__(self):
        self.stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.stopped = time.time(), False

    def on_step_end(self, args, state, control, **kwargs):
        budget = getattr(args, "max_time_minutes", None)
        if budget is None or state.global_step >= state.max_steps:
            return
        over = time.time() - self.start >= budget * 60
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if over else 0.0], device=args.device)
            torch.distributed.all_reduce(flag)
            over = flag.item() > 0
        if over:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True


class _MetricWindow:
    """Running sums of the metrics a stage module returns, averaged when logged."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            value = value.detach().float().item() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: total / self.counts[key] for key, total in self.sums.items()}


class RxTStageTrainer(RxTStageMixin, Trainer):
    """`transformers.Trainer` for the supervised RxT stages (1-4). A subclass sets `args_class` and `stage_name`
    and implements `build_stage_module(model, args)` (an [`RxTStageModule`]); `default_data_collator` may build the
    collator from `processing_class` and the args.

    Everything else is transformers': the data loader and its seeded sampler, AdamW with its weight-decay groups,
    the scheduler (`cosine_with_min_lr` by default), gradient accumulation and clipping, mixed precision, logging
    and trackers, evaluation, `checkpoint-N` checkpoints with rotation (`save_total_limit`) and
    `train(resume_from_checkpoint=...)` (a path, or True for the newest checkpoint of `output_dir`), which restores
    the weights (of the model and the training-only modules), optimizer, scheduler, RNG states and the data
    position, so the resumed run reaches the same weights. Added: the stage metrics of the module (logged with
    the loss, and as `eval_*`), an evaluation at the end of `train()` when there is an `eval_dataset`, the
    `on_step_begin(step)` hook (SMAT unfreezing), a wall-clock budget (`max_time_minutes`, see `stopped_by`) and,
    from [`RxTStageMixin`], `save_rxt_model` (`save_model` does the same): the RxT model folder with tokenizer,
    stage history, model card and `log.jsonl`.

    `trainer.model` is the stage module; `trainer.rxt_model` the RxT model it trains.

    Distributed training is configuration only: the same script runs on one CPU, several processes
    (`torchrun --nproc_per_node 2 train.py`, `accelerate launch --multi_gpu ...`), FSDP or DeepSpeed
    (`accelerate config`, then `accelerate launch train.py`).
    """

    args_class: type = RxTTrainingArguments
    rxt_state_dict_prefix = "model."

    def __init__(
        self,
        model: nn.Module,
        args: RxTTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            args = self.args_class()
        if not isinstance(args, self.args_class):
            raise TypeError(
                f"args must be a {self.args_class.__name__}, got {type(args).__name__}; build it with "
                f"{self.args_class.__name__}(output_dir=...)."
            )
        if not isinstance(model, nn.Module) or isinstance(model, RxTStageModule):
            raise TypeError(f"model must be an RxTForCausalLM, got {type(model).__name__}.")
        if train_dataset is None:
            raise ValueError("train_dataset is required: pass a datasets.Dataset (see trainers.data.load_rxt_dataset).")
        self.start_stage_record(False)
        if data_collator is None:
            data_collator = self.default_data_collator(args, processing_class, train_dataset)
        if data_collator is None:
            raise ValueError(
                f"data_collator is None and {type(self).__name__} cannot build one without processing_class=<the "
                "RxT tokenizer>; pass either (e.g. data_collator=trainers.data.ConversationCollator(tokenizer, "
                "max_length))."
            )
        self._time_budget = TimeBudgetCallback()
        super().__init__(
            model=self.build_stage_module(model, args),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[self._time_budget, *(callbacks or [])],
            optimizers=optimizers,
        )
        self._step_in_progress = -1
        self._micro = 0
        self._train_metrics = _MetricWindow()
        self._eval_metrics = _MetricWindow()
        self._eval_batches = 0

    # --- hooks for the stages -----------------------------------------------------------------------

    def build_stage_module(self, model: nn.Module, args: RxTTrainingArguments) -> RxTStageModule:
        raise NotImplementedError(f"{type(self).__name__} must implement build_stage_module(model, args).")

    def default_data_collator(self, args, processing_class, train_dataset):
        """The collator when none is given (None: the caller must pass one)."""
        return None

    def on_step_begin(self, step: int) -> None:
        """Called once before each optimizer step; `step` = optimizer steps done so far (e.g. SMAT unfreezing)."""

    # --- the model ----------------------------------------------------------------------------------

    @property
    def stage_module(self) -> RxTStageModule:
        return self.accelerator.unwrap_model(self.model)

    @property
    def rxt_model(self):
        return self.stage_module.model

    @property
    def stopped_by(self) -> str:
        """Why the last `train()` ended: "max_steps" or "max_time_minutes"."""
        return "max_time_minutes" if self._time_budget.stopped else "max_steps"

    def seed_generator(self, step: int, micro: int) -> torch.Generator:
        """Seed the stage module's generator from `(seed, process index, step, micro-batch)` (step -1: evaluation)."""
        device = self.args.device
        generator = torch.Generator(device=device) if device.type != "cpu" else torch.Generator()
        key = self.args.seed * 1_000_003 + self.args.process_index * 100_003 + (step + 2) * 1_009 + micro * 31
        generator.manual_seed(key % (2**63 - 1))
        self.stage_module.generator = generator
        return generator

    # --- Trainer overrides --------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if step != self._step_in_progress:
            self._step_in_progress, self._micro = step, 0
            self.on_step_begin(step)
        self.seed_generator(step, self._micro)
        self._micro += 1
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = model(inputs)
        if model.training:
            self._train_metrics.add(output.metrics)
        return (output.loss, output) if return_outputs else output.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.seed_generator(-1, self._eval_batches)
        self._eval_batches += 1
        with torch.no_grad():
            output = model(inputs)
        self._eval_metrics.add(output.metrics)
        return output.loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_metrics, self._eval_batches = _MetricWindow(), 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=True, ignore_keys=ignore_keys,
                                         metric_key_prefix=metric_key_prefix)
        for key, value in self._eval_metrics.means().items():
            output.metrics.setdefault(f"{metric_key_prefix}_{key}", value)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training record: add the stage metrics of the window (this process's)
            for key, value in self._train_metrics.means().items():
                logs.setdefault(key, value)
            self._train_metrics = _MetricWindow()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, then an evaluation of `eval_dataset` (if any) unless the last step was just evaluated;
        its metrics are added to the returned `TrainOutput.metrics`."""
        self._step_in_progress = -1
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if self.eval_dataset is not None:
            last = next((r for r in reversed(self.state.log_history) if "eval_loss" in r), None)
            if last is None or last.get("step") != self.state.global_step:
                output.metrics.update(self.evaluate())
            else:
                output.metrics.update({k: v for k, v in last.items() if k.startswith("eval_")})
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """A checkpoint (`_internal_call`, from `save_steps`): the stage module's weights, model and
        training-only modules, as `model.safetensors` (tensors shared by a tied head stored once), which
        `train(resume_from_checkpoint=...)` loads back. Otherwise the RxT model folder (`save_rxt_model`)."""
        if not _internal_call:
            return self.save_rxt_model(output_dir)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = str(output_dir or self.args.output_dir)
        if self.args.should_save:
            import safetensors.torch

            os.makedirs(output_dir, exist_ok=True)
            safetensors.torch.save_model(self.stage_module, os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                                         metadata={"format": "pt"})
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        return None

    def data_description(self) -> str:
        name = getattr(self.train_dataset, "info", None)
        description = getattr(name, "description", "") if name is not None else ""
        text = f"{len(self.train_dataset)} training examples"
        columns = getattr(self.train_dataset, "column_names", None)
        if columns:
            text += f" (columns: {', '.join(columns)})"
        if self.eval_dataset is not None:
            text += f", {len(self.eval_dataset)} evaluation examples"
        return (description + "\n\n" if description else "") + text + "."


__all__ = [
    "HISTORY_FILE",
    "LOG_FILE",
    "LogFileCallback",
    "RxTStageMixin",
    "RxTStageModule",
    "RxTStageTrainer",
    "RxTTrainingArguments",
    "StageOutput",
    "is_peft_model",
    "load_training_history",
]
