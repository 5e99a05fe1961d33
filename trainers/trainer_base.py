"""The shared Accelerate training loop for the supervised RxT stages (1-4), and the stage mixin every stage shares.

[`RxTStageMixin`] (with [`LogFileCallback`]) is what every curriculum stage trainer built on `transformers.Trainer`
adds to it: the stage history, the model card, `log.jsonl` and the saved model folder (`save_rxt_model`).

Every stage trainer is a pair, TRL style: a typed config dataclass (a subclass of [`RxTTrainingConfig`]) and a
trainer class (a subclass of [`RxTTrainer`]) that implements one method, `compute_loss(batch)`. The base class
owns everything else: the data loader, AdamW with warmup + cosine decay, gradient accumulation and clipping,
mixed precision, the progress bar, trackers and the JSONL log, periodic evaluation, resumable checkpoints and
the final `save_pretrained` with a model card.

How it differs from `transformers.Trainer`: an RxT stage does not call `model(**batch)`. It drives the encoder,
the decoder and the memory attention separately (`model.model.encode`, `model.model.decode`,
`model.model.memory_attention`) and may train extra, training-only modules (the MLM head of stage 1). So the
model and those extras are wrapped in one small module whose `forward(fn, batch)` simply runs
`fn(batch)`; `accelerator.prepare` wraps *that* module, and the loop calls `compute_loss` through it. Whatever
`compute_loss` does with `self.model`, it runs inside the forward of the prepared wrapper, so DDP's gradient
synchronisation, FSDP's parameter gathering, DeepSpeed's engine and autocast all apply to it unchanged.

Distributed training is configuration only
------------------------------------------
The same script runs on one CPU, several CPU processes, several GPUs, FSDP or DeepSpeed; nothing in the code
changes, only the launcher:

```bash
# 2 CPU processes (gloo), e.g. to test the distributed path on a laptop. `accelerate launch --cpu
# --num_processes 2` needs mpirun for multi-CPU; without MPI use torchrun (what `--multi_gpu` wraps):
ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py
# all GPUs of a machine (DDP)
accelerate launch --multi_gpu --num_processes 8 train.py
# FSDP or DeepSpeed: answer the questions once, then launch as usual
accelerate config            # choose FSDP (auto-wrap policy TRANSFORMER_BASED_WRAP picks the RxT layers from
                             # `_no_split_modules`, use_orig_params=True) or DeepSpeed ZeRO-1/2/3
accelerate launch train.py   # reads ~/.cache/huggingface/accelerate/default_config.yaml
accelerate launch --config_file fsdp.yaml train.py   # or an explicit config file
```

`per_device_batch_size` is per process: the effective batch is `per_device_batch_size * num_processes *
gradient_accumulation_steps`; `max_steps` counts optimizer steps. Mixed precision `"auto"` picks bf16 on CUDA
devices that support it and full precision elsewhere. DDP runs with `find_unused_parameters=True` by default
(`ddp_find_unused_parameters`), because MoE experts that receive no token in a batch and the components a
stage does not use (the memory attention in stages 1-2) have no gradient. Trainers that freeze and later
unfreeze parts of the model (SMAT) must do it after construction (e.g. in `on_step_begin`), so DDP registers
every parameter when it wraps the model.

Reproducibility and resume
--------------------------
The data order comes from a sampler seeded with `seed` and the epoch number, identical on every process
(each process then takes its own shard). Randomness inside a step (MLM masking, memory noise, slot dropout)
should come from `self.generator`, re-seeded from `(seed, process index, optimizer step, micro-batch)` before
every `compute_loss`; it is therefore exactly reproducible after a resume. `save_steps` writes
`accelerator.save_state` checkpoints to `output_dir/checkpoints/step-N` (model + extra modules, optimizer,
scheduler, RNG states) and `resume_from_checkpoint` (a path or `"latest"`) restores them, sets the step
counter from the directory name and skips the batches the interrupted run had already consumed in the current
epoch, so the resumed run sees the same data in the same order and reaches the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_NAME

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16", "auto")
REPORT_TO_CHOICES = ("auto", "none", "tensorboard")
CHECKPOINTS_DIR = "checkpoints"
HISTORY_FILE = "rxt_training_history.json"
TRAINER_STATE_FILE = "rxt_trainer_state.json"


# ------------------------------------------------------------------------------------------------------
# config


@dataclass
class RxTTrainingConfig:
    """Hyper-parameters shared by every supervised RxT stage (typed, validated on construction)."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where logs, checkpoints and the model go."})
    max_steps: int = field(default=100, metadata={"help": "Number of optimizer steps to train for."})
    max_time_minutes: float | None = field(
        default=None,
        metadata={"help": "Optional wall-clock budget in minutes: stop (and save a checkpoint) when reached."},
    )
    per_device_batch_size: int = field(default=16, metadata={"help": "Examples per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not applied to norms, biases, embeddings, initial STM)."}
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW (beta1, beta2)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps; 0 means use warmup_ratio."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Warmup as a fraction of max_steps, used when warmup_steps == 0."}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay ends at learning_rate * min_lr_ratio."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "'no' | 'bf16' | 'fp16' | 'auto' (bf16 on CUDA when supported, else 'no')."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model RNG, the data order and in-step randomness."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (None: only at the end, if eval data)."}
    )
    save_steps: int | None = field(
        default=None,
        metadata={"help": "accelerator.save_state checkpoints every N steps under output_dir/checkpoints/step-N."},
    )
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per sequence (interaction)."})
    report_to: str = field(
        default="auto",
        metadata={
            "help": "'auto' (tensorboard if importable) | 'none' | 'tensorboard'; output_dir/log.jsonl is always "
            "written."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory (output_dir/checkpoints/step-N) or 'latest'."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    ddp_find_unused_parameters: bool = field(
        default=True,
        metadata={"help": "DDP find_unused_parameters (needed for MoE and for components a stage does not use)."},
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N step checkpoints (None: keep all)."}
    )

    def __post_init__(self):
        def fail(name, value, fix):
            raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: {fix}")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            fail("output_dir", self.output_dir, "give a non-empty directory path.")
        self.output_dir = str(self.output_dir)
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "max_length"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail(name, value, "it must be a positive integer.")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                fail(name, value, "it must be a positive integer or None.")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            fail("warmup_steps", self.warmup_steps, "it must be an integer >= 0.")
        if not is_int(self.seed):
            fail("seed", self.seed, "it must be an integer.")
        if self.max_time_minutes is not None and (not is_number(self.max_time_minutes) or self.max_time_minutes <= 0):
            fail("max_time_minutes", self.max_time_minutes, "it must be a positive number of minutes or None.")
        if not is_number(self.learning_rate) or self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            fail("learning_rate", self.learning_rate, "it must be a positive finite number (e.g. 1e-3).")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", self.weight_decay, "it must be a number >= 0.")
        if not is_number(self.max_grad_norm) or self.max_grad_norm < 0:
            fail("max_grad_norm", self.max_grad_norm, "it must be a number >= 0 (0 disables clipping).")
        for name in ("warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value <= 1:
                fail(name, value, "it must be a number in [0, 1].")
        betas = self.adam_betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in betas)
        ):
            fail("adam_betas", betas, "give two numbers in [0, 1), e.g. (0.9, 0.95).")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            fail("mixed_precision", self.mixed_precision, f"choose one of {MIXED_PRECISION_CHOICES}.")
        if self.report_to not in REPORT_TO_CHOICES:
            fail("report_to", self.report_to, f"choose one of {REPORT_TO_CHOICES}.")
        if self.report_to == "tensorboard" and not _tensorboard_available():
            fail("report_to", self.report_to, "tensorboard is not installed: pip install tensorboard, or use 'auto'.")
        if self.resume_from_checkpoint is not None and not isinstance(self.resume_from_checkpoint, (str, os.PathLike)):
            fail("resume_from_checkpoint", self.resume_from_checkpoint, "give a checkpoint directory or 'latest'.")
        for name in ("disable_tqdm", "ddp_find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "it must be True or False.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


# ------------------------------------------------------------------------------------------------------
# helpers


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of `range(num_samples)` drawn from a `torch.Generator` seeded by `(seed, epoch)`.

    The same on every process (Accelerate then shards the batches) and independent of the global RNG. The
    trainer sets `epoch` itself (the attribute, not `set_epoch`, so Accelerate's own epoch counter, which
    restarts from zero after a resume, cannot change it).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch * 7_919 + 12_345)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


