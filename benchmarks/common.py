"""Models and instruments shared by the benchmarks.

- :func:`build_rxt` / :func:`build_llama_baseline`: randomly initialised RxT and the stateless baseline
  (`LlamaForCausalLM` of the same hidden size, layers, heads, vocabulary and *active* feed-forward size);
- :class:`RecomputedMemoryCache`: an `EncoderDecoderCache` whose memory (cross-attention) keys/values are
  re-projected from the STM at every generation step instead of once per `generate()` call;
- :class:`TokenTimer`: a generation streamer recording when each new token arrives (time to first token);
- :class:`CallCounter`: counts forward calls of modules and the tokens they received;
- state-size arithmetic: :func:`stm_bytes`, :func:`kv_cache_bytes`, :func:`llama_kv_bytes`, :func:`cache_bytes`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

DEFAULT_PRESET = "rxt-alpha-micro"
FIRST_CONTENT_TOKEN = 8  # ids below are RxT's special tokens ([BOS] [EOS] [PAD] [UNK] [MASK] [Q] [A] [T])


# ------------------------------------------------------------------------------------------------------
# models


def build_rxt(preset: str = DEFAULT_PRESET, seed: int = 0, **overrides) -> RxTForCausalLM:
    """A randomly initialised RxT in eval mode (speed does not depend on the weights' values)."""
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset(preset, **overrides)).eval()


def active_feed_forward_size(config: RxTConfig) -> int:
    """The decoder feed-forward width one token actually uses: top-k (+ shared) experts x expert width."""
    if config.decoder_feed_forward == "moe":
        return (config.num_experts_per_token + config.num_shared_experts) * config.decoder_intermediate_size
    return config.decoder_intermediate_size


def llama_config_for(rxt_config: RxTConfig, max_position_embeddings: int = 4096) -> LlamaConfig:
    """The stateless baseline's config: same hidden size, layers, heads, vocabulary and active feed-forward size
    as the RxT decoder; plain multi-head attention (every head makes queries and keys/values)."""
    return LlamaConfig(
        vocab_size=rxt_config.vocab_size,
        hidden_size=rxt_config.hidden_size,
        num_hidden_layers=rxt_config.num_hidden_layers,
        num_attention_heads=rxt_config.num_attention_heads,
        num_key_value_heads=rxt_config.num_attention_heads,
        head_dim=rxt_config.hidden_size // rxt_config.num_attention_heads,
        intermediate_size=active_feed_forward_size(rxt_config),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rxt_config.rms_norm_eps,
        tie_word_embeddings=rxt_config.tie_word_embeddings,
        bos_token_id=rxt_config.bos_token_id,
        eos_token_id=rxt_config.eos_token_id,
        pad_token_id=rxt_config.pad_token_id,
    )


def build_llama_baseline(rxt_config: RxTConfig, max_position_embeddings: int = 4096, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised `LlamaForCausalLM` matching `rxt_config` (see :func:`llama_config_for`), eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config_for(rxt_config, max_position_embeddings)).eval()


def parameter_counts(rxt: RxTForCausalLM, llama: LlamaForCausalLM | None = None) -> dict[str, Any]:
    counts = {"rxt": rxt.num_parameters_by_component()}
    if llama is not None:
        counts["llama"] = {"total": sum(p.numel() for p in llama.parameters())}
    return counts


def describe_llama(llama: LlamaForCausalLM) -> dict[str, Any]:
    c = llama.config
    return {
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "attn_implementation": c._attn_implementation,
    }


def describe_rxt(model: RxTForCausalLM, preset: str) -> dict[str, Any]:
    c = model.config
    return {
        "preset": preset,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_query_heads": c.num_query_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "decoder_feed_forward": c.decoder_feed_forward,
        "num_experts": c.num_experts,
        "num_experts_per_token": c.num_experts_per_token,
        "decoder_intermediate_size": c.decoder_intermediate_size,
        "active_feed_forward_size": active_feed_forward_size(c),
        "encoder_intermediate_size": c.encoder_intermediate_size,
        "stm_shape": list(c.stm_shape),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "attn_implementation": c._attn_implementation,
    }


# ------------------------------------------------------------------------------------------------------
# inputs


