"""Convert a checkpoint of the reference RxT implementation (the `rxlm` package, 0.3.x) into a folder of this project.

The reference publishes `PyTorchModelHubMixin` folders (`config.json` with the constructor arguments + one
`model.safetensors`): a whole `RxTAlpha` / `RxTBeta` (nested `decoder_config`, `encoder_config`,
`memory_attention_config`, `tokenizer_config`), or one folder per component (decoder, encoder, memory attention),
plus a `tokenizer.json`. This module reads either layout and writes a folder that loads with
`AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dest)`,
computing what the reference computes (the config switches listed in `docs/conversion.md`).

What it does that the reference's own loader does not:

- every tensor is accounted for: a missing tensor, a shape that does not follow from `config.json` or a tensor
  nobody reads is an error naming the file, the key and what was expected (the reference loads with
  `strict=False`, so missing weights silently stay random there);
- the memory-attention network is converted as it was *built*: rxlm 0.3.92's `RxTAlpha` builds the
  self-interlayer network for `memory_attention_variant='interlayer'` (and for any name but
  'grouped-self-interlayer'), and the tensors in the file decide;
- RoPE: the reference rotates interleaved pairs; this project rotates halves. The rotated projections are
  permuted so the scores are the same (`rope_layout`: "interleaved" for rxlm >= 0.3.40, "legacy" for older
  rxlm and RxNN, whose rotation wrote its output as two halves; `config.json` does not record which);
- persistent RoPE buffers and other tensors the reference never reads in inference (the encoder's unused memory
  cross-attention, the STM buffers, unused slot-status projections) are dropped, each kind named in the notes;
- DEST is written into a temporary folder beside it and renamed at the end: it is never left half written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROPE_LAYOUTS = ("interleaved", "legacy")
INITIAL_STM_MODES = ("normal", "saved", "zeros")
MEMORY_ATTENTION_VARIANTS = ("interlayer", "self-interlayer", "grouped-self-interlayer")
MODEL_LICENCE_URL = "https://github.com/RxAI-dev/rxlm/blob/main/MODELS_LICENSE"
REFERENCE_REPOSITORY = "https://github.com/RxAI-dev/rxlm"
# The notice the reference's model licence (RAML v1.0, section "Attribution") requires in every derivative.
ATTRIBUTION_NOTICE = "This model is based on the Reactive Transformer Architecture (Patent #P.453260) by Reactive AI."

# Constructor defaults of rxlm 0.3.92 (facts read from its signatures): `config.json` holds only the arguments
# that were passed, so an absent key means this value.
# fmt: off
COMPONENT_DEFAULTS: dict = {
    "num_layers": 12, "vocab_size": 20000, "embed_dim": 512, "ff_dim": 1536, "att_heads": 16, "seq_len": 1024,
    "stm_size": 1024, "use_flash_attention": False, "use_gated": True, "ff_activation": "swish", "ff_dropout": 0.0,
    "att_dropout": 0.0, "use_rms_norm": True, "att_groups": 1, "use_moe": False, "num_experts": 1,
    "num_shared_experts": 1, "shared_expert_dim": None, "moe_top_k": 1, "self_att_type": "sqa",
    "cross_att_type": "sqa", "att_query_groups": None, "cross_att_groups": None, "cross_att_query_groups": None,
    "use_head_norm": False, "init_identity_norm": False, "skip_memory_cross_attention": False,
    "stateless_layers_config": None, "final_stateless_layers_config": None, "dense_layer_dim": 1536,
    "attn_layer_types": None, "stateless_attn_layer_types": None, "final_stateless_attn_layer_types": None,
    "linear_attn_mode": "chunk", "linear_attn_expand_k": 0.5, "linear_attn_expand_v": 1.0,
    "linear_attn_use_short_conv": False, "linear_attn_conv_size": 4, "linear_attn_use_gate": True,
    "linear_attn_norm_eps": 1e-5, "linear_attn_heads": None, "use_nope": False, "head_norm_type": "layer_norm",
    "router_amp": False, "router_dtype": "float32", "use_vectorized_moe": True, "vectorized_moe_from_legacy": False,
    "moe_grouped_gemm": True, "moe_bias_mode": "global", "moe_shared_experts_bias_mode": "local",
    "moe_use_weighted_shared_experts": False, "use_gated_attention": False, "gated_attention_activation": "sigmoid",
    "use_gated_cross_attention": None, "use_attention_output_bias": True, "legacy_stm_in_encoder": False,
    "moe_use_cutlass_grouped_gemm": True, "rope_base": 10000,
}
MEMORY_DEFAULTS: dict = {
    "num_layers": 12, "num_groups": 1, "embed_dim": 512, "att_heads": 16, "seq_len": 1024, "stm_size": 1024,
    "use_flash_attention": False, "att_dropout": 0.0, "att_groups": 1, "att_type": "sqa", "att_experts": None,
    "att_query_experts": None, "att_query_groups": None, "interlayer_att_dropout": 0.0, "interlayer_att_groups": 1,
    "interlayer_att_type": "sqa", "interlayer_att_experts": None, "interlayer_att_query_experts": None,
    "interlayer_att_query_groups": None, "self_att_dropout": 0.0, "self_att_groups": 1, "self_att_type": "sqa",
    "self_att_experts": None, "self_att_query_experts": None, "self_att_query_groups": None,
    "norm_type": "classic-rms", "norm_init_gate": -2.0, "norm_per_dim_scale": False, "norm_decay": 0.9,
    "use_gated_residual": False, "residual_per_slot_gate": True, "residual_gate_init": 3.0,
    "residual_gate_type": "static", "residual_gate_slot_status_type": "mean", "use_tanh_residual_gate": True,
    "use_gate_for_self_attention": False, "disable_residual": False, "debug_mode": False, "debug_interval": 10,
    "rope_base": 10000,
}
# fmt: on
# reference memory norm type -> (this project's memory_norm_type, what is dropped / why)
MEMORY_NORMS = {
    "classic-rms": "rms",
    "layer": "gated-layer",
    "rms": "gated-rms",
    "adaptive": "gated-rms",  # its EMA statistics are read only in training; inference uses the per-slot RMS
    "positional": "gated-ema-rms",
}
ACTIVATIONS = {
    "swish": "silu",
    "silu": "silu",
    "gelu": "gelu",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "linear": "linear",
}
ROPE_BUFFER = re.compile(r"(^|\.)rope\.(inv_freq|cache)$")


class ReferenceConversionError(ValueError):
    """A reference checkpoint that cannot be converted: the message names the file, the key and the fix."""


# ----------------------------------------------------------------------------------------------------------
# reading the reference folders


@dataclass
class Component:
    """One reference component: its config (defaults filled in) and its tensors (keys without the prefix)."""

    role: str  # "decoder", "encoder" or "memory_attention"
    config: dict
    config_file: Path
    weights_file: Path
    prefix: str  # the prefix of its keys in `weights_file`
    tensors: dict[str, torch.Tensor]
    consumed: set[str] = field(default_factory=set)

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """The tensor `key`, which must exist with `shape` (`what` explains where the shape comes from)."""
        if key not in self.tensors:
            raise ReferenceConversionError(
                f"{self.weights_file}: tensor '{self.name(key)}' is missing; expected {what} of shape {list(shape)} "
                f"(from {self.config_file.name}). The reference loader would leave it at its random initial value; "
                "convert a complete checkpoint (saved with save_pretrained after training)."
            )
        tensor = self.tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ReferenceConversionError(
                f"{self.weights_file}: tensor '{self.name(key)}' has shape {list(tensor.shape)}, expected "
                f"{list(shape)} for {what} (from {self.config_file.name}); the weights do not match their "
                "config.json."
            )
        self.consumed.add(key)
        return tensor.to(torch.float32)

    def drop(self, pattern: str) -> list[str]:
        """Mark the tensors matching the regular expression `pattern` as read (known and unused in inference)."""
        matched = [key for key in self.tensors if key not in self.consumed and re.search(pattern, key)]
        self.consumed.update(matched)
        return matched

    def leftovers(self) -> list[str]:
        return sorted(key for key in self.tensors if key not in self.consumed)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReferenceConversionError(
            f"{path} does not exist: not a reference checkpoint folder (PyTorchModelHubMixin writes config.json + "
            "model.safetensors)."
        ) from None
    except json.JSONDecodeError as error:
        raise ReferenceConversionError(f"{path} is not valid JSON ({error}).") from None


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.exists():
        pickled = [name for name in ("pytorch_model.bin", "model.pt") if (folder / name).exists()]
        hint = (
            f" ({pickled[0]} is a pickle: load it in the reference environment and save_pretrained it, which writes "
            "model.safetensors)"
            if pickled
            else ""
        )
        raise ReferenceConversionError(f"{path} does not exist: a reference checkpoint stores its weights there{hint}.")
    try:
        return path, load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ReferenceConversionError(f"{path} cannot be read as safetensors ({error}).") from None


def _with_defaults(config: dict, defaults: dict, file: Path, notes: list[str]) -> dict:
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        notes.append(f"{file}: keys unknown to rxlm 0.3.92 ignored: {unknown}")
    return {**defaults, **{key: value for key, value in config.items() if key in defaults}}


def _split_whole(folder: Path, notes: list[str]) -> tuple[dict, dict[str, Component]]:
    config_file = folder / "config.json"
    config = _read_json(config_file)
    weights_file, tensors = _read_weights(folder)
    prefixes = {"decoder": "decoder.model.", "encoder": "encoder.model.", "memory_attention": "memory_attention.model."}
    outside = sorted(key for key in tensors if not any(key.startswith(p) for p in prefixes.values()))
    if outside:
        raise ReferenceConversionError(
            f"{weights_file}: unexpected tensor(s) {outside[:5]} outside decoder.model. / encoder.model. / "
            "memory_attention.model.: not an RxTAlpha / RxTBeta checkpoint."
        )
    components = {}
    for role, prefix in prefixes.items():
        defaults = MEMORY_DEFAULTS if role == "memory_attention" else COMPONENT_DEFAULTS
        raw = config.get(f"{role}_config")
        if not isinstance(raw, dict):
            raise ReferenceConversionError(f"{config_file}: '{role}_config' is missing or not an object.")
        components[role] = Component(
            role=role,
            config=_with_defaults(raw, defaults, config_file, notes),
            config_file=config_file,
            weights_file=weights_file,
            prefix=prefix,
            tensors={key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)},
        )
    return config, components


def _component_role(folder: Path) -> str | None:
    """Which reference component a folder holds (from the tensor names of its model.safetensors), or None."""
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            keys = set(handle.keys())
    except Exception:
        return None
    if any(key.startswith("model.attention_layers.") for key in keys):
        return "memory_attention"
    if "model.head.weight" in keys:
        return "decoder"
    if any(key.startswith("model.layers.") for key in keys):
        return "encoder"
    return None


def _read_component(role: str, folder: Path, notes: list[str]) -> Component:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceConversionError(f"{role} folder {folder} does not exist.")
    config_file = folder / "config.json"
    raw = _read_json(config_file)
    if "decoder_config" in raw:
        raise ReferenceConversionError(
            f"{config_file} describes a whole RxTAlpha / RxTBeta, not a {role} component: pass it as SRC."
        )
    found = _component_role(folder)
    if found != role:
        raise ReferenceConversionError(
            f"{folder} is not a reference {role} folder (its config.json / model.safetensors look like "
            f"{found or 'no reference component'}): expected the folder the reference's {role} save_pretrained wrote."
        )
    weights_file, tensors = _read_weights(folder)
    outside = sorted(key for key in tensors if not key.startswith("model."))
    if outside:
        raise ReferenceConversionError(f"{weights_file}: unexpected tensor(s) {outside[:5]} outside 'model.'.")
    defaults = MEMORY_DEFAULTS if role == "memory_attention" else COMPONENT_DEFAULTS
    return Component(
        role=role,
        config=_with_defaults(raw, defaults, config_file, notes),
        config_file=config_file,
        weights_file=weights_file,
        prefix="model.",
        tensors={key[len("model.") :]: value for key, value in tensors.items()},
    )


# ----------------------------------------------------------------------------------------------------------
# configuration


def _unsupported(component: Component, key: str, value, why: str) -> ReferenceConversionError:
    return ReferenceConversionError(
        f"{component.config_file}: {component.role} {key}={value!r} is not supported by this converter ({why})."
    )


def _heads(component: Component, kind: str, heads: int, groups, query_groups, key: str) -> tuple[int, int, int]:
    """(heads for the split, query heads, key/value heads) of a reference attention type."""
    if kind == "mha":
        return heads, heads, heads
    if kind == "gqa":
        return heads, heads, groups
    if kind == "mqa":
        return heads, heads, 1
    if kind == "sqa":
        if query_groups is None:
            raise ReferenceConversionError(
                f"{component.config_file}: {component.role} {key}='sqa' needs its query groups (att_query_groups), "
                "which config.json does not give; the reference cannot build it either."
            )
        if query_groups < groups:
            raise _unsupported(component, key, kind, f"reversed SQA: {query_groups} query < {groups} key/value heads")
        return heads, query_groups, groups
    raise _unsupported(component, key, kind, "only 'mha', 'gqa', 'mqa' and 'sqa' attention are converted")


def _check_component_features(component: Component) -> None:
    config = component.config
    checks = {
        "stateless_layers_config": None,
        "final_stateless_layers_config": None,
        "use_gated_attention": False,
        "use_nope": False,
    }
    for key, expected in checks.items():
        if config[key] not in (expected, [] if expected is None else expected):
            raise _unsupported(component, key, config[key], "no equivalent in this project")
    if config["self_att_type"] == "hybrid":
        raise _unsupported(component, "self_att_type", "hybrid", "linear-attention layers have no equivalent here")
    if config["use_gated_cross_attention"]:
        raise _unsupported(component, "use_gated_cross_attention", True, "no equivalent in this project")
    if not config["use_gated"]:
        raise _unsupported(component, "use_gated", False, "only gated (GLU) feed-forwards are converted")
    if config["ff_activation"] not in ACTIVATIONS:
        raise _unsupported(component, "ff_activation", config["ff_activation"], f"use one of {sorted(ACTIVATIONS)}")
    if component.role == "decoder" and config["skip_memory_cross_attention"]:
        raise _unsupported(component, "skip_memory_cross_attention", True, "an RxT decoder reads its memory")
    if component.role == "encoder" and config["use_moe"]:
        raise _unsupported(component, "use_moe", True, "this project's encoder feed-forward is dense")


def _same(components: list[Component], key: str, what: str):
    values = {c.role: c.config[key] for c in components}
    if len(set(map(json.dumps, values.values()))) > 1:
        first = components[0]
        raise ReferenceConversionError(
            f"{first.config_file}: {what} differs between components {values}; this project has one setting for "
            f"it ({key}). Such a checkpoint cannot be converted."
        )
    return next(iter(values.values()))


def build_config(
    decoder: Component,
    encoder: Component,
    memory: Component,
    memory_class: str,
    token_ids: dict[str, int | None],
    initial_stm: str,
    notes: list[str],
) -> dict:
    """The keyword arguments of this project's `RxTConfig` that reproduce the reference components."""
    for component in (decoder, encoder):
        _check_component_features(component)
    dec, enc, mem = decoder.config, encoder.config, memory.config
    layers = _same([decoder, encoder, memory], "num_layers", "the number of layers")
    dim = _same([decoder, encoder, memory], "embed_dim", "the hidden size (embed_dim)")
    vocab = _same([decoder, encoder], "vocab_size", "the vocabulary size")
    _same([decoder, encoder], "att_heads", "the number of attention heads")
    theta = _same([decoder, encoder, memory], "rope_base", "the RoPE base")
    _same([decoder, encoder], "use_rms_norm", "the norm type (use_rms_norm)")
    _same([decoder, encoder], "ff_activation", "the feed-forward activation")
    _same([decoder, encoder], "use_attention_output_bias", "the attention output bias")
    if dec["stm_size"] != mem["stm_size"]:
        notes.append(
            f"decoder stm_size={dec['stm_size']} differs from the memory attention's {mem['stm_size']}: the memory "
            "attention's STM (shared by share_components()) is used"
        )
    self_heads = _heads(
        decoder, dec["self_att_type"], dec["att_heads"], dec["att_groups"], dec["att_query_groups"], "self_att_type"
    )
    encoder_heads = _heads(
        encoder, enc["self_att_type"], enc["att_heads"], enc["att_groups"], enc["att_query_groups"], "self_att_type"
    )
    if self_heads != encoder_heads:
        raise ReferenceConversionError(
            f"{encoder.config_file}: the encoder's self-attention heads {encoder_heads} differ from the decoder's "
            f"{self_heads} (heads, query, key/value); this project has one self-attention setting for both."
        )
    cross_heads = _heads(
        decoder,
        dec["cross_att_type"],
        dec["att_heads"],
        dec["cross_att_groups"] or dec["att_groups"],
        dec["cross_att_query_groups"] or dec["att_query_groups"],
        "cross_att_type",
    )
    # RxNN built memory cross-attention with the self-attention groups even where cross_att_groups was set: when
    # the stored projections have those shapes (and not the configured ones), that is what was built
    key = decoder.tensors.get("layers.0.memory_cross_attention.k_proj.weight")
    head_dim = dim // dec["att_heads"]
    if key is not None and key.shape[0] != cross_heads[2] * head_dim and dec["cross_att_type"] in ("gqa", "sqa"):
        fallback = _heads(
            decoder,
            dec["cross_att_type"],
            dec["att_heads"],
            dec["att_groups"],
            dec["att_query_groups"],
            "cross_att_type",
        )
        query = decoder.tensors.get("layers.0.memory_cross_attention.q_proj.weight")
        if key.shape[0] == fallback[2] * head_dim and query is not None and query.shape[0] == fallback[1] * head_dim:
            notes.append(
                f"memory cross-attention was built with the self-attention groups ({fallback[1]} query / {fallback[2]} "
                f"key-value heads), as RxNN did, not cross_att_groups={dec['cross_att_groups']}: converted as built"
            )
            cross_heads = fallback
    for key in ("att_type", f"{'self' if memory_class == 'self' else 'interlayer'}_att_type"):
        if mem[key] in ("gma", "dma"):
            raise _unsupported(memory, key, mem[key], "experimental attention types have no equivalent here")
    memory_heads = _heads(
        memory, mem["att_type"], mem["att_heads"], mem["att_groups"], mem["att_query_groups"], "att_type"
    )
    pre_prefix = "self" if memory_class == "self" else "interlayer"
    pre_heads = memory_heads
    if memory_class != "simple":
        pre_heads = _heads(
            memory,
            mem[f"{pre_prefix}_att_type"],
            mem["att_heads"],
            mem[f"{pre_prefix}_att_groups"],
            mem[f"{pre_prefix}_att_query_groups"],
            f"{pre_prefix}_att_type",
        )
    if mem["norm_type"] not in MEMORY_NORMS:
        raise _unsupported(memory, "norm_type", mem["norm_type"], f"use one of {sorted(MEMORY_NORMS)}")
    if mem["disable_residual"] and memory_class == "simple":
        gate_type = "replace"
    elif mem["use_gated_residual"]:
        gate_type = mem["residual_gate_type"]
    else:
        gate_type = "none"
    if gate_type not in ("static", "elementwise", "linear", "none", "replace"):
        raise _unsupported(memory, "residual_gate_type", gate_type, "use 'static', 'elementwise' or 'linear'")
    pre_gate_type = None
    if memory_class == "self":
        pre_gate_type = mem["residual_gate_type"] if mem["use_gate_for_self_attention"] else "none"
    groups = mem["num_groups"] if memory_class == "self-interlayer" else 1
    if layers % groups != 0:
        raise _unsupported(memory, "num_groups", groups, f"it must divide num_layers={layers}")

    if dec["use_moe"] and dec["router_amp"] and dec["router_dtype"] != "float32":
        notes.append(
            f"the reference computes the router under autocast in {dec['router_dtype']} (router_amp=True); this "
            "model routes in float32"
        )
    if dec["use_head_norm"]:
        final_norm = {"rms_norm": "rms", "layer_norm": "layer"}.get(dec["head_norm_type"])
        if final_norm is None:
            raise _unsupported(decoder, "head_norm_type", dec["head_norm_type"], "use 'layer_norm' or 'rms_norm'")
    else:
        final_norm = "none"
    vectorised = dec["use_vectorized_moe"]
    shared = dec["num_shared_experts"] if dec["use_moe"] else 0
    if dec["use_moe"]:
        for key in ("moe_bias_mode", "moe_shared_experts_bias_mode"):
            if dec[key] not in ("global", "local", "off"):
                raise _unsupported(decoder, key, dec[key], "use 'global', 'local' or 'off'")
    config = dict(
        vocab_size=vocab,
        hidden_size=dim,
        num_hidden_layers=layers,
        hidden_act=ACTIVATIONS[dec["ff_activation"]],
        max_position_embeddings=max(dec["seq_len"], enc["seq_len"], mem["seq_len"]),
        rope_theta=float(theta),
        # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon: this is float32's
        rms_norm_eps=float(torch.finfo(torch.float32).eps),
        layer_norm_eps=1e-5,
        norm_type="rms" if dec["use_rms_norm"] else "layer",
        decoder_final_norm=final_norm,
        attention_bias=False,
        attention_output_bias=bool(dec["use_attention_output_bias"]),
        memory_attention_output_bias=True,
        attention_dropout=float(dec["att_dropout"]),
        memory_qk_norm=False,
        memory_rope=True,
        tie_word_embeddings=False,
        lm_head_bias=True,
        num_attention_heads=self_heads[0],
        num_query_heads=self_heads[1],
        num_key_value_heads=self_heads[2],
        memory_cross_attention_heads=cross_heads[0],
        memory_cross_attention_query_heads=cross_heads[1],
        memory_cross_attention_key_value_heads=cross_heads[2],
        memory_attention_heads=memory_heads[0],
        memory_attention_query_heads=memory_heads[1],
        memory_attention_key_value_heads=memory_heads[2],
        memory_pre_attention_query_heads=pre_heads[1],
        memory_pre_attention_key_value_heads=pre_heads[2],
        decoder_feed_forward="moe" if dec["use_moe"] else "dense",
        decoder_intermediate_size=dec["ff_dim"],
        encoder_intermediate_size=enc["ff_dim"],
        mlp_bias=True,
        stm_size=mem["stm_size"],
        stm_init_mode="learned" if initial_stm == "saved" else initial_stm,
        stm_init_std=1.0,
        memory_attention_variant=memory_class,
        memory_interlayer_groups=groups,
        memory_norm_type=MEMORY_NORMS[mem["norm_type"]],
        memory_norm_eps=1e-6,
        memory_norm_scale="slot" if mem["norm_type"] == "positional" and not mem["norm_per_dim_scale"] else "feature",
        residual_gate_type=gate_type,
        memory_pre_gate_type=pre_gate_type,
        residual_gate_activation="tanh" if mem["use_tanh_residual_gate"] else "sigmoid",
        residual_gate_granularity="slot" if mem["residual_per_slot_gate"] else "scalar",
        residual_gate_slot_status=mem["residual_gate_slot_status_type"],
        residual_gate_bias=False,
        memory_ignores_template_tokens=False,
        **{key: value for key, value in token_ids.items()},
    )
    if dec["use_moe"]:
        config.update(
            num_experts=dec["num_experts"],
            num_experts_per_token=dec["moe_top_k"],
            num_shared_experts=shared,
            moe_router_softmax="all",
            moe_shared_expert_gate=shared > 1,
        )
        if vectorised:
            config.update(
                moe_expert_bias=dec["moe_bias_mode"] == "local",
                moe_routed_output_bias=dec["moe_bias_mode"] == "global",
                moe_shared_expert_bias=shared > 0 and dec["moe_shared_experts_bias_mode"] == "local",
                moe_shared_output_bias=shared > 0 and dec["moe_shared_experts_bias_mode"] == "global",
                moe_shared_intermediate_size=dec["shared_expert_dim"] if shared else None,
                moe_weighted_shared_experts=bool(dec["moe_use_weighted_shared_experts"]) and shared > 0,
            )
        else:  # per-expert modules: gated feed-forwards with biases, no weighting
            config.update(moe_expert_bias=True, moe_shared_expert_bias=shared > 0)
    else:
        config.update(num_experts=1, num_experts_per_token=1, num_shared_experts=0)
    return config


