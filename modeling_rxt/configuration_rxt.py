"""Reactive Transformer (RxT) configuration.

One config describes all three RxT components (decoder, encoder, memory attention) and the Short-Term
Memory (STM) they share. Unlike a Llama config it carries three attention settings (self-attention,
memory cross-attention, memory attention), a decoder feed-forward that may be Mixture-of-Experts, and
the STM shape / update rule.

Attention heads: `*_attention_heads` splits `hidden_size` into head dims; `*_query_heads` and
`*_key_value_heads` choose how many of those heads are used for queries and keys/values. So
MHA (q = kv = heads), GQA (q = heads > kv), MQA (kv = 1), SQA (q < heads), symmetric sSQA
(q = kv = heads / 2) and extreme xSQA (q = kv <= heads / 4) are all settings of the same module.
"""

import copy

from transformers import PreTrainedConfig

MEMORY_ATTENTION_VARIANTS = ("simple", "self", "interlayer", "gated-self-interlayer", "self-interlayer")
# "none": plain residual `old + update`; "replace": no residual, the update replaces the old state
GATE_TYPES = ("static", "elementwise", "linear", "none", "replace")
GATE_ACTIVATIONS = ("sigmoid", "tanh")
GATE_GRANULARITIES = ("slot", "layer", "scalar")
GATE_SLOT_STATUSES = ("mean", "linear")
NORM_TYPES = ("rms", "layer")
FINAL_NORM_TYPES = ("rms", "layer", "none")
MEMORY_NORM_TYPES = ("rms", "gated-layer", "gated-rms", "gated-ema-rms")
MEMORY_NORM_SCALES = ("feature", "slot")
ROUTER_SOFTMAX = ("top_k", "all")
ACTIVATIONS = ("silu", "swish", "gelu", "relu", "sigmoid", "linear")
STM_INIT_MODES = ("learned", "zeros", "normal")
INIT_SCHEMES = ("fan_in", "normal")
FEED_FORWARD_TYPES = ("moe", "dense")
ATTENTION_ROLES = ("self_attention", "memory_cross_attention", "memory_attention")
# rope types of `rope_parameters`: "default" (the original RoPE) and transformers' `ROPE_INIT_FUNCTIONS` with scaling
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")

# Named architectures. "rxt-alpha-micro" follows the public RxT-Alpha Micro model card exactly.
PRESETS: dict[str, dict] = {
    # A few thousand parameters per component: for tests.
    "rxt-tiny": dict(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_query_heads=2,
        num_key_value_heads=2,
        decoder_feed_forward="moe",
        num_experts=4,
        num_experts_per_token=2,
        decoder_intermediate_size=64,
        encoder_intermediate_size=64,
        stm_size=8,
        max_position_embeddings=64,
        memory_attention_variant="interlayer",
        residual_gate_type="linear",
        residual_gate_granularity="slot",
    ),
    # RxT-Alpha Micro: dim 128, 6 layers, 8 heads with symmetric SQA 4/8 everywhere, decoder MoE 12x SwiGLU-256
    # top-2, encoder SwiGLU-384, interlayer memory attention, linear sigmoid per-slot gate, 7.5k vocab,
    # 256-token interactions, STM 6 x 256 slots.
    "rxt-alpha-micro": dict(
        vocab_size=7500,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_query_heads=4,
        num_key_value_heads=4,
        decoder_feed_forward="moe",
        num_experts=12,
        num_experts_per_token=2,
        decoder_intermediate_size=256,
        encoder_intermediate_size=384,
        stm_size=256,
        max_position_embeddings=256,
        memory_attention_variant="interlayer",
        residual_gate_type="linear",
        residual_gate_activation="sigmoid",
        residual_gate_granularity="slot",
    ),
    # Twice the width and a third more depth than Micro, same recipe (~60M parameters, ~20M active): the
    # next size that still trains on one consumer GPU in hours, with 512-token interactions and STM.
    "rxt-alpha-mini": dict(
        vocab_size=16000,
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_query_heads=8,
        num_key_value_heads=8,
        decoder_feed_forward="moe",
        num_experts=16,
        num_experts_per_token=2,
        num_shared_experts=1,
        decoder_intermediate_size=512,
        encoder_intermediate_size=768,
        stm_size=512,
        max_position_embeddings=512,
        memory_attention_variant="interlayer",
        residual_gate_type="linear",
        residual_gate_activation="sigmoid",
        residual_gate_granularity="slot",
    ),
}


