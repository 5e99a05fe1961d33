"""The stage mixin of the TRL-derived stages (MRL, RxRLHF): it lives in :mod:`trainers.trainer_base`, shared with
stages 1-4; this module re-exports it for the trainers that import it from here."""

from .trainer_base import RxTStageMixin, is_peft_model

__all__ = ["RxTStageMixin", "is_peft_model"]