# ----------------------------------------------------------------------------------------------------------
# tensors


def halves_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns a projection rotated as interleaved pairs (x[2i], x[2i+1]) into one rotated as halves
    (x[i], x[i + head_dim/2]), within each head."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    rows = weight.shape[0]
    heads = rows // head_dim
    order = halves_permutation(head_dim)
    return weight.reshape(heads, head_dim, *weight.shape[1:])[:, order].reshape(weight.shape)


class Mapper:
    """Fills this project's state dict from the reference components, checking every tensor."""

    def __init__(self, config, rope_layout: str, notes: list[str]):
        self.config = config
        self.rope_layout = rope_layout
        self.notes = notes
        self.state: dict[str, torch.Tensor] = {}
        self.dim = config.hidden_size

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.state[key] = tensor.contiguous()

    # --- pieces ------------------------------------------------------------------------------------------

    def attention(self, comp: Component, src: str, dst: str, role: str, rotated: str, what: str) -> None:
        """`rotated` is "query_key", "query", "key" or "none": which side the reference rotates with RoPE."""
        heads, query_heads, kv_heads = self.config.heads_for(role)
        head_dim = self.dim // heads
        q = comp.take(f"{src}.q_proj.weight", (query_heads * head_dim, self.dim), f"the {what} query projection")
        k = comp.take(f"{src}.k_proj.weight", (kv_heads * head_dim, self.dim), f"the {what} key projection")
        v = comp.take(f"{src}.v_proj.weight", (kv_heads * head_dim, self.dim), f"the {what} value projection")
        if rotated != "none":
            # interleaved output (rxlm >= 0.3.40): both sides of every rotated score get the same permutation;
            # legacy output (two halves): only the rotated side, whose rotation already wrote halves
            permute_q = rotated in ("query_key", "query") or self.rope_layout == "interleaved"
            permute_k = rotated in ("query_key", "key") or self.rope_layout == "interleaved"
            q = permute_rows(q, head_dim) if permute_q else q
            k = permute_rows(k, head_dim) if permute_k else k
        self.put(f"{dst}.q_proj.weight", q)
        self.put(f"{dst}.k_proj.weight", k)
        self.put(f"{dst}.v_proj.weight", v)
        self.put(
            f"{dst}.o_proj.weight",
            comp.take(f"{src}.out_proj.weight", (self.dim, query_heads * head_dim), f"the {what} output projection"),
        )
        if self.config.output_bias_for(role):
            self.put(f"{dst}.o_proj.bias", comp.take(f"{src}.out_proj.bias", (self.dim,), f"the {what} output bias"))

    def norm(self, comp: Component, src: str, dst: str, kind: str, what: str) -> None:
        self.put(f"{dst}.weight", comp.take(f"{src}.weight", (self.dim,), what))
        if kind == "layer":
            self.put(f"{dst}.bias", comp.take(f"{src}.bias", (self.dim,), what))

    def memory_norm(self, comp: Component, src: str, dsts: list[str], reference_type: str, what: str) -> None:
        """One reference memory norm into one or more of this project's norms (copies)."""
        slots = self.config.stm_size
        tensors = {}
        if reference_type == "classic-rms":
            tensors["weight"] = comp.take(f"{src}.weight", (self.dim,), what)
        else:
            if reference_type == "layer":
                tensors["norm.weight"] = comp.take(f"{src}.norm.weight", (self.dim,), what)
                tensors["norm.bias"] = comp.take(f"{src}.norm.bias", (self.dim,), what)
            per_slot = reference_type == "positional"
            scale_shape = (self.dim,) if not per_slot or self.config.memory_norm_scale == "feature" else (slots, 1)
            tensors["scale"] = comp.take(f"{src}.scale", scale_shape, f"{what} scale")
            tensors["gate"] = comp.take(f"{src}.gate", (slots, 1) if per_slot else (1,), f"{what} gate")
            if per_slot:
                tensors["ema_rms"] = comp.take(f"{src}.ema_rms", (slots, 1), f"{what} RMS statistics")
            elif reference_type == "adaptive":
                comp.take(f"{src}.ema_rms", (1,), f"{what} RMS statistics (read in training only)")
        for dst in dsts:
            for name, tensor in tensors.items():
                self.put(f"{dst}.{name}", tensor)

    def gate(self, comp: Component, src: str, dst: str, gate_type: str, what: str) -> None:
        config = self.config
        slots = config.stm_size
        status_linear = config.residual_gate_slot_status == "linear"
        if gate_type in ("none", "replace", "static") and status_linear:
            comp.drop(rf"^{re.escape(src)}\.slot_status\.(weight|bias)$")  # built by the reference, never read
        if gate_type in ("none", "replace"):
            return
        per_slot = config.residual_gate_granularity == "slot"
        if gate_type == "static":
            self.put(f"{dst}.weight", comp.take(f"{src}.gate", (slots, 1) if per_slot else (1,), f"{what} gate"))
            return
        if status_linear:
            self.put(
                f"{dst}.status_proj.weight",
                comp.take(f"{src}.slot_status.weight", (1, self.dim), f"{what} slot status"),
            )
            self.put(f"{dst}.status_proj.bias", comp.take(f"{src}.slot_status.bias", (1,), f"{what} slot status"))
        if gate_type == "elementwise":
            weight = comp.take(f"{src}.gate", (slots, 1) if per_slot else (1,), f"{what} gate")
            self.put(f"{dst}.weight", weight.reshape(-1))
        else:
            out = slots if per_slot else 1
            self.put(f"{dst}.proj.weight", comp.take(f"{src}.gate.weight", (out, slots), f"{what} gate projection"))
            self.put(f"{dst}.proj.bias", comp.take(f"{src}.gate.bias", (out,), f"{what} gate projection"))

    def gated_feed_forward(self, comp: Component, src: str, dst: str, hidden: int, bias: bool, what: str) -> None:
        """A reference GatedFeedForward (`fc1.linear` packs [up; gate], `fc2`) into gate/up/down projections."""
        packed = comp.take(f"{src}.fc1.linear.weight", (2 * hidden, self.dim), f"{what} input projection")
        self.put(f"{dst}.up_proj.weight", packed[:hidden])
        self.put(f"{dst}.gate_proj.weight", packed[hidden:])
        self.put(
            f"{dst}.down_proj.weight", comp.take(f"{src}.fc2.weight", (self.dim, hidden), f"{what} output projection")
        )
        if bias:
            packed_bias = comp.take(f"{src}.fc1.linear.bias", (2 * hidden,), f"{what} input bias")
            self.put(f"{dst}.up_proj.bias", packed_bias[:hidden])
            self.put(f"{dst}.gate_proj.bias", packed_bias[hidden:])
            self.put(f"{dst}.down_proj.bias", comp.take(f"{src}.fc2.bias", (self.dim,), f"{what} output bias"))

    def stacked_experts(self, comp: Component, prefix: str, dst: str, count: int, hidden: int, bias: bool, what: str):
        """Vectorised experts (`w1` [E, D, 2H] packs [up, gate] columns, `w2` [E, H, D]) into per-expert modules."""
        w1 = comp.take(f"{prefix}w1", (count, self.dim, 2 * hidden), f"{what} input weights")
        w2 = comp.take(f"{prefix}w2", (count, hidden, self.dim), f"{what} output weights")
        b1 = comp.take(f"{prefix}b1", (count, 2 * hidden), f"{what} input biases") if bias else None
        b2 = comp.take(f"{prefix}b2", (count, self.dim), f"{what} output biases") if bias else None
        for e in range(count):
            self.put(f"{dst}.{e}.up_proj.weight", w1[e, :, :hidden].T)
            self.put(f"{dst}.{e}.gate_proj.weight", w1[e, :, hidden:].T)
            self.put(f"{dst}.{e}.down_proj.weight", w2[e].T)
            if bias:
                self.put(f"{dst}.{e}.up_proj.bias", b1[e, :hidden])
                self.put(f"{dst}.{e}.gate_proj.bias", b1[e, hidden:])
                self.put(f"{dst}.{e}.down_proj.bias", b2[e])

    # --- components --------------------------------------------------------------------------------------

    def self_attention_sublayer(self, comp: Component, src: str, dst: str, what: str) -> None:
        """A decoder or encoder layer's first norm and its self-attention (RoPE on queries and keys)."""
        self.norm(comp, f"{src}.norm1", f"{dst}.self_attn_norm", self.config.norm_type, f"{what} self-attention norm")
        self.attention(
            comp, f"{src}.attention", f"{dst}.self_attn", "self_attention", "query_key", f"{what} self-attention"
        )

    def decoder(self, comp: Component) -> None:
        config, c = self.config, comp.config
        kind = config.norm_type
        for i in range(config.num_hidden_layers):
            src, dst = f"layers.{i}", f"model.decoder.layers.{i}"
            self.self_attention_sublayer(comp, src, dst, f"decoder layer {i}")
            self.norm(
                comp, f"{src}.norm2", f"{dst}.cross_attn_norm", kind, f"decoder layer {i} memory cross-attention norm"
            )
            self.norm(comp, f"{src}.stm_norm", f"{dst}.memory_norm", kind, f"decoder layer {i} STM norm")
            self.attention(
                comp,
                f"{src}.memory_cross_attention",
                f"{dst}.memory_cross_attn",
                "memory_cross_attention",
                "query",
                f"decoder layer {i} memory cross-attention",
            )
            self.norm(comp, f"{src}.norm3", f"{dst}.ff_norm", kind, f"decoder layer {i} feed-forward norm")
            ff, out = f"{src}.ff", f"{dst}.feed_forward"
            if not c["use_moe"]:
                self.gated_feed_forward(comp, ff, out, c["ff_dim"], True, f"decoder layer {i} feed-forward")
                continue
            experts, shared = c["num_experts"], config.num_shared_experts
            self.put(f"{out}.router.weight", comp.take(f"{ff}.router.gate.weight", (experts, self.dim), "the router"))
            if c["use_vectorized_moe"]:
                self.stacked_experts(
                    comp,
                    f"{ff}.",
                    f"{out}.experts",
                    experts,
                    c["ff_dim"],
                    config.moe_expert_bias,
                    f"decoder layer {i} experts'",
                )
                if comp.drop(rf"^{re.escape(ff)}\.experts\."):
                    self.notes.append(
                        "per-expert modules beside the vectorised w1 / w2 (vectorized_moe_from_legacy) were dropped: "
                        "the reference computes with w1 / w2"
                    )
                if config.moe_routed_output_bias:
                    self.put(
                        f"{out}.routed_bias", comp.take(f"{ff}.global_bias", (self.dim,), "the experts' output bias")
                    )
                shared_hidden = config.moe_shared_intermediate_size or c["ff_dim"]
                if shared == 1:
                    self.gated_feed_forward(
                        comp,
                        f"{ff}.shared_expert",
                        f"{out}.shared_experts.0",
                        shared_hidden,
                        config.moe_shared_expert_bias,
                        f"decoder layer {i} shared expert",
                    )
                elif shared > 1:
                    self.stacked_experts(
                        comp,
                        f"{ff}.shared_",
                        f"{out}.shared_experts",
                        shared,
                        shared_hidden,
                        config.moe_shared_expert_bias,
                        f"decoder layer {i} shared experts'",
                    )
                if config.moe_shared_output_bias:
                    self.put(
                        f"{out}.shared_bias",
                        comp.take(f"{ff}.shared_experts_bias", (self.dim,), "the shared experts' bias"),
                    )
            else:
                for e in range(experts):
                    self.gated_feed_forward(
                        comp,
                        f"{ff}.experts.{e}",
                        f"{out}.experts.{e}",
                        c["ff_dim"],
                        True,
                        f"decoder layer {i} expert {e}",
                    )
                for s in range(shared):
                    self.gated_feed_forward(
                        comp,
                        f"{ff}.shared_experts.{s}",
                        f"{out}.shared_experts.{s}",
                        c["ff_dim"],
                        True,
                        f"decoder layer {i} shared expert {s}",
                    )
            if config.moe_shared_expert_gate:
                self.put(
                    f"{out}.shared_gate.weight",
                    comp.take(f"{ff}.shared_expert_gate.weight", (shared, self.dim), "the shared-expert gate"),
                )
        vocab = config.vocab_size
        self.put("lm_head.weight", comp.take("head.weight", (vocab, self.dim), "the LM head"))
        self.put("lm_head.bias", comp.take("head.bias", (vocab,), "the LM head bias"))
        if config.decoder_final_norm != "none":
            self.norm(comp, "head_norm", "model.decoder.norm", config.decoder_final_norm, "the head norm")

    def encoder(self, comp: Component) -> None:
        config = self.config
        kind = config.norm_type
        for i in range(config.num_hidden_layers):
            src, dst = f"layers.{i}", f"model.encoder.layers.{i}"
            self.self_attention_sublayer(comp, src, dst, f"encoder layer {i}")
            self.norm(comp, f"{src}.norm3", f"{dst}.ff_norm", kind, f"encoder layer {i} feed-forward norm")
            self.gated_feed_forward(
                comp, f"{src}.ff", f"{dst}.feed_forward", comp.config["ff_dim"], True, f"encoder layer {i} feed-forward"
            )
        # this project's encoder ends with a norm that feeds only the MLM head of training stages 1-2; the reference
        # encoder returns its last layer's states unnormed: start that norm at its initial values
        self.put("model.encoder.norm.weight", torch.ones(self.dim))
        # the reference encoder's layers also build a memory cross-attention, which its forward never runs
        if comp.drop(r"^layers\.\d+\.(memory_cross_attention\.|norm2\.|stm_norm\.)"):
            self.notes.append(
                "the encoder's memory cross-attention weights (never run by the reference encoder) were dropped"
            )

    def memory_attention(self, comp: Component, memory_class: str) -> None:
        config, c = self.config, comp.config
        reference_norm = c["norm_type"]
        for i in range(config.num_hidden_layers):
            dst = f"model.memory_attention.layers.{i}"
            self.attention(
                comp,
                f"attention_layers.{i}",
                f"{dst}.attention",
                "memory_attention",
                "key",
                f"memory attention layer {i}",
            )
            self.memory_norm(
                comp,
                f"memory_norm_layers.{i}",
                [f"{dst}.memory_norm"],
                reference_norm,
                f"memory attention layer {i} STM norm",
            )
            self.norm(
                comp,
                f"memory_input_norm_layers.{i}",
                f"{dst}.encoded_norm",
                "rms",
                f"memory attention layer {i} input norm",
            )
            self.gate(
                comp,
                f"residual_gate_layers.{i}",
                f"{dst}.gate",
                config.residual_gate_type,
                f"memory attention layer {i} residual",
            )
            if memory_class == "simple":
                continue
            pre = "self" if memory_class == "self" else "mean"
            self.attention(
                comp,
                f"{pre}_attention_layers.{i}",
                f"{dst}.pre_attention",
                "memory_pre_attention",
                "none",
                f"memory attention layer {i} {'self' if pre == 'self' else 'interlayer'} attention",
            )
            pre_gate = config.memory_pre_gate_type or config.residual_gate_type
            if memory_class == "self":
                self.memory_norm(
                    comp,
                    f"self_memory_norm_layers.{i}",
                    [f"{dst}.pre_query_norm", f"{dst}.pre_key_value_norm"],
                    reference_norm,
                    f"memory attention layer {i} self-attention norm",
                )
                self.gate(
                    comp,
                    f"self_residual_gate_layers.{i}",
                    f"{dst}.pre_gate",
                    pre_gate,
                    f"memory attention layer {i} self",
                )
            else:
                self.memory_norm(
                    comp,
                    f"mean_memory_norm_layers.{i}",
                    [f"{dst}.pre_query_norm"],
                    reference_norm,
                    f"memory attention layer {i} interlayer norm",
                )
                self.gate(
                    comp,
                    f"mean_residual_gate_layers.{i}",
                    f"{dst}.pre_gate",
                    pre_gate,
                    f"memory attention layer {i} interlayer",
                )
            if memory_class == "self-interlayer":
                self.gate(
                    comp,
                    f"interlayer_gate_layers.{i}",
                    f"{dst}.source_gate",
                    config.residual_gate_type,
                    f"memory attention layer {i} self / interlayer blend",
                )
        if memory_class in ("interlayer", "self-interlayer"):  # one norm of the mean STM, shared by all layers
            destinations = [
                f"model.memory_attention.layers.{i}.pre_key_value_norm" for i in range(config.num_hidden_layers)
            ]
            self.memory_norm(comp, "mean_stm_norm", destinations, reference_norm, "the mean-STM norm")