class RxTConfig(PreTrainedConfig):
    r"""
    Configuration of a Reactive Transformer ([`RxTModel`], [`RxTForCausalLM`]).

    Special tokens follow the RxT interaction template `[BOS][Q] query [A] answer [EOS]`
    (`[T]` opens a reasoning block before `[A]`).

    Example:

    ```python
    >>> from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    >>> config = RxTConfig.from_preset("rxt-tiny")
    >>> model = RxTForCausalLM(config)
    ```
    """

    model_type = "rxt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 7500
    hidden_size: int = 128
    num_hidden_layers: int = 6
    hidden_act: str = "silu"
    max_position_embeddings: int = 256
    # RoPE in transformers' format: `{"rope_type": "default", "rope_theta": 10000.0}`. A top-level `rope_theta`
    # (argument, or a config.json saved before this field existed) is moved in here; `config.rope_theta` reads it.
    # Context-extension scalings are transformers' own (`ROPE_INIT_FUNCTIONS`, computed for each attention role's
    # head dim) with transformers' keys: "linear" and "dynamic" (`factor`), "yarn" (`factor`,
    # `original_max_position_embeddings`, optional `attention_factor` / `beta_fast` / `beta_slow`), "llama3"
    # (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`), "longrope"
    # (`short_factor` / `long_factor`: head_dim / 2 numbers, so one head dim for all roles). Example:
    # `{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}` with
    # `max_position_embeddings=1024`. Keys are checked by transformers' `validate_rope`, values by RxT.
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    # "fan_in": every Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's own default) and a unit-variance
    # embedding; "normal": every weight N(0, initializer_range), as Llama. Measured on 2-turn recall (2.8M
    # parameters, 400 steps from scratch): "fan_in" 81% recall, "normal" 1% (the 0.02-scale token embedding is
    # drowned in the residual stream, so memory never carries which word was said).
    init_scheme: str = "fan_in"
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # RMSNorm on each head's queries and keys in the two memory attentions (decoder -> STM, STM -> encoded
    # data): the content-only match of a memory read is then a cosine, sharp from the first step whatever the
    # scale of the states.
    memory_qk_norm: bool = True
    # RoPE in the two memory attentions, as the RxT paper has it: on the decoder's queries in memory
    # cross-attention and on the encoded tokens' keys in memory attention (memory slots themselves never carry
    # positions). False makes both reads purely content-based (no rotation by the reader's / token's position).
    memory_rope: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False

    # decoder self-attention (and the encoder's bidirectional self-attention)
    num_attention_heads: int = 8
    num_query_heads: int | None = None
    num_key_value_heads: int | None = None
    # decoder memory cross-attention (None: same as self-attention)
    memory_cross_attention_heads: int | None = None
    memory_cross_attention_query_heads: int | None = None
    memory_cross_attention_key_value_heads: int | None = None
    # memory attention network (None: same as self-attention)
    memory_attention_heads: int | None = None
    memory_attention_query_heads: int | None = None
    memory_attention_key_value_heads: int | None = None

    # decoder feed-forward: Mixture-of-Experts of SwiGLU experts, or one dense SwiGLU
    decoder_feed_forward: str = "moe"
    decoder_intermediate_size: int = 256
    num_experts: int = 12
    num_experts_per_token: int = 2
    num_shared_experts: int = 0
    # load-balancing loss as transformers' MoE models compute it (`load_balancing_loss_func`: Switch Transformer's
    # `E * sum_e(f_e * p_e)` over all layers' tokens, f counting every one of the top-k assignments), added to the LM
    # loss with this weight
    router_aux_loss_coef: float = 0.01
    # return every MoE layer's router logits (`router_logits`) and the load-balancing loss, as Mixtral does
    output_router_logits: bool = False
    # encoder feed-forward (dense SwiGLU)
    encoder_intermediate_size: int = 384

    # Short-Term Memory: [layers = num_hidden_layers, stm_size slots, hidden_size]
    stm_size: int = 256
    stm_init_mode: str = "learned"
    stm_init_std: float = 0.02
    memory_attention_variant: str = "interlayer"
    residual_gate_type: str = "linear"
    residual_gate_activation: str = "sigmoid"
    residual_gate_granularity: str = "slot"
    residual_gate_init_bias: float = -1.0
    # keep the template tokens ([BOS] [EOS] [PAD] [Q] [A] [T]), identical in every interaction, out of memory writes
    memory_ignores_template_tokens: bool = False

    # ----------------------------------------------------------------------------------------------
    # Switches that reproduce what another implementation computes (set by `rxt convert`, see
    # docs/conversion.md). The defaults are this project's own architecture.
    # norms of the decoder / encoder layers ("rms" or "layer": LayerNorm with bias, eps `layer_norm_eps`)
    norm_type: str = "rms"
    layer_norm_eps: float = 1e-5
    # norm after the last decoder layer, before the LM head ("rms", "layer" or "none")
    decoder_final_norm: str = "rms"
    # norms of the STM inside the memory attention network: "rms" (RMSNorm), or a gated blend
    # `sigmoid(g) * scale * normalise(x) + (1 - sigmoid(g)) * x` with normalise = LayerNorm ("gated-layer"),
    # `x / sqrt(rms(x) + eps)` ("gated-rms") or `x / sqrt(ema_rms + eps)` with stored per-slot statistics
    # ("gated-ema-rms"; its scale per "feature" or per "slot")
    memory_norm_type: str = "rms"
    memory_norm_eps: float = 1e-6
    memory_norm_scale: str = "feature"
    # output-projection bias of self-attention and memory cross-attention (None: `attention_bias`) and of the
    # memory attention network (None: as the others)
    attention_output_bias: bool | None = None
    memory_attention_output_bias: bool | None = None
    # query / key-value heads of the first attention of the "self" / interlayer variants (None: memory attention's)
    memory_pre_attention_query_heads: int | None = None
    memory_pre_attention_key_value_heads: int | None = None
    # feed-forward biases (dense SwiGLU; routed experts; shared experts) and MoE details
    mlp_bias: bool = False
    moe_expert_bias: bool = False
    moe_shared_expert_bias: bool = False
    # a learned vector added to the routed experts' weighted sum / to the shared experts' output
    moe_routed_output_bias: bool = False
    moe_shared_output_bias: bool = False
    # intermediate size of the shared experts (None: decoder_intermediate_size)
    moe_shared_intermediate_size: int | None = None
    # softmax-gated mix of the shared experts (instead of their sum), for more than one shared expert
    moe_shared_expert_gate: bool = False
    # scale routed weights by k / (k + shared) and the shared output by shared / (k + shared)
    moe_weighted_shared_experts: bool = False
    # "top_k": softmax over the k chosen router logits; "all": softmax over every expert, top-k of the
    # probabilities, renormalised by their sum (+1e-9)
    moe_router_softmax: str = "top_k"
    lm_head_bias: bool = False
    # interlayer variants: the mean STM is taken over groups of consecutive layers (1: all layers)
    memory_interlayer_groups: int = 1
    # gate after the first attention of the "self" / interlayer variants (None: residual_gate_type)
    memory_pre_gate_type: str | None = None
    # per-slot status a dynamic gate reads: the slot's mean over features, or a learned projection to one value
    residual_gate_slot_status: str = "mean"
    # bias of the elementwise gate
    residual_gate_bias: bool = True

    # special tokens (ids of the project's tokenizer: [BOS] [EOS] [PAD] [UNK] [MASK] [Q] [A] [T])
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = 2
    unk_token_id: int | None = 3
    mask_token_id: int | None = 4
    query_token_id: int | None = 5
    answer_token_id: int | None = 6
    think_token_id: int | None = 7

    def __post_init__(self, **kwargs):
        for role in ("memory_cross_attention", "memory_attention"):
            if getattr(self, f"{role}_heads") is None:
                setattr(self, f"{role}_heads", self.num_attention_heads)
            if getattr(self, f"{role}_query_heads") is None:
                setattr(self, f"{role}_query_heads", self.num_query_heads or getattr(self, f"{role}_heads"))
            if getattr(self, f"{role}_key_value_heads") is None:
                setattr(
                    self,
                    f"{role}_key_value_heads",
                    self.num_key_value_heads or getattr(self, f"{role}_query_heads"),
                )
        if self.num_query_heads is None:
            self.num_query_heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_query_heads
        if self.memory_pre_attention_query_heads is None:
            self.memory_pre_attention_query_heads = self.memory_attention_query_heads
        if self.memory_pre_attention_key_value_heads is None:
            self.memory_pre_attention_key_value_heads = self.memory_attention_key_value_heads
        super().__post_init__(**kwargs)
        self._validate()

    # ----------------------------------------------------------------------------------------------
    # validation: every error names the field, the value and the fix
    def _validate(self):
        def fail(field, value, fix):
            raise ValueError(f"RxTConfig.{field}={value!r} is invalid: {fix}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "stm_size", "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, getattr(self, field), "it must be a positive integer.")
        for role, (heads, query, kv) in self.attention_heads().items():
            prefix = "" if role == "self_attention" else f"{role}_"
            heads_field = "num_attention_heads" if role == "self_attention" else f"{role}_heads"
            query_field = "num_query_heads" if role == "self_attention" else f"{prefix}query_heads"
            kv_field = "num_key_value_heads" if role == "self_attention" else f"{prefix}key_value_heads"
            if heads <= 0 or self.hidden_size % heads != 0:
                fail(heads_field, heads, f"hidden_size={self.hidden_size} must be divisible by it.")
            if (self.hidden_size // heads) % 2 != 0:
                fail(heads_field, heads, "the head dim (hidden_size / heads) must be even for rotary embeddings.")
            if not 0 < query <= heads:
                fail(query_field, query, f"use between 1 and {heads_field}={heads} query heads.")
            if kv <= 0 or query % kv != 0:
                fail(kv_field, kv, f"key/value heads must divide {query_field}={query}.")
        choices = {
            "decoder_feed_forward": FEED_FORWARD_TYPES,
            "memory_attention_variant": MEMORY_ATTENTION_VARIANTS,
            "residual_gate_type": GATE_TYPES,
            "residual_gate_activation": GATE_ACTIVATIONS,
            "residual_gate_granularity": GATE_GRANULARITIES,
            "residual_gate_slot_status": GATE_SLOT_STATUSES,
            "stm_init_mode": STM_INIT_MODES,
            "init_scheme": INIT_SCHEMES,
            "norm_type": NORM_TYPES,
            "decoder_final_norm": FINAL_NORM_TYPES,
            "memory_norm_type": MEMORY_NORM_TYPES,
            "memory_norm_scale": MEMORY_NORM_SCALES,
            "moe_router_softmax": ROUTER_SOFTMAX,
            "hidden_act": ACTIVATIONS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                fail(field, getattr(self, field), f"choose one of {allowed}.")
        if self.memory_pre_gate_type is not None and self.memory_pre_gate_type not in GATE_TYPES:
            fail("memory_pre_gate_type", self.memory_pre_gate_type, f"choose one of {GATE_TYPES} or None.")
        if self.residual_gate_slot_status == "linear" and self.residual_gate_granularity == "layer":
            fail(
                "residual_gate_slot_status",
                "linear",
                "a learned slot status needs residual_gate_granularity='slot' or 'scalar' (granularity 'layer' gates "
                "each feature).",
            )
        groups = self.memory_interlayer_groups
        if not isinstance(groups, int) or groups < 1 or self.num_hidden_layers % groups != 0:
            fail(
                "memory_interlayer_groups",
                groups,
                f"use a positive divisor of num_hidden_layers={self.num_hidden_layers} (groups of consecutive layers).",
            )
        heads = self.memory_attention_heads
        query = self.memory_pre_attention_query_heads
        kv = self.memory_pre_attention_key_value_heads
        if not 0 < query <= heads:
            fail("memory_pre_attention_query_heads", query, f"use between 1 and memory_attention_heads={heads}.")
        if kv <= 0 or query % kv != 0:
            fail("memory_pre_attention_key_value_heads", kv, f"key/value heads must divide {query} query heads.")
        self._validate_rope_parameters(fail)
        for field in ("layer_norm_eps", "memory_norm_eps"):
            if not getattr(self, field) > 0:
                fail(field, getattr(self, field), "it must be a positive number.")
        if self.moe_shared_intermediate_size is not None and self.moe_shared_intermediate_size <= 0:
            fail("moe_shared_intermediate_size", self.moe_shared_intermediate_size, "use a positive integer or None.")
        if self.decoder_feed_forward == "moe":
            if self.num_experts < 1:
                fail("num_experts", self.num_experts, "use at least 1 expert.")
            if not 0 < self.num_experts_per_token <= self.num_experts:
                fail(
                    "num_experts_per_token",
                    self.num_experts_per_token,
                    f"it must be between 1 and num_experts={self.num_experts}.",
                )
        if self.num_shared_experts < 0:
            fail("num_shared_experts", self.num_shared_experts, "it cannot be negative.")
        for field in ("decoder_intermediate_size", "encoder_intermediate_size"):
            if getattr(self, field) <= 0:
                fail(field, getattr(self, field), "it must be a positive integer.")
        if self.stm_init_std < 0:
            fail("stm_init_std", self.stm_init_std, "it cannot be negative.")
        token_fields = [name for name in self.special_token_fields() if getattr(self, name) is not None]
        for name in token_fields:
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                fail(name, value, f"token ids must lie in [0, vocab_size={self.vocab_size}).")

    def _validate_rope_parameters(self, fail):
        """`rope_parameters`: a rope type RxT computes, the keys transformers requires for it (its own
        `validate_rope`, which only warns about bad values) and values its RoPE functions can compute with."""
        params = self.rope_parameters

        def bad(reason):
            fail("rope_parameters", params, reason)

        def number(key, minimum, above=False, optional=False):
            value = params.get(key)
            if optional and value is None:
                return
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or value < minimum or value == minimum and above:
                bad(f"{key}={value!r} must be a number {'>' if above else '>='} {minimum} for rope_type={rope_type!r}.")

        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            bad(f"rope_type={rope_type!r} is not supported by RxT: choose one of {ROPE_TYPES}.")
        try:
            self.validate_rope()  # transformers' check of the keys each rope type requires
        except (KeyError, TypeError) as error:
            bad(f"{error.args[0]}; add or fix them (transformers' `RopeParameters` lists each rope type's keys).")
        number("rope_theta", 0, above=True)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            bad("RxT rotates whole heads: remove partial_rotary_factor (or set it to 1.0).")
        if rope_type == "default":
            return
        number("factor", 1, optional=rope_type in ("yarn", "longrope"))  # those two may derive it from the lengths
        number("attention_factor", 0, above=True, optional=True)
        if rope_type in ("yarn", "longrope", "llama3"):
            original = params["original_max_position_embeddings"]
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                bad(f"original_max_position_embeddings={original!r} must be a positive integer.")
        if rope_type == "llama3":
            number("low_freq_factor", 0, above=True)
            number("high_freq_factor", 0, above=True)
            if params["high_freq_factor"] <= params["low_freq_factor"]:
                bad("llama3 needs high_freq_factor > low_freq_factor.")
        if rope_type == "longrope":  # one factor per rotated frequency, so every role must rotate as many
            head_dims = sorted({self.hidden_size // heads for heads, _, _ in self.attention_heads().values()})
            if len(head_dims) > 1:
                bad(
                    f"longrope needs one head dim in every attention role, got {head_dims}: give the roles the same "
                    "number of heads (`*_attention_heads`) or choose another rope_type."
                )
            half = head_dims[0] // 2
            for key in ("short_factor", "long_factor"):
                factors = params[key]
                if not isinstance(factors, list) or len(factors) != half:
                    bad(f"{key} must be a list of head_dim / 2 = {half} numbers.")
                for value in factors:
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        bad(f"{key} must be a list of head_dim / 2 = {half} numbers.")

    @staticmethod
    def special_token_fields() -> tuple[str, ...]:
        return (
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "unk_token_id",
            "mask_token_id",
            "query_token_id",
            "answer_token_id",
            "think_token_id",
        )

    def attention_heads(self) -> dict[str, tuple[int, int, int]]:
        """`{role: (heads for the split, query heads, key/value heads)}` for the three attention roles."""
        return {
            "self_attention": (self.num_attention_heads, self.num_query_heads, self.num_key_value_heads),
            "memory_cross_attention": (
                self.memory_cross_attention_heads,
                self.memory_cross_attention_query_heads,
                self.memory_cross_attention_key_value_heads,
            ),
            "memory_attention": (
                self.memory_attention_heads,
                self.memory_attention_query_heads,
                self.memory_attention_key_value_heads,
            ),
        }

    def heads_for(self, role: str) -> tuple[int, int, int]:
        """`(heads for the split, query heads, key/value heads)` of one attention role: the three roles of
        :meth:`attention_heads` or "memory_pre_attention" (the first attention of the self / interlayer variants)."""
        if role == "memory_pre_attention":
            return (
                self.memory_attention_heads,
                self.memory_pre_attention_query_heads,
                self.memory_pre_attention_key_value_heads,
            )
        return self.attention_heads()[role]

    def output_bias_for(self, role: str) -> bool:
        """Whether the output projection of an attention role has a bias."""
        bias = self.attention_bias if self.attention_output_bias is None else self.attention_output_bias
        if role in ("memory_attention", "memory_pre_attention") and self.memory_attention_output_bias is not None:
            return self.memory_attention_output_bias
        return bias

    @property
    def rope_theta(self) -> float:
        """RoPE base (`rope_parameters["rope_theta"]`); kept readable for code written before `rope_parameters`."""
        return (self.rope_parameters or {}).get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float):
        self.rope_parameters = {**(self.rope_parameters or {"rope_type": "default"}), "rope_theta": float(value)}

    @property
    def stm_shape(self) -> tuple[int, int, int]:
        """Shape of one conversation's STM: `(layers, slots, hidden_size)`."""
        return (self.num_hidden_layers, self.stm_size, self.hidden_size)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RxTConfig":
        """Build a named architecture (`rxt-tiny`, `rxt-alpha-micro`, `rxt-alpha-mini`), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown RxT preset name={name!r}: choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


__all__ = ["RxTConfig", "PRESETS"]