class _TrainingModule(nn.Module):
    """The model plus training-only modules; `forward(fn, *args)` runs `fn(*args)` inside the (prepared) forward."""

    def __init__(self, model: nn.Module, extras: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(extras)

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def warmup_cosine_lambda(max_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LambdaLR factor: linear warmup from ~0 to 1, then cosine from 1 to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The `checkpoints/step-N` directory with the largest N under `output_dir`, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name))]
    return str(max(steps)[1]) if steps else None


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
    Tokens seen: the TRL stages' ``_total_train_tokens``, else transformers' ``state.num_input_tokens_seen``.
    """

    stage_name = "stage"
    rxt_state_dict_prefix = ""

    def start_stage_record(self, uses_peft: bool = False) -> None:
        self._run_id = uuid.uuid4().hex[:12]
        self._started = time.time()
        self._uses_peft = bool(uses_peft)

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
        tokens = getattr(self, "_total_train_tokens", None) or self.state.num_input_tokens_seen or None
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
        if (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)) and model is trained:
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

    output_dir: str | None = field(default="outputs/run", metadata={"help": "Where logs, checkpoints and the model go."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of the stage (> 0)."})
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
        if not is_number(self.logging_steps) or self.logging_steps <= 0:
            fail("logging_steps", self.logging_steps, "it must be a number > 0.")
        if self.save_steps is None or not is_number(self.save_steps) or self.save_steps <= 0:
            fail("save_steps", self.save_steps, "it must be a number > 0 (save_strategy='no' saves no checkpoint).")
        if not is_int(self.seed):
            fail("seed", self.seed, "it must be an integer.")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.lr_scheduler_kwargs is None and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) == (
            "cosine_with_min_lr"
        ):
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
            out[name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, (list, tuple)) else value
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

    def random_device(self, tensor: torch.Tensor):
        """Where random numbers are drawn: the generator's device (CPU generators give the same draws anywhere)."""
        return self.generator.device if self.generator is not None else tensor.device

    def forward(self, batch: dict[str, Any]) -> StageOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> StageOutput.")


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
    `on_step_begin(step)` hook (SMAT unfreezing) and, from [`RxTStageMixin`], `save_rxt_model` (`save_model`
    does the same): the RxT model folder with tokenizer, stage history, model card and `log.jsonl`.

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
        super().__init__(
            model=self.build_stage_module(model, args),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
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


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().item()
    return value


# ------------------------------------------------------------------------------------------------------
# trainer


class RxTTrainer:
    """Base Accelerate trainer of the RxT stages; subclasses implement `compute_loss`.

    Args:
        model: an `RxTForCausalLM`.
        args: an [`RxTTrainingConfig`] (or the subclass's `config_class`).
        train_dataset: a map-style dataset (e.g. `datasets.Dataset`) of examples the collator understands.
        eval_dataset: optional, same format; evaluated every `eval_steps` and at the end.
        tokenizer: saved next to the model; also used to build the default collator.
        data_collator: callable turning a list of examples into a batch dict of tensors; when None,
            `default_data_collator()` builds one.

    Subclasses that add training-only modules create them *before* calling `super().__init__` and return
    them from `extra_modules()`; they are optimised, moved to the device and checkpointed with the model.
    """

    config_class = RxTTrainingConfig
    stage_name = "base"

    def __init__(
        self,
        model: nn.Module,
        args: RxTTrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        tokenizer=None,
        data_collator=None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import (
            DistributedDataParallelKwargs,
            GradientAccumulationPlugin,
            ProjectConfiguration,
            set_seed,
        )

        if args is None:
            args = self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"args must be a {self.config_class.__name__}, got {type(args).__name__}; build it with "
                f"{self.config_class.__name__}(...)."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an RxTForCausalLM (nn.Module), got {type(model).__name__}.")
        if train_dataset is None:
            raise ValueError("train_dataset is required: pass a datasets.Dataset (see trainers.data.load_rxt_dataset).")
        self.args = args
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.run_id = uuid.uuid4().hex[:12]

        mixed_precision = args.mixed_precision
        if mixed_precision == "auto":
            mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        report_to = args.report_to
        if report_to == "auto":
            report_to = "tensorboard" if _tensorboard_available() else "none"
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            log_with=None if report_to == "none" else report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "runs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
            step_scheduler_with_optimizer=False,
            rng_types=[],
        )
        self._report_to = report_to
        set_seed(args.seed)

        self.data_collator = data_collator if data_collator is not None else self.default_data_collator()
        if self.data_collator is None:
            raise ValueError(
                f"data_collator is None and {type(self).__name__} has no default for this data; pass "
                "data_collator=trainers.data.InteractionCollator(tokenizer, max_length) (or TextCollator / "
                "ConversationCollator)."
            )

        self.model = model
        self._extras = dict(self.extra_modules())
        self._training_module = _TrainingModule(model, self._extras)

        self.sampler = EpochShuffleSampler(len(train_dataset), args.seed)
        loader_generator = torch.Generator()
        loader_generator.manual_seed(args.seed)
        train_dataloader = DataLoader(
            train_dataset,
            batch_size=args.per_device_batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=self.data_collator,
            generator=loader_generator,  # keeps DataLoader seeding off the global RNG
        )
        if len(train_dataloader) == 0:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} examples, fewer than per_device_batch_size="
                f"{args.per_device_batch_size}: lower per_device_batch_size or add data."
            )

        self.optimizer = torch.optim.AdamW(
            self.optimizer_parameters(), lr=args.learning_rate, betas=args.adam_betas, weight_decay=args.weight_decay
        )
        warmup = args.warmup_steps or int(round(args.warmup_ratio * args.max_steps))
        self.warmup_steps = warmup
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine_lambda(args.max_steps, warmup, args.min_lr_ratio)
        )
        (
            self.training_module,
            self.optimizer,
            self.train_dataloader,
            self.lr_scheduler,
        ) = self.accelerator.prepare(self._training_module, self.optimizer, train_dataloader, self.lr_scheduler)
        self.eval_dataloader = None
        if eval_dataset is not None:
            eval_loader = DataLoader(
                eval_dataset,
                batch_size=args.per_device_batch_size,
                shuffle=False,
                drop_last=False,
                collate_fn=self.data_collator,
            )
            self.eval_dataloader = self.accelerator.prepare(eval_loader)

        self.global_step = 0
        self.tokens_seen = 0
        self.generator: torch.Generator | None = None
        self._last_metrics: dict[str, float] = {}

    # --- hooks for subclasses ---------------------------------------------------------------------------

    def default_data_collator(self):
        """A collator when none is given (None: the caller must pass one)."""
        return None

    def extra_modules(self) -> dict[str, nn.Module]:
        """Training-only modules (e.g. the MLM head), optimised and checkpointed with the model."""
        return {}

    def optimizer_parameters(self) -> list[dict]:
        """AdamW parameter groups over the model and `extra_modules()`: no weight decay for norms, biases,
        embeddings and the learned initial STM. Frozen parameters are included (they get no gradient, so AdamW
        skips them) so that a stage can unfreeze them later."""
        decay, no_decay, seen = [], [], set()
        named = [(f"model.{n}", p) for n, p in self.model.named_parameters()]
        for prefix, module in self._extras.items():
            named += [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
        for name, param in named:
            if id(param) in seen:
                continue
            seen.add(id(param))
            lowered = name.lower()
            if param.ndim < 2 or "norm" in lowered or "bias" in lowered or "embed" in lowered or "initial_stm" in lowered:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss to back-propagate, metrics to log, number of tokens processed). Use `self.generator` for randomness."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch).")

    def on_step_begin(self, step: int) -> None:
        """Called once before each optimizer step; `step` = optimizer steps done so far (e.g. SMAT unfreezing)."""

    def stage_config(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the stage history and the model card."""
        return self.args.to_dict()

    # --- randomness -------------------------------------------------------------------------------------

    def _seed_generator(self, step: int, micro: int) -> torch.Generator:
        device = self.accelerator.device
        generator = torch.Generator(device=device) if device.type != "cpu" else torch.Generator()
        key = (self.args.seed * 1_000_003 + self.accelerator.process_index * 100_003 + (step + 2) * 1_009 + micro * 31)
        generator.manual_seed(key % (2**63 - 1))
        self.generator = generator
        return generator

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean `compute_loss` (and its metrics) over `eval_dataset`, averaged over all processes, prefixed `eval_`."""
        if self.eval_dataloader is None:
            return {}
        module = self.training_module
        was_training = module.training
        module.eval()
        keys: list[str] | None = None
        sums: torch.Tensor | None = None
        for index, batch in enumerate(self.eval_dataloader):
            self._seed_generator(-1, index)
            loss, metrics, _ = module(self.compute_loss, batch)
            if keys is None:
                keys = sorted(metrics)
                sums = torch.zeros(2 + len(keys), dtype=torch.float64, device=self.accelerator.device)
            values = [1.0, float(_scalar(loss))] + [float(_scalar(metrics.get(k, 0.0))) for k in keys]
            sums += torch.tensor(values, dtype=torch.float64, device=sums.device)
        module.train(was_training)
        if sums is None:
            return {}
        sums = self.accelerator.reduce(sums, reduction="sum")
        count = max(sums[0].item(), 1.0)
        out = {"eval_loss": sums[1].item() / count}
        out.update({f"eval_{k}": sums[2 + i].item() / count for i, k in enumerate(keys)})
        return out

    # --- checkpoints ------------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> str:
        return str(Path(self.args.output_dir) / CHECKPOINTS_DIR / f"step-{step}")

    def save_checkpoint(self) -> str:
        """`accelerator.save_state` to `output_dir/checkpoints/step-N` (all processes must call it)."""
        path = self.checkpoint_dir(self.global_step)
        self.accelerator.save_state(path)
        if self.accelerator.is_main_process:
            state = {"global_step": self.global_step, "tokens_seen": self.tokens_seen, "stage": self.stage_name}
            Path(path, TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if self.args.save_total_limit:
                root = Path(self.args.output_dir) / CHECKPOINTS_DIR
                found = sorted(
                    (int(m.group(1)), p)
                    for p in root.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name))
                )
                import shutil

                for _, old in found[: -self.args.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, checkpoint: str) -> None:
        if checkpoint == "latest":
            found = find_latest_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint='latest' but {Path(self.args.output_dir) / CHECKPOINTS_DIR} holds no "
                    "step-N checkpoint; set save_steps in the interrupted run or pass a checkpoint path."
                )
            checkpoint = found
        path = Path(checkpoint)
        if not path.is_dir():
            raise ValueError(
                f"resume_from_checkpoint={str(checkpoint)!r} is not a directory; pass output_dir/checkpoints/step-N "
                "or 'latest'."
            )
        match = re.fullmatch(r"step-(\d+)", path.name)
        state_file = path / TRAINER_STATE_FILE
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
        if match is None and "global_step" not in state:
            raise ValueError(
                f"resume_from_checkpoint={str(checkpoint)!r}: cannot tell the step; the directory must be named "
                "step-N (as save_steps writes it)."
            )
        self.accelerator.load_state(str(path))
        self.global_step = int(match.group(1)) if match else int(state["global_step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.accelerator.step = self.global_step * self.args.gradient_accumulation_steps

    # --- logging ----------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        """Write one record to the trackers and to output_dir/log.jsonl (main process)."""
        if self._report_to != "none":
            self.accelerator.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"]
            )
        if self.accelerator.is_main_process:
            path = Path(self.args.output_dir) / "log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _tracker_config(self) -> dict[str, Any]:
        out = {}
        for key, value in self.stage_config().items():
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    # --- training ---------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run the stage until `max_steps` optimizer steps (or `max_time_minutes`); returns the final metrics."""
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.resume_from_checkpoint:
            self._resume(str(args.resume_from_checkpoint))
        if self._report_to != "none":
            accelerator.init_trackers(self.stage_name, config=self._tracker_config())

        accumulation = args.gradient_accumulation_steps
        batches_per_epoch = len(self.train_dataloader)
        consumed = self.global_step * accumulation
        epoch, skip = divmod(consumed, batches_per_epoch)
        start_time = time.time()
        start_step, start_tokens = self.global_step, self.tokens_seen
        window_loss = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum, count]
        window_metrics: dict[str, list[float]] = {}
        window_tokens, window_start = 0, time.time()
        last_grad_norm = None
        stopped_by = "max_steps"
        progress = tqdm(
            total=args.max_steps,
            initial=self.global_step,
            desc=self.stage_name,
            disable=args.disable_tqdm or not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        module = self.training_module
        module.train()
        micro = 0
        done = self.global_step >= args.max_steps
        last_saved = self.global_step if args.resume_from_checkpoint else -1
        while not done:
            self.sampler.epoch = epoch
            loader = skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
            for batch in loader:
                if micro == 0:
                    self.on_step_begin(self.global_step)
                with accelerator.accumulate(module):
                    self._seed_generator(self.global_step, micro)
                    loss, metrics, num_tokens = module(self.compute_loss, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(module.parameters(), args.max_grad_norm)
                        last_grad_norm = _scalar(norm) if norm is not None else None
                    self.optimizer.step()
                    if accelerator.sync_gradients:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window_loss[0] += float(loss.detach().float().item())
                window_loss[1] += 1
                for key, value in metrics.items():
                    window_metrics.setdefault(key, []).append(float(_scalar(value)))
                window_tokens += int(num_tokens)
                micro += 1
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done
                micro = 0
                self.global_step += 1
                progress.update(1)
                if self.global_step % args.logging_steps == 0 or self.global_step == args.max_steps:
                    totals = accelerator.reduce(
                        torch.tensor(
                            [window_loss[0].item(), window_loss[1].item(), float(window_tokens)],
                            dtype=torch.float64,
                            device=accelerator.device,
                        ),
                        reduction="sum",
                    )
                    elapsed_window = max(time.time() - window_start, 1e-9)
                    self.tokens_seen += int(totals[2].item())
                    record = {
                        "step": self.global_step,
                        "loss": totals[0].item() / max(totals[1].item(), 1.0),
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "tokens_per_s": totals[2].item() / elapsed_window,
                        "elapsed_s": time.time() - start_time,
                        "tokens_seen": self.tokens_seen,
                        "epoch": epoch,
                    }
                    if last_grad_norm is not None:
                        record["grad_norm"] = last_grad_norm
                    record.update({k: sum(v) / len(v) for k, v in window_metrics.items()})
                    self._last_metrics = record
                    self._log(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window_loss.zero_()
                    window_metrics, window_tokens, window_start = {}, 0, time.time()
                if self.eval_dataloader is not None and args.eval_steps and self.global_step % args.eval_steps == 0:
                    evaluation = self.evaluate()
                    self._log({"step": self.global_step, **evaluation})
                    module.train()
                if args.save_steps and self.global_step % args.save_steps == 0:
                    self.save_checkpoint()
                    last_saved = self.global_step
                if self.global_step >= args.max_steps:
                    done = True
                elif args.max_time_minutes is not None:
                    over = time.time() - start_time >= args.max_time_minutes * 60
                    flag = accelerator.reduce(
                        torch.tensor([1.0 if over else 0.0], device=accelerator.device), reduction="sum"
                    )
                    if flag.item() > 0:
                        done, stopped_by = True, "max_time_minutes"
                if done:
                    break
            else:
                epoch, skip = epoch + 1, 0
                continue
            break
        progress.close()
        self.tokens_seen += int(
            accelerator.reduce(torch.tensor([float(window_tokens)], device=accelerator.device), "sum").item()
        )
        if stopped_by == "max_time_minutes" and last_saved != self.global_step:
            self.save_checkpoint()
        runtime = time.time() - start_time
        results: dict[str, float] = {
            "global_step": self.global_step,
            "train_runtime_s": runtime,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": (self.tokens_seen - start_tokens) / max(runtime, 1e-9),
            "stopped_by": stopped_by,
        }
        if "loss" in self._last_metrics:
            results["train_loss"] = self._last_metrics["loss"]
        if self.eval_dataloader is not None:
            results.update(self.evaluate())
            module.train()
        self._log({"step": self.global_step, "final": True, **results})
        self._train_results = results
        self._steps_this_run = self.global_step - start_step
        if self._report_to != "none":
            accelerator.end_training()
        return results

    # --- saving -----------------------------------------------------------------------------------------

    def history_entry(self) -> dict[str, Any]:
        """This stage's entry in `rxt_training_history.json` (the model card's curriculum table)."""
        results = getattr(self, "_train_results", {})
        return {
            "stage": self.stage_name,
            "trainer": type(self).__name__,
            "run_id": self.run_id,
            "steps": self.global_step,
            "num_processes": self.accelerator.num_processes,
            "effective_batch_size": self.args.per_device_batch_size
            * self.args.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "tokens_seen": self.tokens_seen,
            "train_runtime_s": round(float(results.get("train_runtime_s", 0.0)), 1),
            "final_loss": results.get("train_loss"),
            "config": self.stage_config(),
        }

    def previous_history(self) -> list[dict]:
        """Stage history of the model before this stage: kept on the model object by an earlier `save_model` in
        this process, else read from the folder the model was loaded from."""
        model = self.accelerator.unwrap_model(self.training_module).model
        history = getattr(model, "rxt_training_history", None)
        if history is None:
            history = load_training_history(getattr(getattr(model, "config", None), "name_or_path", None))
        return [entry for entry in history if entry.get("run_id") != self.run_id]

    def save_model(
        self,
        output_dir: str | None = None,
        evaluation: dict | None = None,
        data_description: str | None = None,
    ) -> str:
        """`save_pretrained` of the model (safetensors), the tokenizer, `rxt_training_history.json` and a
        README.md model card; written by the main process only. Returns the directory."""
        from .model_card import write_model_card

        output_dir = str(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.training_module).model
        history = self.previous_history() + [self.history_entry()]
        if self.accelerator.is_main_process:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            state_dict = self.accelerator.get_state_dict(self.training_module)
            model_state = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            model.save_pretrained(output_dir, state_dict=model_state)  # safetensors (the only format in transformers 5)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(output_dir)
            Path(output_dir, HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str), encoding="utf-8")
            self.save_extra_modules(output_dir)
            write_model_card(
                model,
                output_dir,
                stage_history=history,
                evaluation=evaluation,
                data_description=data_description or self.data_description(),
            )
        else:
            self.accelerator.get_state_dict(self.training_module)  # collective under FSDP / DeepSpeed ZeRO-3
        model.rxt_training_history = history
        self.accelerator.wait_for_everyone()
        return output_dir

    def save_extra_modules(self, output_dir: str) -> None:
        """Hook: save training-only modules next to the model (JointLM saves `mlm_head.safetensors`)."""

    def data_description(self) -> str:
        name = getattr(self.train_dataset, "info", None)
        description = getattr(name, "description", "") if name is not None else ""
        size = len(self.train_dataset)
        columns = getattr(self.train_dataset, "column_names", None)
        text = f"{size} training examples"
        if columns:
            text += f" (columns: {', '.join(columns)})"
        if self.eval_dataset is not None:
            text += f", {len(self.eval_dataset)} evaluation examples"
        return (description + "\n\n" if description else "") + text + "."


__all__ = [
    "RxTStageMixin",
    "RxTStageModule",
    "RxTStageTrainer",
    "RxTTrainingArguments",
    "StageOutput",
    "LogFileCallback",
    "is_peft_model",
    "RxTTrainingConfig",
    "RxTTrainer",
    "EpochShuffleSampler",
    "warmup_cosine_lambda",
    "find_latest_checkpoint",
    "load_training_history",
    "HISTORY_FILE",
]