def detect_memory_class(memory: Component) -> str:
    """The memory-attention network the tensors belong to (what was built)."""
    keys = memory.tensors.keys()
    if any(key.startswith("interlayer_gate_layers.") for key in keys):
        return "self-interlayer"
    if any(key.startswith("mean_attention_layers.") for key in keys):
        return "interlayer"
    if any(key.startswith("self_attention_layers.") for key in keys):
        return "self"
    if any(key.startswith("attention_layers.") for key in keys):
        return "simple"
    raise ReferenceConversionError(
        f"{memory.weights_file}: no memory-attention tensors ({memory.prefix}attention_layers.*): not a reference "
        "memory-attention checkpoint."
    )


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def find_tokenizer(candidates: list[Path]) -> Path:
    for candidate in candidates:
        if candidate is None:
            continue
        candidate = Path(candidate)
        if candidate.is_file() and candidate.name.endswith(".json"):
            return candidate
        for path in (candidate / "tokenizer.json", candidate / "tokenizer" / "tokenizer.json"):
            if path.exists():
                return path
    searched = ", ".join(str(c) for c in candidates if c is not None)
    raise ReferenceConversionError(
        f"no tokenizer.json found (searched {searched}): pass tokenizer= (--tokenizer) with the reference tokenizer "
        "file or its folder."
    )


