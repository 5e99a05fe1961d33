"""What the TRL-derived stages (MRL, RxRLHF) add to TRL's trainers to produce an RxT model folder.

TRL's ``save_model`` writes weights (or only LoRA adapters) and its own card. A curriculum stage must leave a
folder the next stage and the model card build on: the merged weights, the tokenizer, ``rxt_training_history.json``
(the previous stages' entries + this one) and the RxT model card. :class:`RxTStageMixin` does that.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["RxTStageMixin", "is_peft_model"]


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class RxTStageMixin:
    """Mixin for a ``transformers.Trainer`` subclass (put it first in the bases).

    The trainer sets ``stage_name`` (class attribute) and calls :meth:`start_stage_record` in ``__init__``; its
    config has ``summary()`` (the hyper-parameters recorded in the history); it may keep ``_total_train_tokens``
    and override :meth:`data_description`.
    """

    stage_name = "stage"

    def start_stage_record(self, uses_peft: bool) -> None:
        self._run_id = uuid.uuid4().hex[:12]
        self._started = time.time()
        self._uses_peft = bool(uses_peft)

    def history_entry(self) -> dict[str, Any]:
        """This stage's entry in ``rxt_training_history.json`` (the model card's curriculum table)."""
        runtime = next((r["train_runtime"] for r in reversed(self.state.log_history) if "train_runtime" in r), None)
        loss = next((r["loss"] for r in reversed(self.state.log_history) if "loss" in r), None)
        args = self.args
        return {
            "stage": self.stage_name,
            "trainer": type(self).__name__,
            "run_id": self._run_id,
            "steps": self.state.global_step,
            "num_processes": self.accelerator.num_processes,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "tokens_seen": getattr(self, "_total_train_tokens", None),
            "train_runtime_s": round(float(runtime if runtime is not None else time.time() - self._started), 1),
            "final_loss": loss,
            "config": {**args.summary(), "peft": self._uses_peft},
        }

    def data_description(self) -> str | None:
        return None

    def save_rxt_model(self, output_dir: str | None = None, evaluation: dict | None = None,
                       data_description: str | None = None) -> str:
        """Save a complete RxT model folder: weights (LoRA adapters merged into a copy of the model), tokenizer,
        ``rxt_training_history.json`` (the previous stages + this one) and the README model card. The folder
        loads with ``RxTForCausalLM.from_pretrained`` / ``AutoModelForCausalLM`` (``trust_remote_code=True``) and
        is the starting point of a later stage. (``save_model`` keeps TRL's behaviour: adapters only with PEFT.)"""
        from .model_card import write_model_card
        from .trainer_base import HISTORY_FILE, load_training_history

        output_dir = str(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = copy.deepcopy(model).merge_and_unload()
        previous = getattr(model, "rxt_training_history", None)
        if previous is None:
            previous = load_training_history(getattr(model.config, "name_or_path", None))
        history = [e for e in previous if e.get("run_id") != self._run_id] + [self.history_entry()]
        if self.accelerator.is_main_process:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            model.save_pretrained(output_dir)
            self.processing_class.save_pretrained(output_dir)
            Path(output_dir, HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str), encoding="utf-8")
            # the logged records, one JSON line each, as the Accelerate stages write them (`rxt train` plots them)
            lines = [json.dumps(record, default=str) for record in self.state.log_history]
            Path(output_dir, "log.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            write_model_card(model, output_dir, stage_history=history, evaluation=evaluation,
                             data_description=data_description or self.data_description())
        model.rxt_training_history = history  # a later stage in this process continues this history
        self.accelerator.wait_for_everyone()
        return output_dir
