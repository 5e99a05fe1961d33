"""RoPE scaling: `rope_parameters` with rope_type linear / dynamic / yarn / longrope / llama3 gives, for every attention
role's head dim, the cos / sin of transformers' `LlamaRotaryEmbedding` built with that head dim; a scaled tiny model
generates, saves and reloads; the default RoPE is the formula it always was; bad parameters fail at config time."""

import copy

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.modeling_rxt import RxTRotaryEmbedding
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

MAX_POSITIONS = 64


def rope_parameters(rope_type: str, head_dim: int = 16) -> dict:
    """One setting per rope type, extending a 16-position pre-training length to `MAX_POSITIONS`."""
    half = head_dim // 2
    return {
        "default": {"rope_type": "default", "rope_theta": 10000.0},
        "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        "yarn": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16},
        "longrope": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": 16,
        },
        "llama3": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }[rope_type]


def tiny_config(**overrides):
    return RxTConfig.from_preset("rxt-tiny", **overrides)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RxTForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(8, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def unsigned(signed_sin: torch.Tensor) -> torch.Tensor:
    """RxT keeps `sin` with its first half negated (see `RotaryTables.rotate`); Llama's `sin` is both halves positive."""
    half = signed_sin.shape[-1] // 2
    return torch.cat((signed_sin[..., half:], signed_sin[..., half:]), dim=-1)


# ----------------------------------------------------------------------------------------------------
# the tables equal transformers' own rotary embedding, per head dim


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "yarn", "longrope", "llama3"])
def test_cos_sin_equal_llama_rotary_embedding_for_every_role_head_dim(rope_type):
    # self-attention head dim 8, memory cross-attention 16, memory attention 32 (longrope: one head dim, 16)
    heads = (4, 4, 4) if rope_type == "longrope" else (8, 4, 2)
    config = tiny_config(
        hidden_size=64,
        max_position_embeddings=MAX_POSITIONS,
        num_attention_heads=heads[0],
        num_query_heads=heads[0],
        num_key_value_heads=heads[0],
        memory_cross_attention_heads=heads[1],
        memory_cross_attention_query_heads=heads[1],
        memory_cross_attention_key_value_heads=heads[1],
        memory_attention_heads=heads[2],
        memory_attention_query_heads=heads[2],
        memory_attention_key_value_heads=heads[2],
        rope_parameters=rope_parameters(rope_type),
    )
    model = RxTForCausalLM(config)
    rotary = model.model.decoder.rotary_emb
    head_dims = sorted({64 // h for h in heads})
    for head_dim in head_dims:
        llama = LlamaRotaryEmbedding(
            LlamaConfig(
                hidden_size=64,
                num_attention_heads=64 // head_dim,
                head_dim=head_dim,
                max_position_embeddings=MAX_POSITIONS,
                rope_parameters=rope_parameters(rope_type, head_dim),
            )
        )
        # growing lengths, as in generation: within the pre-training length, past it, past max_position_embeddings
        for length in (12, 40, 100):
            positions = torch.arange(length)[None].expand(2, -1)  # [B, T]
            llama_cos, llama_sin = llama(torch.zeros(1, dtype=torch.float32), positions)  # [B, T, hd]
            cos, signed_sin = rotary(positions).get(head_dim, torch.float32, positions.device)  # [B, 1, T, hd]
            torch.testing.assert_close(cos[:, 0], llama_cos, rtol=0, atol=1e-6)
            torch.testing.assert_close(unsigned(signed_sin)[:, 0], llama_sin, rtol=0, atol=1e-6)
    if rope_type != "default":  # the scaling reaches the tables
        default = RxTRotaryEmbedding(tiny_config(hidden_size=64, max_position_embeddings=MAX_POSITIONS))
        positions = torch.arange(100)[None]
        scaled_cos = rotary(positions).get(head_dims[-1], torch.float32, positions.device)[0]
        assert not torch.equal(scaled_cos, default(positions).get(head_dims[-1], torch.float32, positions.device)[0])


def test_dynamic_rope_is_the_default_rope_up_to_max_position_embeddings():
    dynamic = RxTRotaryEmbedding(tiny_config(rope_parameters=rope_parameters("dynamic")))
    default = RxTRotaryEmbedding(tiny_config())
    within, beyond = torch.arange(MAX_POSITIONS)[None], torch.arange(MAX_POSITIONS + 1)[None]
    assert torch.equal(dynamic(within).get(8, torch.float32, "cpu")[0], default(within).get(8, torch.float32, "cpu")[0])
    assert not torch.equal(
        dynamic(beyond).get(8, torch.float32, "cpu")[0], default(beyond).get(8, torch.float32, "cpu")[0]
    )


# ----------------------------------------------------------------------------------------------------
# the default RoPE is unchanged


def original_rope_inv_freq(self, head_dim, position_ids):
    """The default RoPE as RxT computed it before scaling existed: Llama's formula for the role's head dim."""
    base = self.config.rope_parameters["rope_theta"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=position_ids.device, dtype=torch.float)
    return 1.0 / (base ** (exponents / head_dim)), 1.0


def test_default_rope_is_bit_identical_to_the_original_formula(monkeypatch):
    # roles with head dims 8 (self-attention), 16 (memory cross-attention), 4 (memory attention)
    overrides = dict(memory_cross_attention_heads=2, memory_cross_attention_query_heads=2,
                     memory_cross_attention_key_value_heads=1, memory_attention_heads=8, memory_attention_query_heads=4,
                     memory_attention_key_value_heads=2, memory_pre_attention_query_heads=4,
                     memory_pre_attention_key_value_heads=2)  # fmt: skip
    model = tiny_model(**overrides)
    positions = torch.arange(20)[None]
    tables = model.model.decoder.rotary_emb(positions)
    for head_dim in (4, 8, 16):
        inv_freq, _ = original_rope_inv_freq(tables.rotary_emb, head_dim, positions)
        freqs = positions.float()[..., None] * inv_freq
        cos, signed_sin = tables.get(head_dim, torch.float32, positions.device)
        assert torch.equal(cos[:, 0], torch.cat((freqs.cos(), freqs.cos()), dim=-1))
        assert torch.equal(signed_sin[:, 0], torch.cat((-freqs.sin(), freqs.sin()), dim=-1))

    ids = random_ids(2, 12)
    with torch.no_grad():
        stm = model.update_memory(model.init_memory(2), ids)
        logits = model(ids, stm_state=stm).logits
        monkeypatch.setattr(RxTRotaryEmbedding, "inv_freq", original_rope_inv_freq)
        original_stm = model.update_memory(model.init_memory(2), ids)
        original_logits = model(ids, stm_state=original_stm).logits
    assert torch.equal(stm, original_stm)
    assert torch.equal(logits, original_logits)


# ----------------------------------------------------------------------------------------------------
# a scaled model runs, generates and round-trips


def greedy_reference(model, ids, stm, steps):
    """Greedy decoding without a cache: every step reruns the whole sequence."""
    with torch.no_grad():
        for _ in range(steps):
            token = model(ids, stm_state=stm, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=-1)
    return ids


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_scaled_model_generates_saves_and_reloads(rope_type, tmp_path):
    parameters = rope_parameters(rope_type, head_dim=8)
    model = tiny_model(rope_parameters=copy.deepcopy(parameters))
    ids = random_ids(2, 10)
    with torch.no_grad():
        stm = model.update_memory(model.init_memory(2), ids)
        logits = model(ids, stm_state=stm).logits
        generated = model.generate(ids, stm_state=stm, max_new_tokens=6, do_sample=False)
        default_logits = tiny_model()(ids, stm_state=stm).logits
    assert not torch.allclose(logits, default_logits)  # the scaling changes the model
    assert torch.equal(generated, greedy_reference(model, ids, stm, 6))  # cached positions match a full rerun

    model.save_pretrained(tmp_path)
    reloaded = RxTForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert {k: v for k, v in reloaded.config.rope_parameters.items() if k in parameters} == parameters
    with torch.no_grad():
        reloaded_stm = reloaded.update_memory(reloaded.init_memory(2), ids)
        assert torch.equal(reloaded_stm, stm)
        assert torch.equal(reloaded(ids, stm_state=stm).logits, logits)
        assert torch.equal(reloaded.generate(ids, stm_state=stm, max_new_tokens=6, do_sample=False), generated)


# ----------------------------------------------------------------------------------------------------
# bad rope_parameters fail at config time


@pytest.mark.parametrize(
    "parameters, fix",
    [
        ({"rope_type": "ntk-by-parts", "factor": 2.0}, "choose one of"),
        ({"rope_type": "proportional", "rope_theta": 10000.0}, "choose one of"),
        ({"rope_type": "linear"}, "Missing required keys"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 16}, "Missing required keys"),
        ({"rope_type": "linear", "factor": 0.5}, "factor=0.5 must be a number >= 1"),
        ({"rope_type": "dynamic", "factor": "2"}, "must be a number"),
        ({"rope_type": "default", "rope_theta": 0.0}, "rope_theta=0.0 must be a number > 0"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "RxT rotates whole heads"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": -4}, "positive integer"),
        ({"rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0}, "attention_factor"),
        (
            {**rope_parameters("llama3"), "low_freq_factor": 4.0, "high_freq_factor": 1.0},
            "high_freq_factor > low_freq_factor",
        ),
        ({**rope_parameters("longrope", head_dim=8), "long_factor": [1.0] * 3}, "head_dim / 2 = 4 numbers"),
    ],
)
def test_bad_rope_parameters_raise_naming_the_field_and_the_fix(parameters, fix):
    with pytest.raises(ValueError, match="rope_parameters") as error:
        tiny_config(rope_parameters=parameters)
    assert fix in str(error.value)


def test_longrope_needs_one_head_dim_for_all_roles():
    with pytest.raises(ValueError, match=r"longrope needs one head dim in every attention role, got \[8, 16\]"):
        tiny_config(
            memory_cross_attention_heads=2,
            memory_cross_attention_query_heads=2,
            memory_cross_attention_key_value_heads=2,
            rope_parameters=rope_parameters("longrope", head_dim=8),
        )