def special_token_ids(
    tokenizer_file: Path, vocab: dict[str, int], tokenizer_config: dict | None
) -> dict[str, int | None]:
    """This project's special-token fields, from the reference's `tokenizer_config` or the token names."""
    from rxt_hf.modeling_rxt.format_rxt import TOKEN_FIELDS as names

    ids: dict[str, int | None] = {name: vocab.get(token) for name, token in names.items()}
    for name, value in (tokenizer_config or {}).items():
        if name in ids and value is not None:
            ids[name] = int(value)
    for name in ("bos_token_id", "eos_token_id", "query_token_id", "answer_token_id", "pad_token_id"):
        if ids[name] is None:
            raise ReferenceConversionError(
                f"{tokenizer_file}: no id for {name} (token {names[name]} is not in the vocabulary and the "
                "checkpoint has no tokenizer_config): pass token_ids={...} (--token-ids JSON) with the reference's ids."
            )
    return ids


def convert_tokenizer(tokenizer_file: Path, ids: dict[str, int | None], model_max_length: int):
    """A `PreTrainedTokenizerFast` over the reference's own vocabulary and merges, with this project's chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rxt_hf.modeling_rxt.format_rxt import RXT_CHAT_TEMPLATE

    try:
        backend = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:
        raise ReferenceConversionError(f"{tokenizer_file} cannot be read by `tokenizers` ({error}).") from None
    # The reference tokenizes every interaction with add_special_tokens=False, so its "[BOS] $A [EOS]" post-processor
    # never runs there; without it `tokenizer(text)` gives only the text ids, as this project's tokenizers do.
    backend.post_processor = None
    if backend.decoder is None and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.decoder = decoders.ByteLevel()  # the reference decodes byte glyphs by string replacement
    token = {name: backend.id_to_token(value) if value is not None else None for name, value in ids.items()}
    template = RXT_CHAT_TEMPLATE.replace("[Q]", token["query_token_id"]).replace("[A]", token["answer_token_id"])
    if token["think_token_id"] is not None:
        template = template.replace("[T]", token["think_token_id"])
    extra = [t for t in (token["query_token_id"], token["answer_token_id"], token["think_token_id"]) if t is not None]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token["bos_token_id"],
        eos_token=token["eos_token_id"],
        pad_token=token["pad_token_id"],
        unk_token=token["unk_token_id"],
        mask_token=token["mask_token_id"],
        extra_special_tokens=extra,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = template
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# model card


def render_model_card(model, source: dict, options: dict, notes: list[str]) -> str:
    """The converted folder's README.md: source, what changed, attribution notice and licence (RAML v1.0)."""
    import jinja2

    try:
        from importlib.resources import files

        text = (files("model_cards") / "rxt_converted_model_card.md").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parent.parent / "model_cards" / "rxt_converted_model_card.md").read_text(
            encoding="utf-8"
        )
    config = model.config
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return environment.from_string(text).render(
        config=config,
        source=source,
        options=options,
        notes=notes,
        parameters=model.num_parameters_by_component(),
        stm_shape=" x ".join(str(n) for n in config.stm_shape),
        attribution_notice=ATTRIBUTION_NOTICE,
        licence_url=MODEL_LICENCE_URL,
        reference_repository=REFERENCE_REPOSITORY,
    )


