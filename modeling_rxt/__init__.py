"""RxT (Reactive Transformer) as a native Hugging Face transformers model.

Importing this package registers `RxTConfig`, `RxTModel` and `RxTForCausalLM` with `AutoConfig`,
`AutoModel` and `AutoModelForCausalLM`, so `AutoModelForCausalLM.from_config(RxTConfig(...))` works
without remote code. A saved checkpoint also loads without this package via `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rxt import PRESETS, RxTConfig
from .conversation_rxt import ConversationBatch, ConversationTurn, DecoderPass, play_conversations
from .interaction_rxt import InteractionEvent, RxTChat, load_memory, save_memory
from .tokenization_rxt import build_tokenizer, decode_interaction, encode_interaction, special_token_ids
from .modeling_rxt import (
    CACHE_FIELD,
    RxTCausalLMOutput,
    RxTEncoderOutput,
    RxTForCausalLM,
    RxTModel,
    RxTModelOutput,
    RxTPreTrainedModel,
    output_cache,
)

AutoConfig.register("rxt", RxTConfig, exist_ok=True)
AutoModel.register(RxTConfig, RxTModel, exist_ok=True)
AutoModelForCausalLM.register(RxTConfig, RxTForCausalLM, exist_ok=True)

# `save_pretrained` writes these modeling files and an `auto_map` next to the weights.
RxTConfig.register_for_auto_class("AutoConfig")
RxTModel.register_for_auto_class("AutoModel")
RxTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ConversationBatch",
    "ConversationTurn",
    "DecoderPass",
    "play_conversations",
    "InteractionEvent",
    "RxTChat",
    "build_tokenizer",
    "decode_interaction",
    "encode_interaction",
    "special_token_ids",
    "load_memory",
    "save_memory",
    "PRESETS",
    "RxTConfig",
    "RxTPreTrainedModel",
    "RxTModel",
    "RxTForCausalLM",
    "RxTModelOutput",
    "RxTCausalLMOutput",
    "RxTEncoderOutput",
    "CACHE_FIELD",
    "output_cache",
]