def random_tokens(length: int, vocab_size: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Random content token ids (no special tokens) `[batch, length]`."""
    return torch.randint(FIRST_CONTENT_TOKEN, vocab_size, (batch, length), generator=generator)


def rxt_query(config: RxTConfig, length: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """An RxT query of exactly `length` tokens: `[BOS][Q] content [A]`."""
    if length < 4:
        raise ValueError(f"query length {length}: an RxT query needs at least 4 tokens ([BOS][Q] x [A]).")
    content = random_tokens(length - 3, config.vocab_size, generator, batch)
    head = torch.tensor([config.bos_token_id, config.query_token_id]).expand(batch, 2)
    tail = torch.tensor([config.answer_token_id]).expand(batch, 1)
    return torch.cat([head, content, tail], dim=1)


def generation_kwargs(answer_length: int, pad_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """Greedy generation forced to exactly `answer_length` new tokens."""
    return {
        "max_new_tokens": answer_length,
        "min_new_tokens": answer_length,
        "do_sample": False,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
    }


# ------------------------------------------------------------------------------------------------------
# memory keys/values recomputed every step


class _ReplacingDynamicCache(DynamicCache):
    """A `DynamicCache` whose `update` *replaces* a layer's keys/values instead of appending to them."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            layer = self.layers[layer_idx]
            layer.keys, layer.values = key_states, value_states
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class _NeverUpdated(dict):
    """`is_updated` that always answers "not yet", so every step projects the memory keys/values again."""

    def get(self, key, default=None):
        return False

    def __getitem__(self, key):
        return False


class RecomputedMemoryCache(EncoderDecoderCache):
    """Self-attention KV cache as usual, but memory cross-attention keys/values re-projected from the STM at
    every decoding step (what a decoder without the per-call precache would do). Same tokens, more work."""

    def __init__(self, config=None):
        super().__init__(DynamicCache(config=config), _ReplacingDynamicCache(config=config))
        self.is_updated = _NeverUpdated()


def new_recomputed_memory_cache(model: RxTForCausalLM) -> RecomputedMemoryCache:
    return RecomputedMemoryCache(model.config)


# ------------------------------------------------------------------------------------------------------
# instruments


class TokenTimer(BaseStreamer):
    """Streamer recording `time.perf_counter()` at each new token (the prompt, sent first, is skipped).

    Call :meth:`start` right before `generate()`; `first_token_s` is then the time to first token."""

    def __init__(self):
        self.start_time: float | None = None
        self.token_times: list[float] = []
        self._prompt_seen = False

    def start(self) -> "TokenTimer":
        self.token_times, self._prompt_seen = [], False
        self.start_time = time.perf_counter()
        return self

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.token_times.append(time.perf_counter())

    def end(self):
        pass

    @property
    def first_token_s(self) -> float:
        return self.token_times[0] - self.start_time

    @property
    def last_token_s(self) -> float:
        return self.token_times[-1] - self.start_time

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s after the first token (pure decoding, no prompt processing)."""
        if len(self.token_times) < 2:
            return float("nan")
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


class CallCounter:
    """Counts forward calls of `modules` and the tokens (dim -2 of the first input, dim -1 for integer ids) they saw.

    Use as a context manager: hooks are removed on exit."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = list(modules)
        self.calls = 0
        self.tokens = 0
        self._handles = []

    def _hook(self, module, args, kwargs):
        self.calls += 1
        source = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(source, torch.Tensor):
            if source.is_floating_point():
                self.tokens += source.shape[-2] * (source.shape[0] if source.dim() > 2 else 1)
            else:
                self.tokens += source.numel()

    def reset(self):
        self.calls = self.tokens = 0

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def memory_key_projections(model: RxTForCausalLM) -> list[nn.Module]:
    """The memory cross-attention key projections of every decoder layer."""
    return [layer.memory_cross_attn.k_proj for layer in model.model.decoder.layers]


# ------------------------------------------------------------------------------------------------------
# state sizes


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stm_bytes(config: RxTConfig, dtype: torch.dtype = torch.float32, conversations: int = 1) -> int:
    """Bytes of the STM of `conversations` conversations: layers x slots x dim x element size each."""
    layers, slots, dim = config.stm_shape
    return conversations * layers * slots * dim * element_size(dtype)


def kv_cache_bytes(num_layers: int, num_key_value_heads: int, head_dim: int, sequence_length: int, dtype=torch.float32, batch: int = 1) -> int:
    """Bytes of a KV cache: 2 (keys and values) x layers x kv heads x head dim x tokens x element size."""
    return 2 * batch * num_layers * num_key_value_heads * head_dim * sequence_length * element_size(dtype)


def llama_kv_bytes(config: LlamaConfig, sequence_length: int, dtype=torch.float32, batch: int = 1) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_cache_bytes(config.num_hidden_layers, config.num_key_value_heads, head_dim, sequence_length, dtype, batch)


def cache_bytes(cache) -> int:
    """Bytes actually held by a transformers cache (keys + values of every layer; both halves of an
    `EncoderDecoderCache`)."""
    if cache is None:
        return 0
    if isinstance(cache, EncoderDecoderCache):
        return cache_bytes(cache.self_attention_cache) + cache_bytes(cache.cross_attention_cache)
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())