# ----------------------------------------------------------------------------------------------------------
# the conversion


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_leftovers(components: list[Component]) -> None:
    for comp in components:
        comp.drop(ROPE_BUFFER.pattern)
        left = comp.leftovers()
        if left:
            shown = ", ".join(f"'{comp.name(key)}'" for key in left[:6])
            raise ReferenceConversionError(
                f"{comp.weights_file}: {len(left)} unexpected tensor(s) in the {comp.role}: {shown}"
                f"{' ...' if len(left) > 6 else ''}. Nothing in the reference's inference reads them with the "
                f"architecture {comp.config_file.name} describes (a different rxlm version or a modified model?)."
            )


def _resolve_sources(
    src, decoder, encoder, memory_attention, notes
) -> tuple[str, dict, dict[str, Component], list[Path]]:
    """('whole' | 'components', whole config or {}, components, folders searched for a tokenizer)."""
    if any(p is not None for p in (decoder, encoder, memory_attention)):
        missing = [
            n
            for n, p in (("decoder", decoder), ("encoder", encoder), ("memory_attention", memory_attention))
            if p is None
        ]
        if missing:
            raise ReferenceConversionError(
                f"separate component folders need all three: {missing} not given (decoder=, encoder=, "
                "memory_attention= / --decoder --encoder --memory-attention)."
            )
        folders = {"decoder": Path(decoder), "encoder": Path(encoder), "memory_attention": Path(memory_attention)}
        components = {role: _read_component(role, folder, notes) for role, folder in folders.items()}
        search = ([Path(src)] if src is not None else []) + list(folders.values())
        return "components", {}, components, search
    if src is None:
        raise ReferenceConversionError(
            "nothing to convert: pass SRC (a reference folder) or the three component folders."
        )
    src = Path(src)
    if not src.is_dir():
        raise ReferenceConversionError(f"SRC={src} is not a folder.")
    config_file = src / "config.json"
    if config_file.exists():
        config = _read_json(config_file)
        if isinstance(config, dict) and "decoder_config" in config:
            config, components = _split_whole(src, notes)
            return "whole", config, components, [src]
        role = _component_role(src)
        raise ReferenceConversionError(
            f"{config_file} is not a whole RxTAlpha / RxTBeta config (no decoder_config / encoder_config / "
            "memory_attention_config)"
            + (
                f"; it is a {role} component: pass the three component folders (--decoder --encoder "
                "--memory-attention)."
                if role
                else ": not a reference checkpoint."
            )
        )
    found: dict[str, Path] = {}
    for child in sorted(p for p in src.iterdir() if p.is_dir()):
        role = _component_role(child)
        if role is None:
            continue
        if role in found:
            raise ReferenceConversionError(
                f"{src} holds two {role} folders ({found[role].name}, {child.name}): pass the component folders "
                "explicitly (--decoder --encoder --memory-attention)."
            )
        found[role] = child
    if set(found) != {"decoder", "encoder", "memory_attention"}:
        raise ReferenceConversionError(
            f"{src} is not a reference checkpoint: no config.json with decoder_config (a whole RxTAlpha / RxTBeta), "
            f"and its sub-folders hold {sorted(found) or 'no reference component'} instead of a decoder, an encoder "
            "and a memory attention."
        )
    components = {role: _read_component(role, folder, notes) for role, folder in found.items()}
    return "components", {}, components, [src] + list(found.values())


