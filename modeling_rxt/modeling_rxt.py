"""Reactive Transformer (RxT) for Hugging Face transformers.

An RxT answers one interaction at a time. The decoder reads the current query and a fixed-size Short-Term
Memory (STM) through memory cross-attention; after the answer, the encoder encodes `query + answer` and
the memory attention network writes it into a new STM. How it differs from Llama:

- three components share one token embedding: decoder (causal self-attention -> memory cross-attention ->
  MoE or dense SwiGLU), encoder (bidirectional self-attention -> dense SwiGLU), memory attention;
- the STM is a plain tensor `[batch, layers, slots, dim]` passed in and out (never a module buffer), so one
  model serves many conversations; memory keys carry no positional signal (a set, not a sequence): RoPE
  rotates only queries in memory cross-attention and only keys in memory attention;
- during generation the STM keys/values are projected once per `generate()` call and kept in the
  cross-attention half of an `EncoderDecoderCache` (as Whisper/BART do for encoder states).

transformers' own pieces do the generic work: `masking_utils` builds every attention mask, RoPE reads
`config.rope_parameters`, the routed experts are 3-D `gate_up_proj` / `down_proj` tensors run by transformers'
experts implementations (`@use_experts_implementation`: grouped_mm by default, `experts_implementation="eager"` /
"batched_mm" on request), the load-balancing loss is Mixtral's `load_balancing_loss_func`, and the outputs are
transformers' MoE output classes.

The file is built bottom-up: norms and rotary helpers, attention, feed-forwards, layers, components,
pre-trained base, `RxTModel`, `RxTForCausalLM`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticCache
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_rxt import RxTConfig
from .interaction_rxt import load_memory, memory_from_prompt, save_memory, stream_interaction

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------
# outputs

# transformers 5.24 renamed the cache field of every model output from `past_key_values` to `cache` (and passes
# `cache=` to `forward` during generation). The outputs below extend transformers' own classes, so they carry
# whichever name the installed version declares; the model fills and reads it through `CACHE_FIELD`.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class RxTModelOutput(MoeModelOutputWithPast):
    """Decoder output of [`RxTModel`] (transformers' `MoeModelOutputWithPast`): last hidden state, self-attention +
    memory cache, hidden states, every MoE layer's `router_logits` (with `output_router_logits`) and, unlike
    Mixtral's base model, the load-balancing `aux_loss` (trainers read it from the backbone's `decode`). With
    `output_attentions`, `attentions` holds every layer's self-attention weights [B, Hq, T, past + T] and
    `cross_attentions` its memory cross-attention weights [B, Hq, T, S] (as encoder-decoder models name them)."""

    aux_loss: torch.FloatTensor | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None

    @property
    def router_aux_loss(self) -> torch.FloatTensor | None:
        """The load-balancing loss under its earlier name (`aux_loss`)."""
        return self.aux_loss


@dataclass
class RxTCausalLMOutput(MoeCausalLMOutputWithPast):
    """Output of [`RxTForCausalLM`] (transformers' `MoeCausalLMOutputWithPast`). `loss` is the token cross-entropy
    plus `router_aux_loss_coef * aux_loss`; `attentions` / `cross_attentions` as in [`RxTModelOutput`]."""

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None

    @property
    def router_aux_loss(self) -> torch.FloatTensor | None:
        """The load-balancing loss under its earlier name (`aux_loss`)."""
        return self.aux_loss


def output_cache(outputs: ModelOutput) -> Cache | None:
    """The cache of a model or `generate()` output, whatever the installed transformers calls the field."""
    return getattr(outputs, CACHE_FIELD, None)


def pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """`forward` takes the cache under either name: generation passes `cache=` from transformers 5.24 on."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Got both cache= and past_key_values= (two different caches): pass one of them.")
    return cache if cache is not None else past_key_values


@dataclass
class RxTEncoderOutput(ModelOutput):
    """Encoder output: final normed states (for an MLM head) and every layer's states (the memory input)."""

    last_hidden_state: torch.FloatTensor | None = None
    layer_states: torch.FloatTensor | None = None  # [B, L, T, D]


# ------------------------------------------------------------------------------------------------------
# small helpers: norm, rotary embedding, masks (the masks themselves come from transformers.masking_utils)


class RxTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: one op instead of seven (decoding a small model is bound by op count)
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, None, self.variance_epsilon)  # float32 statistics
        return self.weight * normed.to(hidden_states.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def build_norm(config: RxTConfig, kind: str | None = None) -> nn.Module:
    """A norm over `hidden_size` of kind `config.norm_type` (or `kind`): RMSNorm, or LayerNorm with bias."""
    kind = kind or config.norm_type
    if kind == "rms":
        return RxTRMSNorm(config.hidden_size, config.rms_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class RxTGatedMemoryNorm(nn.Module):
    """A gated norm of STM slots: `sigmoid(g) * scale * normalise(x) + (1 - sigmoid(g)) * x`.

    Unlike a plain RMSNorm the blend gate `g` lets the network keep part of the raw memory. `normalise` is a
    LayerNorm ("gated-layer"), `x / sqrt(rms(x) + eps)` per slot ("gated-rms": the root mean square, not its
    square, sits under the root) or `x / sqrt(ema_rms + eps)` with stored per-slot statistics ("gated-ema-rms",
    its gate per slot). The statistics are a buffer read as is: they are not updated in training.
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.kind = config.memory_norm_type
        self.eps = config.memory_norm_eps
        dim, slots = config.hidden_size, config.stm_size
        per_slot = self.kind == "gated-ema-rms"
        if self.kind == "gated-layer":
            self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if per_slot:
            self.register_buffer("ema_rms", torch.ones(slots, 1))
        scale_shape = (slots, 1) if per_slot and config.memory_norm_scale == "slot" else (dim,)
        self.scale = nn.Parameter(torch.ones(scale_shape))
        self.gate = nn.Parameter(torch.empty((slots, 1) if per_slot else (1,)))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:  # [..., S, D]
        if self.kind == "gated-layer":
            return self.norm(x)
        if self.kind == "gated-rms":
            root_mean_square = x.pow(2).mean(-1, keepdim=True).sqrt()  # [..., S, 1]
            return x * torch.rsqrt(root_mean_square + self.eps)
        return x * torch.rsqrt(self.ema_rms + self.eps)  # ema_rms [S, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate)
        return self.normalise(x) * self.scale * gate + x * (1 - gate)

    def extra_repr(self):
        return f"{self.kind}, scale {tuple(self.scale.shape)}, gate {tuple(self.gate.shape)}"


def build_memory_norm(config: RxTConfig) -> nn.Module:
    """The norm of STM slots inside the memory attention network (`config.memory_norm_type`)."""
    if config.memory_norm_type == "rms":
        return RxTRMSNorm(config.hidden_size, config.rms_norm_eps)
    return RxTGatedMemoryNorm(config)


class RotaryTables:
    """cos / sin tables for one set of positions [B, T], computed once per head dim and shared by all layers.

    The attention roles may split `hidden_size` into different head dims, so unlike Llama's rotary embedding (one
    head dim) the tables are built per head dim on first use.
    """

    def __init__(self, position_ids: torch.Tensor, rotary_emb: "RxTRotaryEmbedding"):
        self.position_ids = position_ids
        self.rotary_emb = rotary_emb
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, head_dim: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos` and a signed `sin` [B, 1, T, hd]: the first half of `sin` negated (see :meth:`rotate`)."""
        key = (head_dim, dtype, device)
        if key not in self.tables:
            position_ids = self.position_ids.to(device)
            inv_freq, attention_scaling = self.rotary_emb.inv_freq(head_dim, position_ids)  # [hd/2]
            freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
            cos, sin = freqs.cos(), freqs.sin()
            if attention_scaling != 1.0:
                cos, sin = cos * attention_scaling, sin * attention_scaling
            cos = torch.cat((cos, cos), dim=-1)[:, None]  # [B, 1, T, hd]
            sin = torch.cat((-sin, sin), dim=-1)[:, None]
            self.tables[key] = (cos.to(dtype), sin.to(dtype))
        return self.tables[key]

    def rotate(self, states: torch.Tensor) -> torch.Tensor:
        """RoPE on `states` [B, H, T, hd], transformers' `q * cos + rotate_half(q) * sin` (halves convention), the
        swap of halves being one `roll` against a signed `sin` (fewer ops per decoding step, same numbers)."""
        cos, signed_sin = self.get(states.shape[-1], states.dtype, states.device)
        return states * cos + states.roll(states.shape[-1] // 2, dims=-1) * signed_sin


class HeadDimView:
    """The config as transformers' RoPE functions see it for one attention role: every attribute is the config's
    except `head_dim`, which they read before falling back to `hidden_size // num_attention_heads`."""

    def __init__(self, config: RxTConfig, head_dim: int):
        self.config = config
        self.head_dim = head_dim

    def __getattr__(self, name: str):
        return getattr(self.config, name)


class RxTRotaryEmbedding(nn.Module):
    """Rotary position embedding from `config.rope_parameters` (transformers' format).

    rope_type "default" is the original RoPE (`compute_default_rope_parameters`); "linear", "dynamic", "yarn",
    "longrope" and "llama3" are transformers' own `ROPE_INIT_FUNCTIONS`, given the config with the role's head dim
    (:class:`HeadDimView`). Holds no buffer: calling it with position ids [B, T] returns their
    :class:`RotaryTables`; the inverse frequencies are kept in float32 per (head dim, device).

    The two types that depend on the sequence length follow transformers' `dynamic_rope_update` without its state,
    reading `seq_len = max(position_ids) + 1` of each call on the device (no host sync): "dynamic" uses the NTK base
    recomputed for `seq_len` once it exceeds `max_position_embeddings` (the plain frequencies up to it); "longrope"
    uses `long_factor` once `seq_len` exceeds `original_max_position_embeddings` (`short_factor` up to it). That is
    Llama's rotary embedding whenever positions grow, as in generation; Llama also keeps a grown "dynamic" base for a
    later, shorter call that still exceeds `max_position_embeddings`, where this recomputes for that call.
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        self.rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        self.inv_freq_cache: dict[tuple, tuple[torch.Tensor, float]] = {}

    @staticmethod
    def compute_default_rope_parameters(config: RxTConfig, device: torch.device | None = None, **kwargs):
        """Inverse frequencies of the original RoPE for `config.head_dim` (default: hidden_size /
        num_attention_heads) and the cos / sin scaling (1.0: unused by this RoPE type)."""
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    def cached(self, head_dim: int, device, **kwargs) -> tuple[torch.Tensor, float]:
        key = (head_dim, device, tuple(kwargs.items()))
        if key not in self.inv_freq_cache:
            self.inv_freq_cache[key] = self.rope_init_fn(HeadDimView(self.config, head_dim), device, **kwargs)
        return self.inv_freq_cache[key]

    def inv_freq(self, head_dim: int, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [hd/2] (float32) for the positions `position_ids` and the cos / sin scaling."""
        device = position_ids.device
        inv_freq, attention_scaling = self.cached(head_dim, device)
        if self.rope_type == "dynamic":
            seq_len = position_ids.max() + 1  # [] on the device
            grown, _ = self.rope_init_fn(HeadDimView(self.config, head_dim), device, seq_len=seq_len)
            inv_freq = torch.where(seq_len > self.config.max_position_embeddings, grown, inv_freq)
        elif self.rope_type == "longrope":
            original = self.config.rope_parameters["original_max_position_embeddings"]
            long_inv_freq, _ = self.cached(head_dim, device, seq_len=original + 1)
            inv_freq = torch.where(position_ids.max() + 1 > original, long_inv_freq, inv_freq)
        return inv_freq, attention_scaling

    def forward(self, position_ids: torch.Tensor) -> RotaryTables:
        return RotaryTables(position_ids, self)


def positions_from_mask(attention_mask: torch.Tensor | None, length: int, past_length: int, device) -> torch.Tensor:
    """Position ids [B or 1, length] of the last `length` tokens; padding does not advance positions."""
    if attention_mask is None:  # `past_length` may be a tensor (a static cache): no host read, compile-safe
        return (torch.arange(length, device=device) + past_length)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]


def padding_mask_for(config: RxTConfig, queries: torch.Tensor, attention_mask: torch.Tensor | None, keys: torch.Tensor):
    """The attention mask of `queries` [B, Tq, D] reading `keys` [B, Tk, D] of which `attention_mask` [B, Tk] marks the
    real ones (transformers' bidirectional mask for the configured attention implementation), or None when no mask
    was given. The encoder and memory reads use it; only the decoder's self-attention is causal."""
    if attention_mask is None:
        return None
    return create_bidirectional_mask(
        config=config, inputs_embeds=queries, attention_mask=attention_mask, encoder_hidden_states=keys
    )


# ------------------------------------------------------------------------------------------------------
# attention


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; `query` [B, Hq, Tq, hd], `key`/`value` [B, Hkv, Tk, hd]."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, Hq, Tq, Tk]
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # a 4-D boolean mask passed in as is
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    elif attention_mask is not None:  # transformers' additive eager mask
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, Tq, Hq, hd]
    return output, weights


class RxTAttention(nn.Module):
    """One attention module for every RxT role, parameterised by head counts and where RoPE applies.

    `num_heads` splits `hidden_size` into head dims; `num_query_heads` of them make queries (the output
    projection reads `num_query_heads * head_dim`, as in Sparse Query Attention) and `num_key_value_heads`
    make keys/values (GQA-style sharing). `rope` is one of "query_key" (self-attention), "query" (memory
    cross-attention: memory is a set) or "key" (memory attention: memory slots are the queries), "none". `causal`
    (the decoder's self-attention) lets sdpa run its causal kernel when transformers' mask helper skips the mask.
    """

    def __init__(self, config: RxTConfig, role: str, rope: str, layer_idx: int, cross: bool, causal: bool = False):
        super().__init__()
        num_heads, num_query_heads, num_key_value_heads = config.heads_for(role)
        self.config = config
        self.layer_idx = layer_idx
        self.cross = cross
        self.head_dim = config.hidden_size // num_heads
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = num_query_heads // num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.rope_query = rope in ("query_key", "query")
        self.rope_key = rope in ("query_key", "key")
        self.is_causal = causal
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, num_query_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_query_heads * self.head_dim, config.hidden_size, bias=config.output_bias_for(role))
        self.qk_norm = cross and config.memory_qk_norm
        if self.qk_norm:  # per-head RMSNorm: sharp content-based memory reads from the first step
            self.q_norm = RxTRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RxTRMSNorm(self.head_dim, config.rms_norm_eps)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def project_key_value(self, source: torch.Tensor, rotary: RotaryTables | None = None):
        """Keys and values [B, Hkv, Tk, hd] from `source` [B, Tk, D]."""
        key = self.split_heads(self.k_proj(source))
        value = self.split_heads(self.v_proj(source))
        if self.qk_norm:
            key = self.k_norm(key)
        if self.rope_key:
            key = rotary.rotate(key)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, Tq, D]
        key_value_states: torch.Tensor | None = None,  # [B, Tk, D] source of a cross attention
        attention_mask: torch.Tensor | None = None,  # [B, 1, Tq, Tk] from transformers.masking_utils
        rotary: RotaryTables | None = None,  # positions of the queries (self-attention, memory cross-attention)
        key_rotary: RotaryTables | None = None,  # positions of a cross source with rotated keys (memory attention)
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output [B, Tq, D] and the attention weights [B, Hq, Tq, Tk] (eager attention only, else None)."""
        batch, length, _ = hidden_states.shape
        query = self.split_heads(self.q_proj(hidden_states))  # [B, Hq, Tq, hd]
        if self.qk_norm:
            query = self.q_norm(query)
        if self.rope_query:
            query = rotary.rotate(query)

        if not self.cross:  # self-attention, optionally cached
            key, value = self.project_key_value(hidden_states, rotary)
            if past_key_values is not None:
                cache = getattr(past_key_values, "self_attention_cache", past_key_values)
                key, value = cache.update(key, value, self.layer_idx)
        elif isinstance(past_key_values, EncoderDecoderCache):  # memory cross-attention: project once per call
            if past_key_values.is_updated.get(self.layer_idx):
                layer = past_key_values.cross_attention_cache.layers[self.layer_idx]
                key, value = layer.keys, layer.values
            else:
                key, value = self.project_key_value(key_value_states, key_rotary)
                key, value = past_key_values.cross_attention_cache.update(key, value, self.layer_idx)
                past_key_values.is_updated[self.layer_idx] = True
        else:
            key, value = self.project_key_value(key_value_states, key_rotary)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=self.is_causal,
        )
        return self.o_proj(output.reshape(batch, length, -1)), weights


# ------------------------------------------------------------------------------------------------------
# feed-forward: dense SwiGLU and Mixture-of-Experts


# the gated feed-forward's activation (`config.hidden_act`); plain torch functions, so nothing is swapped for a kernel
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


class RxTSwiGLU(nn.Module):
    """Gated feed-forward `down(act(gate(x)) * up(x))`: SwiGLU with the default SiLU, optionally with biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation = activation
        self.act_fn = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self):
        return f"activation={self.activation}"