def convert_reference_checkpoint(
    src: str | os.PathLike | None,
    dest: str | os.PathLike,
    *,
    decoder: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    memory_attention: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    rope_layout: str = "interleaved",
    initial_stm: str = "normal",
    token_ids: dict[str, int] | None = None,
    source_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a reference (rxlm) RxT checkpoint into a folder of this project; returns DEST.

    Args:
        src: a whole `RxTAlpha` / `RxTBeta` folder, or a folder whose sub-folders are the decoder, encoder and
            memory-attention component folders (None when the three are given explicitly).
        dest: the folder to write (safetensors, config with `auto_map`, modeling files, tokenizer, README.md,
            `rxt_conversion.json`); written beside itself first and renamed at the end.
        decoder, encoder, memory_attention: explicit component folders (all three or none).
        tokenizer: the reference `tokenizer.json` or its folder (default: found in SRC / the component folders).
        rope_layout: "interleaved" (rxlm >= 0.3.40, December 2025 on) or "legacy" (older rxlm and RxNN).
        initial_stm: the converted model's `init_memory()`: "normal" (N(0, 1), what the reference's STM reset
            draws), "saved" (the STM buffer stored in the checkpoint, as a learned initial state) or "zeros".
        token_ids: overrides of the special-token ids (`{"bos_token_id": 2, ...}`).
        source_name: how the model card names the source, e.g. its Hub id "ReactiveAI/RxT-Alpha-Micro-Supervised"
            (also written as `base_model` when it looks like one); default: the SRC folder's name.
        overwrite: replace an existing non-empty DEST.

    Raises:
        ReferenceConversionError: not a reference checkpoint, an unsupported variant or feature, a missing or
            unexpected tensor, a shape that does not follow from config.json; the message names file and key.
    """
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

    if rope_layout not in ROPE_LAYOUTS:
        raise ReferenceConversionError(
            f"rope_layout={rope_layout!r} is unknown: use 'interleaved' (rxlm >= 0.3.40) or 'legacy' (older rxlm "
            "and RxNN)."
        )
    if initial_stm not in INITIAL_STM_MODES:
        raise ReferenceConversionError(f"initial_stm={initial_stm!r} is unknown: use one of {INITIAL_STM_MODES}.")
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())) and not overwrite:
        raise ReferenceConversionError(
            f"DEST={dest} exists and is not empty: choose another folder or pass overwrite=True (--overwrite)."
        )

    notes: list[str] = []
    kind, whole_config, components, search = _resolve_sources(src, decoder, encoder, memory_attention, notes)
    dec, enc, mem = components["decoder"], components["encoder"], components["memory_attention"]

    # the memory-attention network: what was built (the tensors decide), checked against the name
    memory_class = detect_memory_class(mem)
    model_class = None
    if kind == "whole":
        model_class = "RxTBeta" if "think_token_id" in (whole_config.get("tokenizer_config") or {}) else "RxTAlpha"
        named = whole_config.get(
            "memory_attention_variant", "self-interlayer" if model_class == "RxTBeta" else "interlayer"
        )
        if named not in MEMORY_ATTENTION_VARIANTS:
            raise ReferenceConversionError(
                f"{dec.config_file}: memory_attention_variant={named!r} is unknown: the reference builds "
                f"{MEMORY_ATTENTION_VARIANTS}."
            )
        # rxlm 0.3.92: 'grouped-self-interlayer' builds the grouped network, every other name the self-interlayer one
        grouped = named == "grouped-self-interlayer"
        if named == "interlayer":
            notes.append(
                "memory_attention_variant='interlayer': rxlm 0.3.92's RxTAlpha builds the self-interlayer network for "
                "it (its if / if / else); converted as built"
            )
        if not grouped:
            mem.config["num_groups"] = 1  # only the grouped network reads num_groups
        if memory_class != "self-interlayer":
            notes.append(
                f"the tensors are those of the {memory_class} memory attention, not the "
                f"{'grouped ' if grouped else ''}self-interlayer network rxlm 0.3.92 builds for {named!r}: converted "
                "as found"
            )
    if memory_class == "self-interlayer" and mem.config["num_groups"] != 1:
        notes.append(f"grouped self-interlayer memory attention ({mem.config['num_groups']} groups of layers)")

    tokenizer_file = find_tokenizer([tokenizer] if tokenizer is not None else search)
    from tokenizers import Tokenizer

    try:
        token_vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab()
    except Exception as error:
        raise ReferenceConversionError(f"{tokenizer_file} cannot be read by `tokenizers` ({error}).") from None
    ids = special_token_ids(
        tokenizer_file, token_vocab, {**(whole_config.get("tokenizer_config") or {}), **(token_ids or {})}
    )
    if len(token_vocab) > dec.config["vocab_size"]:
        raise ReferenceConversionError(
            f"{tokenizer_file}: the tokenizer has {len(token_vocab)} tokens, more than the model's vocab_size="
            f"{dec.config['vocab_size']} ({dec.config_file}): not this model's tokenizer."
        )

    arguments = build_config(dec, enc, mem, memory_class, ids, initial_stm, notes)
    try:
        config = RxTConfig(**arguments)
    except ValueError as error:
        raise ReferenceConversionError(f"the reference architecture has no equivalent here: {error}") from None

    mapper = Mapper(config, rope_layout, notes)
    # shared embedding: share_components() gives the decoder the encoder's embedding
    embeddings = [c for c in (enc, dec) if c.has("embedding.weight")]
    if not embeddings:
        raise ReferenceConversionError(
            f"{dec.weights_file}: no token embedding ('{dec.name('embedding.weight')}' or "
            f"'{enc.name('embedding.weight')}'); expected one of shape [{config.vocab_size}, {config.hidden_size}]."
        )
    embedding = embeddings[0].take(
        "embedding.weight", (config.vocab_size, config.hidden_size), "the shared token embedding"
    )
    for other in embeddings[1:]:
        duplicate = other.take(
            "embedding.weight", (config.vocab_size, config.hidden_size), "the decoder's token embedding"
        )
        if not torch.equal(duplicate, embedding):
            notes.append(
                f"the decoder's own embedding ({other.weights_file}) differs from the encoder's; the encoder's is "
                "used, as share_components() does"
            )
    mapper.put("model.embed_tokens.weight", embedding)
    mapper.decoder(dec)
    mapper.encoder(enc)
    mapper.memory_attention(mem, memory_class)

    stm_sources = [c for c in (mem, dec, enc) if c.has("stm.memory")]
    if initial_stm == "saved":
        if not stm_sources:
            raise ReferenceConversionError(
                f"initial_stm='saved' but no STM is stored ('{mem.name('stm.memory')}' or '{dec.name('stm.memory')}')."
            )
        layers, slots, dim = config.stm_shape
        stored = stm_sources[0].tensors["stm.memory"]
        if stored.dim() != 4 or (stored.shape[0], stored.shape[2], stored.shape[3]) != (layers, slots, dim):
            raise ReferenceConversionError(
                f"{stm_sources[0].weights_file}: '{stm_sources[0].name('stm.memory')}' has shape {list(stored.shape)}, "
                f"expected [{layers}, batch, {slots}, {dim}]."
            )
        if stored.shape[1] != 1:
            notes.append(f"the stored STM holds a batch of {stored.shape[1]}: its first row is the initial state")
        mapper.put("model.memory_attention.initial_stm", stored[:, 0].to(torch.float32))
    for comp in stm_sources:
        comp.drop(r"^stm\.memory$")
    _check_leftovers([dec, enc, mem])
    if any(t.dtype == torch.bfloat16 for c in (dec, enc, mem) for t in c.tensors.values()):
        notes.append("bfloat16 tensors (grouped-GEMM experts) were stored as float32")

    model = RxTForCausalLM(config)
    missing, unexpected = model.load_state_dict(mapper.state, strict=False)
    if missing or unexpected:  # a converter bug, not a user error: say so
        raise ReferenceConversionError(
            f"internal conversion error: this project's model expects {sorted(missing)[:6]} and got "
            f"{sorted(unexpected)[:6]} it does not know; please report it with the source config.json."
        )
    model.eval()
    converted_tokenizer = convert_tokenizer(tokenizer_file, ids, config.max_position_embeddings)

    folders = {c.role: c.weights_file.parent.name for c in (dec, enc, mem)}
    if source_name is None:
        source_name = Path(src).resolve().name if src is not None else ", ".join(folders.values())
    source = {
        "name": source_name,
        "base_model": source_name if re.fullmatch(r"[\w.-]+/[\w.-]+", source_name) else None,
        "kind": kind,
        "model_class": model_class,
        "folders": folders,
        "weights_sha256": {c.role: _sha256(c.weights_file) for c in (dec, enc, mem)},
        "tokenizer": f"{tokenizer_file.parent.name}/{tokenizer_file.name}",
        "memory_attention_built": memory_class
        + (f" ({config.memory_interlayer_groups} groups)" if config.memory_interlayer_groups > 1 else ""),
        "reference": "rxlm 0.3.x (RxTAlpha / RxTBeta)",
    }
    options = {"rope_layout": rope_layout, "initial_stm": initial_stm}

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.converting-", dir=dest.parent))
    try:
        model.save_pretrained(staging)
        converted_tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(render_model_card(model, source, options, notes), encoding="utf-8")
        record = {"source": source, "options": options, "notes": notes, "config_switches": arguments}
        (staging / "rxt_conversion.json").write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if dest.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.replaced-", dir=dest.parent))
            os.replace(dest, backup / dest.name)
            try:
                os.replace(staging, dest)
            except BaseException:
                os.replace(backup / dest.name, dest)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for note in notes:
        logger.info("convert: %s", note)
    return dest


__all__ = [
    "convert_reference_checkpoint",
    "ReferenceConversionError",
    "ROPE_LAYOUTS",
    "INITIAL_STM_MODES",
    "ATTRIBUTION_NOTICE",
    "halves_permutation",
]