class RxTExpertsBase(nn.Module):
    """The routed SwiGLU experts as 3-D tensors, transformers' layout (Mixtral / Qwen-MoE): `gate_up_proj`
    [E, 2H, D] (each expert's gate rows, then its up rows), `down_proj` [E, D, H] and, with `moe_expert_bias`,
    `gate_up_proj_bias` [E, 2H] / `down_proj_bias` [E, D]. The subclasses below are decorated with transformers'
    `@use_experts_implementation`, which runs `config._experts_implementation` ("grouped_mm" by default,
    "batched_mm", ...) and this `forward` for "eager".

    Checkpoints written before (one module per expert, `experts.{e}.gate_proj.weight` ...) are converted on load:
    `from_pretrained` through the registered checkpoint conversion (which `save_pretrained` reverses, so saved
    folders keep the per-expert layout), `load_state_dict` through :meth:`merge_per_expert_weights`.
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.decoder_intermediate_size
        experts, dim, hidden = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))
        if config.moe_expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * hidden))
            self.down_proj_bias = nn.Parameter(torch.empty(experts, dim))
        self.activation = config.hidden_act
        self.act_fn = ACTIVATIONS[config.hidden_act]
        self.register_load_state_dict_pre_hook(RxTExpertsBase.merge_per_expert_weights)

    def expert(self, index: int, states: torch.Tensor) -> torch.Tensor:
        """Expert `index` on `states` [n, D] -> [n, D]: `down(act(gate(x)) * up(x))`."""
        bias = hasattr(self, "gate_up_proj_bias")
        gate, up = F.linear(
            states, self.gate_up_proj[index], self.gate_up_proj_bias[index] if bias else None
        ).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[index], self.down_proj_bias[index] if bias else None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The "eager" implementation: `hidden_states` [N, D], chosen experts and weights [N, k] -> weighted sum [N, D].
        One token (a decoding step) calls its k experts directly; more tokens are sorted by expert so that each
        expert reads one contiguous slice. Either way the chosen experts are read on the host (a device sync on an
        accelerator, free on CPU, where it is the fastest path): the default "grouped_mm" implementation avoids that."""
        num_tokens, top_k = top_k_index.shape
        if num_tokens == 1:
            output = None
            for slot, expert_idx in enumerate(top_k_index[0].tolist()):
                expert_out = self.expert(expert_idx, hidden_states) * top_k_weights[:, slot, None]
                output = expert_out if output is None else output + expert_out
            return output
        assigned = top_k_index.reshape(-1)  # [N * k]
        order = assigned.argsort(stable=True)
        counts = torch.bincount(assigned, minlength=self.num_experts).tolist()
        routed = hidden_states[order // top_k]  # [N * k, D]
        pieces, start = [], 0
        for expert_idx, count in enumerate(counts):
            if count:  # only experts that received tokens
                pieces.append(self.expert(expert_idx, routed[start : start + count]))
            start += count
        weighted = torch.cat(pieces) * top_k_weights.reshape(-1)[order, None]
        out = torch.empty_like(weighted)
        out[order] = weighted  # back to (token, slot) order
        return out.view(num_tokens, top_k, -1).sum(dim=1)

    @staticmethod
    def merge_per_expert_weights(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """`load_state_dict` pre-hook: per-expert weights (`{prefix}{e}.gate_proj.weight` / `up_proj` / `down_proj`,
        and biases) stacked into the 3-D tensors, so state dicts of earlier versions load."""
        if f"{prefix}0.gate_proj.weight" not in state_dict:
            return
        for kind in ("weight", "bias"):
            if f"{prefix}0.gate_proj.{kind}" not in state_dict:
                continue
            gate_up, down = [], []
            for index in range(module.num_experts):
                names = [f"{prefix}{index}.{proj}.{kind}" for proj in ("gate_proj", "up_proj", "down_proj")]
                if not all(name in state_dict for name in names):
                    break  # incomplete: leave the keys for load_state_dict to report
                gate, up, down_one = (state_dict.pop(name) for name in names)
                gate_up.append(torch.cat([gate, up], dim=0))
                down.append(down_one)
            else:
                suffix = "" if kind == "weight" else "_bias"
                state_dict[f"{prefix}gate_up_proj{suffix}"] = torch.stack(gate_up)
                state_dict[f"{prefix}down_proj{suffix}"] = torch.stack(down)

    def extra_repr(self):
        return (
            f"experts={self.num_experts}, dim={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"activation={self.activation}, bias={hasattr(self, 'gate_up_proj_bias')}"
        )


@use_experts_implementation
class RxTExperts(RxTExpertsBase):
    """Routed experts without biases (the default)."""


@use_experts_implementation(has_bias=True)
class RxTBiasedExperts(RxTExpertsBase):
    """Routed experts with biases inside (`config.moe_expert_bias`)."""


def register_checkpoint_conversion() -> bool:
    """Register with transformers how checkpoints written before the fused experts load: per-expert
    `feed_forward.experts.{e}.gate_proj` / `up_proj` / `down_proj` (weights and biases) become the 3-D tensors,
    as transformers' own Qwen2-MoE mapping does. `save_pretrained` applies the reverse, so a saved folder keeps the
    per-expert layout (and loads with earlier versions too). False when the installed transformers has no
    conversion registry (then only `load_state_dict` converts, through the experts' pre-hook)."""
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:
        return False
    experts = "feed_forward.experts"
    mapping = []
    for kind, suffix in (("weight", ""), ("bias", "_bias")):
        mapping.append(
            WeightConverter(
                source_patterns=[f"{experts}.*.gate_proj.{kind}", f"{experts}.*.up_proj.{kind}"],
                target_patterns=f"{experts}.gate_up_proj{suffix}",
                operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
            )
        )
        mapping.append(
            WeightConverter(
                source_patterns=f"{experts}.*.down_proj.{kind}",
                target_patterns=f"{experts}.down_proj{suffix}",
                operations=[MergeModulelist(dim=0)],
            )
        )
    register_checkpoint_conversion_mapping(RxTConfig.model_type, mapping, overwrite=True)
    return True


register_checkpoint_conversion()


class RxTMoE(nn.Module):
    """Top-k routed SwiGLU experts (weights renormalised over the chosen k) plus optional shared experts.

    Returns the output and the router logits [N, E] (`RxTModel.decode` computes the load-balancing loss from every
    layer's logits, as transformers' MoE models do). The routed experts are transformers-style fused tensors
    (:class:`RxTExpertsBase`). Options other implementations use (all off by default): biases inside the experts,
    a learned vector added to the routed sum and to the shared output, a softmax gate mixing the shared experts,
    the weighting `k / (k + shared)` vs `shared / (k + shared)` of the two parts, and routing by a softmax over all
    experts before the top-k (`config.moe_router_softmax="all"`).
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.num_shared = config.num_shared_experts
        self.router_softmax = config.moe_router_softmax
        self.weighted_shared = config.moe_weighted_shared_experts and self.num_shared > 0
        act = config.hidden_act
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = (RxTBiasedExperts if config.moe_expert_bias else RxTExperts)(config)
        shared_size = config.moe_shared_intermediate_size or config.decoder_intermediate_size
        self.shared_experts = nn.ModuleList(
            RxTSwiGLU(config.hidden_size, shared_size, config.moe_shared_expert_bias, act)
            for _ in range(config.num_shared_experts)
        )
        if config.moe_routed_output_bias:
            self.routed_bias = nn.Parameter(torch.zeros(config.hidden_size))
        if config.moe_shared_output_bias and self.num_shared:
            self.shared_bias = nn.Parameter(torch.zeros(config.hidden_size))
        if config.moe_shared_expert_gate and self.num_shared > 1:
            self.shared_gate = nn.Linear(config.hidden_size, self.num_shared, bias=False)

    def route(self, logits: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [N, k] and their weights [N, k] from router logits [N, E]."""
        if self.router_softmax == "all":  # probabilities of all experts, top k of them, renormalised
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            top_probs, top_experts = probs.topk(self.top_k, dim=-1)
            top_weights = (top_probs / (top_probs.sum(dim=-1, keepdim=True) + 1e-9)).to(dtype)
        else:
            top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # [N, k]
            # softmax over the chosen k logits == the router probabilities renormalised over the top k
            top_weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(dtype)
        if self.weighted_shared:
            top_weights = top_weights * (self.top_k / (self.top_k + self.num_shared))
        return top_experts, top_weights

    def shared_output(self, flat: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` plus the shared experts' contribution."""
        if not (hasattr(self, "shared_gate") or hasattr(self, "shared_bias") or self.weighted_shared):
            for shared in self.shared_experts:
                output = output + shared(flat)
            return output
        if hasattr(self, "shared_gate"):
            weights = F.softmax(self.shared_gate(flat), dim=-1)  # [N, shared]
            outputs = torch.stack([shared(flat) for shared in self.shared_experts], dim=1)  # [N, shared, D]
            combined = (outputs * weights[..., None]).sum(dim=1)
        else:
            combined = self.shared_experts[0](flat)
            for shared in self.shared_experts[1:]:
                combined = combined + shared(flat)
        if hasattr(self, "shared_bias"):
            combined = combined + self.shared_bias
        if self.weighted_shared:
            combined = combined * (self.num_shared / (self.top_k + self.num_shared))
        return output + combined

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        flat = x.reshape(-1, dim)  # [N, D]
        router_logits = self.router(flat)  # [N, E]
        top_experts, top_weights = self.route(router_logits, flat.dtype)  # [N, k]
        output = self.experts(flat, top_experts, top_weights)
        if hasattr(self, "routed_bias"):
            output = output + self.routed_bias
        output = self.shared_output(flat, output)
        return output.view(batch, length, dim), router_logits

    def active_parameters(self) -> int:
        per_expert = sum(p.numel() for p in self.experts.parameters()) // self.num_experts
        total = sum(p.numel() for p in self.parameters())
        return total - (self.num_experts - self.top_k) * per_expert


# ------------------------------------------------------------------------------------------------------
# residual gate


class RxTGateProjection(nn.Linear):
    """The Linear of a "linear" residual gate: a type of its own so that `_init_weights`, which visits children
    before parents, can start its bias at `config.residual_gate_init_bias`."""


class RxTResidualGate(nn.Module):
    """Blends the old memory with its update: sigmoid `(1 - G) * old + G * update`, tanh `(1 + G) * update + (1 - G) * old`.

    `G` is static (learned weights only), elementwise or linear (computed from `old + update`). Type "none" is a
    plain residual `old + update`, "replace" keeps only the update.
    Granularity "slot": one gate value per memory slot, from parameters specific to each slot (the gate
    then depends on slot identity). Granularity "layer": parameters shared by every slot of the layer and
    one gate value per feature, so the update stays permutation-equivariant over slots. Granularity "scalar":
    one gate value for the whole layer (elementwise: from the mean over slots and features; linear: from the
    per-slot statuses). A slot's status is its mean over features, or with `residual_gate_slot_status="linear"`
    a learned projection of its features to one value.
    """

    def __init__(self, config: RxTConfig, gate_type: str | None = None):
        super().__init__()
        self.gate_type = gate_type or config.residual_gate_type
        self.activation = config.residual_gate_activation
        self.granularity = config.residual_gate_granularity
        self.per_slot = self.granularity == "slot"
        if self.gate_type in ("none", "replace"):
            return
        slots, dim = config.stm_size, config.hidden_size
        if self.gate_type != "static" and config.residual_gate_slot_status == "linear":
            self.status_proj = nn.Linear(dim, 1)
        if self.gate_type == "static":
            self.weight = nn.Parameter(torch.empty(slots, 1) if self.per_slot else torch.empty(1))
        elif self.gate_type == "elementwise":
            width = {"slot": slots, "layer": dim, "scalar": 1}[self.granularity]
            self.weight = nn.Parameter(torch.empty(width))
            if config.residual_gate_bias:
                self.bias = nn.Parameter(torch.empty(width))
        else:
            width = slots if self.granularity != "layer" else dim
            self.proj = RxTGateProjection(width, 1 if self.granularity == "scalar" else width)

    def slot_status(self, source: torch.Tensor) -> torch.Tensor:
        """One value per slot [B, S] from `source` [B, S, D]."""
        if hasattr(self, "status_proj"):
            return self.status_proj(source).squeeze(-1)
        return source.mean(-1)

    def gate(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.gate_type == "static":
            logits = self.weight  # [S, 1] or [1]
        else:
            source = old + update  # [B, S, D]
            if self.granularity == "scalar" and self.gate_type == "elementwise":
                source = source.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1]
            elif self.granularity != "layer":
                source = self.slot_status(source)  # [B, S]
            if self.gate_type == "elementwise":
                logits = source * self.weight + self.bias if hasattr(self, "bias") else source * self.weight
            else:
                logits = self.proj(source)  # [B, S, D], [B, S] or [B, 1]
            if self.granularity == "slot" or (self.granularity == "scalar" and self.gate_type == "linear"):
                logits = logits[..., None]  # [B, S, 1] or [B, 1, 1]
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.tanh(logits)

    def forward(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.gate_type == "none":
            return old + update
        if self.gate_type == "replace":
            return update
        gate = self.gate(old, update)
        if self.activation == "sigmoid":
            return (1 - gate) * old + gate * update
        return (1 + gate) * update + (1 - gate) * old


# ------------------------------------------------------------------------------------------------------
# layers


class RxTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm: causal self-attention -> memory cross-attention (STM as a set) -> MoE / dense SwiGLU."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.self_attn_norm = build_norm(config)
        self.self_attn = RxTAttention(
            config, "self_attention", rope="query_key", layer_idx=layer_idx, cross=False, causal=True
        )
        self.memory_norm = build_norm(config)
        self.cross_attn_norm = build_norm(config)
        self.memory_cross_attn = RxTAttention(
            config, "memory_cross_attention", rope="query" if config.memory_rope else "none", layer_idx=layer_idx, cross=True
        )
        self.ff_norm = build_norm(config)
        self.is_moe = config.decoder_feed_forward == "moe"
        if self.is_moe:
            self.feed_forward = RxTMoE(config)
        else:
            self.feed_forward = RxTSwiGLU(
                config.hidden_size, config.decoder_intermediate_size, config.mlp_bias, config.hidden_act
            )

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, D]
        memory: torch.Tensor,  # [B, S, D] this layer's STM
        attention_mask: torch.Tensor | None = None,  # causal [B, 1, T, Tk] (transformers.masking_utils)
        memory_mask: torch.Tensor | None = None,  # [B, 1, T, S]
        rotary: RotaryTables | None = None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new hidden states, the MoE router logits [B * T, E] (None for a dense feed-forward) and the
        self-attention [B, Hq, T, Tk] and memory cross-attention [B, Hq, T, S] weights (eager attention, else None)."""
        residual = hidden_states
        hidden_states, self_weights = self.self_attn(
            self.self_attn_norm(hidden_states),
            attention_mask=attention_mask,
            rotary=rotary,
            past_key_values=past_key_values,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        cached = isinstance(past_key_values, EncoderDecoderCache) and past_key_values.is_updated.get(
            self.memory_cross_attn.layer_idx
        )
        hidden_states, cross_weights = self.memory_cross_attn(
            self.cross_attn_norm(hidden_states),
            key_value_states=None if cached else self.memory_norm(memory),
            attention_mask=memory_mask,
            rotary=rotary,
            past_key_values=past_key_values,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        if self.is_moe:
            hidden_states, router_logits = self.feed_forward(self.ff_norm(hidden_states))
        else:
            hidden_states, router_logits = self.feed_forward(self.ff_norm(hidden_states)), None
        return residual + hidden_states, router_logits, self_weights, cross_weights


class RxTEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm: bidirectional self-attention -> dense SwiGLU. No memory cross-attention (see the RxT paper)."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.self_attn_norm = build_norm(config)
        self.self_attn = RxTAttention(config, "self_attention", rope="query_key", layer_idx=layer_idx, cross=False)
        self.ff_norm = build_norm(config)
        self.feed_forward = RxTSwiGLU(
            config.hidden_size, config.encoder_intermediate_size, config.mlp_bias, config.hidden_act
        )

    def forward(self, hidden_states, attention_mask=None, rotary=None):
        hidden_states = hidden_states + self.self_attn(
            self.self_attn_norm(hidden_states), attention_mask=attention_mask, rotary=rotary
        )[0]
        return hidden_states + self.feed_forward(self.ff_norm(hidden_states))


class RxTMemoryAttentionLayer(GradientCheckpointingLayer):
    """Writes one layer's encoded interaction into its STM layer.

    With old state `s` and encoded data `e`: `u = Attn(Q=MemNorm(s'), K=V=Norm(e))` (RoPE on keys only),
    `new = Gate(s', u)`. `s'` depends on the variant: `simple` s; `self` s after gated self-attention over
    the slots; `interlayer` s after gated attention to the mean of all layers' slots; `gated-self-interlayer`
    like interlayer, its keys/values a gated blend of the own layer and the inter-layer mean;
    `self-interlayer` the same blend taken between the *normed* own layer (also the queries) and the normed
    mean, with no norm after the blend. With `config.memory_interlayer_groups > 1` the mean runs over the
    layer's group of consecutive layers.
    """

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.variant = config.memory_attention_variant
        if self.variant != "simple":
            self.pre_query_norm = build_memory_norm(config)
            self.pre_key_value_norm = build_memory_norm(config)
            self.pre_attention = RxTAttention(
                config, "memory_pre_attention", rope="none", layer_idx=layer_idx, cross=True
            )
            self.pre_gate = RxTResidualGate(config, config.memory_pre_gate_type)
        if self.variant in ("gated-self-interlayer", "self-interlayer"):
            self.source_gate = RxTResidualGate(config)
        self.memory_norm = build_memory_norm(config)
        self.encoded_norm = RxTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = RxTAttention(
            config, "memory_attention", rope="key" if config.memory_rope else "none", layer_idx=layer_idx, cross=True
        )
        self.gate = RxTResidualGate(config)

    def forward(
        self,
        stm_layer: torch.Tensor,  # [B, S, D]
        stm_mean: torch.Tensor,  # [B, S, D] mean over (the group's) layers of the old STM
        encoded: torch.Tensor,  # [B, T, D]
        encoded_mask: torch.Tensor | None = None,  # [B, 1, S, T]
        encoded_rotary: RotaryTables | None = None,  # positions of the encoded tokens
    ) -> torch.Tensor:
        state = stm_layer
        if self.variant == "self-interlayer":
            query = self.pre_query_norm(stm_layer)
            source = self.source_gate(query, self.pre_key_value_norm(stm_mean))
            update, _ = self.pre_attention(query, key_value_states=source)
            state = self.pre_gate(stm_layer, update)
        elif self.variant != "simple":
            if self.variant == "self":
                source = stm_layer
            elif self.variant == "interlayer":
                source = stm_mean
            else:
                source = self.source_gate(stm_layer, stm_mean)
            update, _ = self.pre_attention(
                self.pre_query_norm(stm_layer), key_value_states=self.pre_key_value_norm(source)
            )
            state = self.pre_gate(stm_layer, update)
        update, _ = self.attention(
            self.memory_norm(state),
            key_value_states=self.encoded_norm(encoded),
            attention_mask=encoded_mask,
            key_rotary=encoded_rotary,
        )
        return self.gate(state, update)


# ------------------------------------------------------------------------------------------------------
# components


class RxTDecoder(nn.Module):
    def __init__(self, config: RxTConfig):
        super().__init__()
        self.layers = nn.ModuleList(RxTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        final = config.decoder_final_norm
        self.norm = nn.Identity() if final == "none" else build_norm(config, final)
        self.rotary_emb = RxTRotaryEmbedding(config)
        self.config = config

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [B, T, D]
        memory: torch.Tensor,  # [B, L, S, D]
        attention_mask: torch.Tensor | None = None,  # [B, past + T]
        memory_attention_mask: torch.Tensor | None = None,  # [B, S]
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        output_attentions: bool = False,
    ) -> tuple:
        """Final hidden states [B, T, D], every layer's input and the output (with `output_hidden_states`) and every
        MoE layer's router logits [B * T, E] (with `output_router_logits`; None for a dense decoder), every layer's
        self-attention [B, Hq, T, past + T] and memory cross-attention [B, Hq, T, S] weights (with
        `output_attentions`; None otherwise)."""
        batch, length, _ = inputs_embeds.shape
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, length, past_length, inputs_embeds.device)
        # transformers' causal mask for the configured attention; the cache (4th argument: `past_key_values` up to
        # transformers 5.23, `cache` from 5.24) sizes it. A decoding step always gets a mask: skipping it would
        # need a host read of the padding mask (a device sync) on every step.
        self_mask = create_causal_mask(
            self.config,
            inputs_embeds,
            attention_mask,
            getattr(past_key_values, "self_attention_cache", past_key_values),
            position_ids=position_ids,  # packed rows (positions restart, no mask, no cache) get a block-causal mask
            allow_is_causal_skip=length > 1,
        )
        memory_mask = padding_mask_for(self.config, inputs_embeds, memory_attention_mask, memory[:, 0])
        rotary = self.rotary_emb(position_ids)

        hidden_states, router_logits = inputs_embeds, ()
        all_hidden = (hidden_states,) if output_hidden_states else None
        self_attentions = () if output_attentions else None
        cross_attentions = () if output_attentions else None
        for idx, layer in enumerate(self.layers):
            hidden_states, layer_router_logits, self_weights, cross_weights = layer(
                hidden_states,
                memory[:, idx],
                attention_mask=self_mask,
                memory_mask=memory_mask,
                rotary=rotary,
                past_key_values=past_key_values,
            )
            if layer_router_logits is not None:
                router_logits += (layer_router_logits,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                self_attentions += (self_weights,)
                cross_attentions += (cross_weights,)
        router_logits = router_logits if output_router_logits and router_logits else None
        return self.norm(hidden_states), all_hidden, router_logits, self_attentions, cross_attentions


class RxTEncoder(nn.Module):
    def __init__(self, config: RxTConfig):
        super().__init__()
        self.layers = nn.ModuleList(RxTEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RxTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RxTRotaryEmbedding(config)
        self.config = config

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RxTEncoderOutput:
        batch, length, _ = inputs_embeds.shape
        rotary = self.rotary_emb(positions_from_mask(attention_mask, length, 0, inputs_embeds.device))
        mask = padding_mask_for(self.config, inputs_embeds, attention_mask, inputs_embeds)
        hidden_states, layer_states = inputs_embeds, []
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, rotary=rotary)
            layer_states.append(hidden_states)
        return RxTEncoderOutput(
            last_hidden_state=self.norm(hidden_states),
            layer_states=torch.stack(layer_states, dim=1),  # [B, L, T, D]
        )


class RxTMemoryAttention(nn.Module):
    """The memory attention network: all layers read the old STM, the new STM is written at once."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.layers = nn.ModuleList(RxTMemoryAttentionLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = RxTRotaryEmbedding(config)
        self.config = config
        self.groups = config.memory_interlayer_groups
        if config.stm_init_mode == "learned":
            self.initial_stm = nn.Parameter(torch.empty(config.stm_shape))

    def forward(
        self,
        stm_state: torch.Tensor,  # [B, L, S, D]
        encoded: torch.Tensor,  # [B, L, T, D]
        attention_mask: torch.Tensor | None = None,  # [B, T]
    ) -> torch.Tensor:
        length = encoded.shape[2]
        rotary = self.rotary_emb(positions_from_mask(attention_mask, length, 0, encoded.device))
        mask = padding_mask_for(self.config, stm_state[:, 0], attention_mask, encoded[:, 0])  # slots read tokens
        if self.groups == 1:
            stm_means = stm_state.mean(dim=1, keepdim=True)  # [B, 1, S, D]
        else:  # groups of consecutive layers
            batch, layers, slots, dim = stm_state.shape
            grouped = stm_state.view(batch, self.groups, layers // self.groups, slots, dim)
            stm_means = grouped.mean(dim=2)  # [B, G, S, D]
        per_group = len(self.layers) // stm_means.shape[1]
        new_layers = [
            layer(stm_state[:, idx], stm_means[:, idx // per_group], encoded[:, idx], mask, rotary)
            for idx, layer in enumerate(self.layers)
        ]
        return torch.stack(new_layers, dim=1)  # [B, L, S, D]


# ------------------------------------------------------------------------------------------------------
# pre-trained base


class RxTPreTrainedModel(PreTrainedModel):
    config: RxTConfig
    config_class = RxTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RxTDecoderLayer", "RxTEncoderLayer", "RxTMemoryAttentionLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # flex attention stays off: transformers always calls torch.compile(flex_attention); on CPU (torch 2.13) that gives
    # NaN / wrong outputs for the memory cross-attention's shapes (q [2, 4, 7, 8], GQA k/v [2, 2, 8, 8]) where the
    # uncompiled flex_attention equals sdpa. The encoder's self-attention matched eager.
    _supports_flex_attn = False
    # packed rows through `position_ids` (block-causal self-attention; every sequence in a row reads that row's STM)
    # and attention functions registered with transformers' AttentionInterface (called like transformers' own)
    _supports_attention_backend = True
    # a decoding step with a static cache compiles as one graph (`torch.compile(fullgraph=True)`): the memory keys /
    # values sit in a static cache of `stm_size` slots beside it (`RxTModel.memory_cache_for`), nothing reads the host
    _can_compile_fullgraph = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config, and `auto_map` entries for every Auto class with the modeling files,
        so the folder loads through AutoConfig / AutoModel / AutoModelForCausalLM with `trust_remote_code=True`."""
        module = RxTModel.__module__.split(".")[-1]
        config_module = RxTConfig.__module__.split(".")[-1]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": f"{config_module}.RxTConfig",
            "AutoModel": f"{module}.RxTModel",
            "AutoModelForCausalLM": f"{module}.RxTForCausalLM",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        config = self.config
        if isinstance(module, RxTGateProjection):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            init.constant_(module.bias, config.residual_gate_init_bias)
        elif config.init_scheme == "fan_in" and isinstance(module, nn.Linear):
            bound = module.in_features**-0.5  # PyTorch's nn.Linear default (kaiming-uniform, a=sqrt(5))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif config.init_scheme == "fan_in" and isinstance(module, nn.Embedding):
            # token identity as large as a normed hidden state; the padding row zero. Built whole and written with
            # one `init.copy_`, which leaves a weight loaded from a checkpoint untouched.
            value = torch.empty_like(module.weight).normal_(mean=0.0, std=1.0)
            if module.padding_idx is not None:
                value[module.padding_idx] = 0
            init.copy_(module.weight, value)
        elif isinstance(module, RxTExpertsBase):  # every expert as the Linears it stacks: gate and up, down
            pairs = [(module.gate_up_proj, getattr(module, "gate_up_proj_bias", None))]
            pairs.append((module.down_proj, getattr(module, "down_proj_bias", None)))
            for weight, bias in pairs:
                if config.init_scheme == "fan_in":
                    bound = weight.shape[-1] ** -0.5  # 1 / sqrt(fan_in), as nn.Linear
                    init.uniform_(weight, -bound, bound)
                    if bias is not None:
                        init.uniform_(bias, -bound, bound)
                else:
                    init.normal_(weight, mean=0.0, std=config.initializer_range)
                    if bias is not None:
                        init.zeros_(bias)
        else:
            super()._init_weights(module)
        if isinstance(module, RxTResidualGate):
            if module.gate_type == "static":
                init.constant_(module.weight, config.residual_gate_init_bias)
            elif module.gate_type == "elementwise":
                init.normal_(module.weight, mean=0.0, std=config.initializer_range)
                if hasattr(module, "bias"):
                    init.constant_(module.bias, config.residual_gate_init_bias)
        elif isinstance(module, RxTMemoryAttention) and hasattr(module, "initial_stm"):
            init.normal_(module.initial_stm, mean=0.0, std=config.stm_init_std)
        elif isinstance(module, RxTGatedMemoryNorm):
            init.ones_(module.scale)
            init.constant_(module.gate, -2.0)  # mostly the raw memory at first
            if hasattr(module, "ema_rms"):
                init.ones_(module.ema_rms)
        elif isinstance(module, RxTMoE):
            for name in ("routed_bias", "shared_bias"):
                if hasattr(module, name):
                    init.zeros_(getattr(module, name))


# ------------------------------------------------------------------------------------------------------
# models


class RxTModel(RxTPreTrainedModel):
    """The RxT backbone: shared embedding, decoder, encoder, memory attention. `forward` runs the decoder."""

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.decoder = RxTDecoder(config)
        self.encoder = RxTEncoder(config)
        self.memory_attention = RxTMemoryAttention(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # --- memory -------------------------------------------------------------------------------------

    def init_memory(
        self,
        batch_size: int = 1,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A fresh STM `[batch_size, layers, slots, dim]`: `learned` (the trained initial state), `zeros` or
        `normal` (random, std `config.stm_init_std`). Defaults to `config.stm_init_mode`."""
        mode = mode or self.config.stm_init_mode
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"init_memory(batch_size={batch_size!r}): batch_size must be a positive integer.")
        shape = (batch_size, *self.config.stm_shape)
        reference = self.embed_tokens.weight
        if mode == "learned":
            if not hasattr(self.memory_attention, "initial_stm"):
                raise ValueError(
                    "init_memory(mode='learned') needs a model built with config.stm_init_mode='learned'; "
                    "use mode='zeros' or mode='normal'."
                )
            return self.memory_attention.initial_stm[None].expand(shape).clone()
        if mode == "zeros":
            return torch.zeros(shape, dtype=reference.dtype, device=reference.device)
        if mode == "normal":
            noise = torch.randn(shape, generator=generator, device=reference.device if generator is None else generator.device)
            return (noise * self.config.stm_init_std).to(device=reference.device, dtype=reference.dtype)
        raise ValueError(f"init_memory(mode={mode!r}): choose one of 'learned', 'zeros', 'normal'.")

    def check_stm_state(self, stm_state: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Validate an STM for a batch; a single state (batch 1) is broadcast to the batch."""
        layers, slots, dim = self.config.stm_shape
        expected = f"[batch={batch_size}, layers={layers}, slots={slots}, dim={dim}]"
        if not isinstance(stm_state, torch.Tensor):
            raise TypeError(f"stm_state must be a torch.Tensor of shape {expected}, got {type(stm_state).__name__}.")
        if stm_state.dim() != 4 or tuple(stm_state.shape[1:]) != (layers, slots, dim) or stm_state.shape[0] not in (
            1,
            batch_size,
        ):
            raise ValueError(
                f"stm_state has shape {list(stm_state.shape)}, expected {expected} (batch-first). Build one with "
                "model.init_memory(batch_size) or model.update_memory(...)."
            )
        reference = self.embed_tokens.weight
        if stm_state.dtype != reference.dtype:
            raise TypeError(
                f"stm_state has dtype {stm_state.dtype}, the model runs in {reference.dtype}: pass "
                f"stm_state.to({reference.dtype}) (shape {expected})."
            )
        if stm_state.device != reference.device:
            raise ValueError(
                f"stm_state is on {stm_state.device}, the model on {reference.device}: move it with "
                f"stm_state.to('{reference.device}')."
            )
        return stm_state.expand(batch_size, -1, -1, -1) if stm_state.shape[0] != batch_size else stm_state

    def check_input_ids(self, input_ids: torch.Tensor, argument: str = "input_ids"):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"{argument} must have shape [batch, length>0], got {list(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{argument} has {input_ids.shape[1]} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings} (one interaction); shorten the query/answer or use a "
                "model configured for longer interactions."
            )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RxTEncoderOutput:
        """Encode one interaction `[BOS][Q] query [A] answer [EOS]` -> every layer's states (the memory input)."""
        self.check_input_ids(input_ids)
        return self.encoder(self.embed_tokens(input_ids), attention_mask)

    def update_memory(
        self,
        stm_state: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New STM after one full interaction (encoder + memory attention); padded positions never reach memory."""
        batch = input_ids.shape[0]
        stm_state = self.init_memory(batch) if stm_state is None else self.check_stm_state(stm_state, batch)
        encoded = self.encode(input_ids, attention_mask).layer_states
        return self.memory_attention(stm_state, encoded, self.memory_write_mask(input_ids, attention_mask))

    def memory_write_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Which encoded positions memory attention may read: not padding, and with
        `config.memory_ignores_template_tokens` not the template tokens shared by every interaction."""
        if not self.config.memory_ignores_template_tokens:
            return attention_mask
        config = self.config
        template = [
            config.bos_token_id, config.eos_token_id, config.pad_token_id,
            config.query_token_id, config.answer_token_id, config.think_token_id,
        ]
        template = torch.tensor([t for t in template if t is not None], device=input_ids.device)
        content = ~torch.isin(input_ids, template)
        mask = content if attention_mask is None else content & attention_mask.bool()
        return mask.long()

    # --- decoding -----------------------------------------------------------------------------------

    def memory_cache_for(self, self_attention_cache: Cache) -> Cache:
        """An empty cache for the memory keys/values next to `self_attention_cache`: a `StaticCache` of `stm_size`
        slots beside a compileable (static) cache, so a compiled decoding step reads fixed-address tensors (as
        Whisper / BART pair two static caches), else a `DynamicCache`."""
        if self_attention_cache.is_compileable:
            return StaticCache(config=self.config, max_cache_len=self.config.stm_size)
        return DynamicCache(config=self.config)

    def follow_memory(self, cache: EncoderDecoderCache, stm_state: torch.Tensor | None) -> None:
        """Keep the cached memory keys/values those of `stm_state`: a cache filled from another STM tensor (an
        identity check, no device sync) drops them, so this step re-projects the new memory. No `stm_state` keeps the
        cached memory (a fresh one otherwise). A static memory cache is emptied in place (its tensors keep their
        addresses for compiled steps)."""
        if stm_state is None or getattr(cache, "rxt_stm_state", None) is stm_state:
            return
        if cache.is_updated:
            if cache.cross_attention_cache.is_compileable:
                cache.cross_attention_cache.reset()
            else:
                cache.cross_attention_cache = DynamicCache(config=self.config)
            cache.is_updated = {}
        cache.rxt_stm_state = stm_state

    def decode(
        self,
        memory: torch.Tensor,  # [B, L, S, D] any slot count (training reads encoder states as memory)
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_router_aux_loss: bool | None = None,
        output_router_logits: bool | None = None,
        output_attentions: bool = False,
    ) -> RxTModelOutput:
        """Run the decoder reading `memory` (no shape check on the slots: stages 1-2 pass encoder states).

        The MoE load-balancing loss (`aux_loss`, Mixtral's `load_balancing_loss_func` over every MoE layer's router
        logits and the unpadded tokens; 0 for a dense decoder) is computed in training mode, with
        `output_router_aux_loss=True` or with `output_router_logits` (default `config.output_router_logits`), which
        also returns the logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if output_router_aux_loss is None:
            output_router_aux_loss = self.training
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs eager attention: attn_implementation="
                f"'{self.config._attn_implementation}' does not return attention weights. Load the model with "
                "attn_implementation='eager' or call model.set_attn_implementation('eager')."
            )
        hidden, all_hidden, router_logits, self_attentions, cross_attentions = self.decoder(
            inputs_embeds,
            memory,
            attention_mask=attention_mask,
            memory_attention_mask=memory_attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits or output_router_aux_loss,
            output_attentions=output_attentions,
        )
        aux_loss = None
        if output_router_logits or output_router_aux_loss:
            aux_loss = inputs_embeds.new_zeros((), dtype=torch.float32)
            if router_logits is not None:
                length = inputs_embeds.shape[1]
                aux_loss = load_balancing_loss_func(
                    router_logits,
                    self.config.num_experts,
                    self.config.num_experts_per_token,
                    attention_mask[:, -length:] if attention_mask is not None else None,
                )
        return RxTModelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            attentions=self_attentions,
            cross_attentions=cross_attentions,
            router_logits=router_logits if output_router_logits else None,
            aux_loss=aux_loss,
            **{CACHE_FIELD: past_key_values},
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stm_state: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_aux_loss: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> RxTModelOutput:
        r"""
        stm_state (`torch.Tensor` of shape `[batch, layers, slots, dim]`, *optional*):
            The conversation's Short-Term Memory; absent means a fresh memory (`init_memory`). Continuing a cache
            with another `stm_state` tensor than the one it was filled with re-projects the memory keys/values.
        output_attentions (`bool`, *optional*):
            Return the self-attention (`attentions`) and memory cross-attention (`cross_attentions`) weights of every
            layer; needs `attn_implementation="eager"`. Defaults to `config.output_attentions`.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits and the load-balancing loss (`aux_loss`); defaults to
            `config.output_router_logits`.
        output_router_aux_loss (`bool`, *optional*):
            Compute the MoE load-balancing loss (`aux_loss`) without returning the logits; defaults to
            `self.training`.
        cache (`Cache`, *optional*):
            The name transformers >= 5.24 gives `past_key_values`; either name is accepted.
        return_dict (`bool`, *optional*):
            `False` returns a tuple (default `config.return_dict`).
        """
        past_key_values = pick_cache(past_key_values, cache)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch = reference.shape[0]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        # a static cache's length is a tensor: checking it is a host read, which a compiled step skips (the eager
        # prefill is checked; a compiled step never writes past the static cache, sized by the caller)
        if not torch.compiler.is_compiling() and past_length + reference.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"The interaction has {int(past_length) + reference.shape[1]} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; shorten the query or lower max_new_tokens."
            )
        given_stm_state = stm_state
        stm_state = self.init_memory(batch) if stm_state is None else self.check_stm_state(stm_state, batch)

        if use_cache:
            if past_key_values is None:
                past_key_values = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
            elif not isinstance(past_key_values, EncoderDecoderCache):
                past_key_values = EncoderDecoderCache(past_key_values, self.memory_cache_for(past_key_values))
            self.follow_memory(past_key_values, given_stm_state)
        else:
            past_key_values = None

        return self.decode(
            stm_state,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_aux_loss=output_router_aux_loss,
            output_router_logits=output_router_logits,
        )

    # --- introspection --------------------------------------------------------------------------------

    def num_parameters_by_component(self, lm_head: nn.Module | None = None) -> dict[str, int]:
        """Parameter counts as the RxT model cards give them: the shared embedding counts inside both the
        decoder and the encoder, the decoder includes the LM head, `decoder_active` counts only the top-k
        experts. `total` counts every parameter once."""

        def count(module):
            return sum(p.numel() for p in module.parameters())

        embedding = count(self.embed_tokens)
        head = 0
        if lm_head is not None and lm_head.weight is not self.embed_tokens.weight:
            head = count(lm_head)
        decoder = count(self.decoder)
        inactive = sum(
            count(layer.feed_forward) - layer.feed_forward.active_parameters()
            for layer in self.decoder.layers
            if layer.is_moe
        )
        initial_stm = self.memory_attention.initial_stm.numel() if hasattr(self.memory_attention, "initial_stm") else 0
        return {
            "embedding": embedding,
            "decoder": decoder + embedding + head,
            "decoder_active": decoder - inactive + embedding + head,
            "encoder": count(self.encoder) + embedding,
            "memory_attention": count(self.memory_attention) - initial_stm,
            "initial_stm": initial_stm,
            "total": count(self) + head,
        }


class RxTForCausalLM(RxTPreTrainedModel, GenerationMixin):
    """RxT with a language-modelling head: `generate()` answers a query reading the STM.

    Example:

    ```python
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny")).eval()
    >>> stm = model.init_memory(batch_size=1)
    >>> query = torch.tensor([[0, 5, 42, 43, 6]])  # [BOS][Q] ... [A]
    >>> answer = model.generate(query, stm_state=stm, max_new_tokens=8, do_sample=False)
    >>> stm = model.update_memory(stm, answer)  # the whole interaction goes into memory
    ```

    Gradients: `forward` runs only the decoder (embedding, self-attention, memory cross-attention, feed-forward,
    head). The encoder and the memory-attention network get their gradients through `update_memory` (the memory
    an interaction writes is read by the next turn's `forward`), so transformers' gradient-checkpointing common tests
    that expect every parameter to get a gradient from one `forward` do not apply, and DDP runs with
    `ddp_find_unused_parameters=True` (the default of `RxTTrainingArguments`).

    Outputs and generation: `output_attentions` (eager attention only; sdpa is refused with the fix) returns the
    self-attention weights as `attentions` and the memory cross-attention weights as `cross_attentions`;
    `generate(return_dict_in_generate=True, output_attentions=True)` collects `attentions` per step (transformers
    collects `cross_attentions` for encoder-decoder models only). Greedy, sampling, beam search, beam sampling,
    assisted and prompt-lookup decoding and `cache_implementation="static"` read `stm_state` and match the no-cache
    reference (tests/test_hf_contract.py). Beside a `StaticCache` the memory keys/values go to a static cache of
    `stm_size` slots, and a one-token decoding step compiles as one graph (`torch.compile(model.forward,
    fullgraph=True)`, dense and MoE decoders; `_can_compile_fullgraph`).

    Packed sequences: several sequences in one row with `position_ids` restarting at 0 for each, no
    `attention_mask` and `use_cache=False` get transformers' block-causal self-attention mask; each token's logits
    equal the padded batch's. The memory is per batch row, so every sequence packed into a row reads that row's STM
    (tests/test_packed_sequences.py). Attention functions registered with transformers' `AttentionInterface` are
    called like transformers' own (`dropout`, `scaling`, `is_causal`; the module has `layer_idx`,
    `num_key_value_groups`, `is_causal`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.model = RxTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def init_memory(self, batch_size: int = 1, mode: str | None = None, generator=None) -> torch.Tensor:
        return self.model.init_memory(batch_size, mode=mode, generator=generator)

    def update_memory(self, stm_state, input_ids, attention_mask=None) -> torch.Tensor:
        return self.model.update_memory(stm_state, input_ids, attention_mask)

    def num_parameters_by_component(self) -> dict[str, int]:
        return self.model.num_parameters_by_component(lm_head=self.lm_head)

    # --- talking to the model -------------------------------------------------------------------------

    def interact(self, query, stm_state=None, tokenizer=None, attention_mask=None, **generate_kwargs):
        """Answer one query (text, list of texts, or ids `[BOS][Q] ... [A]`) and update memory.

        Yields [`InteractionEvent`]s: `"token"` per generated step (streaming), `"answer"` when the answer is
        complete, then `"memory_update_start"` and `"memory_update_end"` (with the new `stm_state`). Batches of
        queries of different lengths are left-padded; each row reads its own STM row.
        """
        return stream_interaction(self, query, stm_state, tokenizer, attention_mask, **generate_kwargs)

    def memory_from_prompt(self, query: str, answer: str = "", tokenizer=None, stm_state=None) -> torch.Tensor:
        """Initial memory from a "system prompt" interaction (query, optional answer)."""
        return memory_from_prompt(self, query, answer, tokenizer, stm_state)

    def save_memory(self, stm_state: torch.Tensor, path) -> None:
        """Export an STM to a safetensors file (with the memory geometry as metadata)."""
        save_memory(stm_state, path, self.config)

    def load_memory(self, path) -> torch.Tensor:
        """Import an STM saved by `save_memory`; a state of another geometry is refused."""
        return load_memory(path, self)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stm_state: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_aux_loss: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> RxTCausalLMOutput:
        r"""
        stm_state (`torch.Tensor` of shape `[batch, layers, slots, dim]`, *optional*):
            The conversation's Short-Term Memory; absent means a fresh memory.
        labels (`torch.LongTensor` of shape `[batch, length]`, *optional*):
            Next-token targets (shifted inside), `-100` ignored.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits and the load-balancing loss (`aux_loss`); defaults to
            `config.output_router_logits`.
        output_router_aux_loss (`bool`, *optional*):
            Compute the MoE load-balancing loss (`aux_loss`, added to `loss` times `config.router_aux_loss_coef`);
            defaults to training mode or `labels` given.
        return_dict (`bool`, *optional*):
            `False` returns a tuple (default `config.return_dict`).
        """
        if output_router_aux_loss is None:
            output_router_aux_loss = self.training or labels is not None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            stm_state=stm_state,
            position_ids=position_ids,
            past_key_values=pick_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
            output_router_aux_loss=output_router_aux_loss,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.config.decoder_feed_forward == "moe" and outputs.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
        return RxTCausalLMOutput(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            router_logits=outputs.router_logits,
            **{CACHE_FIELD: output_cache(outputs)},
        )


__all__ = [
    "RxTPreTrainedModel",
    "RxTModel",
    "RxTForCausalLM",
    "RxTModelOutput",
    "RxTCausalLMOutput",
    "RxTEncoderOutput",
    "CACHE_FIELD",
    "output_cache",
]
