"""RxT model: config validation, components, memory semantics, attention backends, save / remote-code load."""

import copy
import json
import os
import subprocess
import textwrap

import pytest
import torch

from conftest import remote_env, remote_python
from rxt_hf.modeling_rxt import CACHE_FIELD, RxTConfig, RxTForCausalLM, RxTModel, output_cache
from transformers import AutoModelForCausalLM


def tiny_config(**overrides):
    return RxTConfig.from_preset("rxt-tiny", **overrides)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RxTForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch, length, seed=1, vocab=500):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(8, vocab, (batch, length), generator=generator)


# ----------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(num_query_heads=8), "num_query_heads"),
        (dict(num_query_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(memory_cross_attention_query_heads=6), "memory_cross_attention_query_heads"),
        (dict(memory_attention_key_value_heads=3), "memory_attention_key_value_heads"),
        (dict(memory_attention_variant="fancy"), "memory_attention_variant"),
        (dict(residual_gate_type="sometimes"), "residual_gate_type"),
        (dict(residual_gate_activation="relu"), "residual_gate_activation"),
        (dict(residual_gate_granularity="token"), "residual_gate_granularity"),
        (dict(stm_init_mode="ones"), "stm_init_mode"),
        (dict(init_scheme="xavier"), "init_scheme"),
        (dict(decoder_feed_forward="sparse"), "decoder_feed_forward"),
        (dict(num_experts_per_token=5), "num_experts_per_token"),
        (dict(stm_size=0), "stm_size"),
        (dict(pad_token_id=10_000), "pad_token_id"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_attention_variants_are_settings_of_one_module():
    variants = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1), "sqa": (4, 2), "ssqa": (4, 4), "xsqa": (2, 2)}
    for name, (query, kv) in variants.items():
        config = RxTConfig(hidden_size=64, num_attention_heads=8, num_query_heads=query, num_key_value_heads=kv)
        attention = RxTModel(config).decoder.layers[0].self_attn
        assert attention.q_proj.out_features == query * 8, name
        assert attention.k_proj.out_features == kv * 8, name
        assert attention.o_proj.in_features == query * 8, name  # SQA: smaller output projection


def test_unknown_preset_and_roundtrip_through_dict():
    with pytest.raises(ValueError, match="rxt-gigantic"):
        RxTConfig.from_preset("rxt-gigantic")
    config = RxTConfig.from_preset("rxt-alpha-micro")
    again = RxTConfig.from_dict(config.to_dict())
    assert again.attention_heads() == config.attention_heads()
    assert again.stm_shape == (6, 256, 128)


def test_micro_preset_matches_the_model_card():
    model = RxTForCausalLM(RxTConfig.from_preset("rxt-alpha-micro"))
    counts = model.num_parameters_by_component()
    print("rxt-alpha-micro parameters:", json.dumps(counts))
    card = {"total": 12e6, "decoder": 9e6, "decoder_active": 3.5e6, "encoder": 1.9e6, "memory_attention": 1.2e6}
    for component, expected in card.items():
        assert abs(counts[component] - expected) / expected <= 0.15, (component, counts[component], expected)
    config = model.config
    assert config.attention_heads() == {
        "self_attention": (8, 4, 4),
        "memory_cross_attention": (8, 4, 4),
        "memory_attention": (8, 4, 4),
    }
    assert (config.num_experts, config.num_experts_per_token, config.decoder_intermediate_size) == (12, 2, 256)
    assert config.encoder_intermediate_size == 384 and config.memory_attention_variant == "interlayer"


# ----------------------------------------------------------------------------------------------------
# forward, memory semantics


def test_forward_returns_loss_with_aux_logits_and_hidden_states():
    model = tiny_model()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 12, 512)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.router_aux_loss > 0
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    expected = plain + model.config.router_aux_loss_coef * out.router_aux_loss
    torch.testing.assert_close(out.loss, expected)
    ignored = ids.clone()
    ignored[:, :6] = -100
    assert not torch.isclose(model(ids, labels=ignored).loss, out.loss)


def test_decoder_logits_depend_on_memory():
    model = tiny_model()
    ids = random_ids(1, 10)
    first = model(ids, stm_state=model.init_memory(1, mode="normal", generator=torch.Generator().manual_seed(1)))
    second = model(ids, stm_state=model.init_memory(1, mode="normal", generator=torch.Generator().manual_seed(2)))
    assert (first.logits - second.logits).abs().max() > 1e-4


def test_memory_reads_normalise_queries_and_keys_per_head():
    model = tiny_model()
    cross = model.model.decoder.layers[0].memory_cross_attn
    write = model.model.memory_attention.layers[0].attention
    self_attn = model.model.decoder.layers[0].self_attn
    assert cross.qk_norm and write.qk_norm and not self_attn.qk_norm
    assert tuple(cross.q_norm.weight.shape) == (cross.head_dim,)
    plain = tiny_model(memory_qk_norm=False)
    assert not plain.model.decoder.layers[0].memory_cross_attn.qk_norm
    assert not any("q_norm" in name for name, _ in plain.named_parameters())
    # the attention pattern depends on the direction of each head's query, not its length
    ids, stm = random_ids(1, 6), torch.randn(1, *model.config.stm_shape)
    for candidate, invariant in ((model, True), (plain, False)):
        before = candidate(ids, stm_state=stm).logits
        with torch.no_grad():
            candidate.model.decoder.layers[0].memory_cross_attn.q_proj.weight.mul_(5.0)
        after = candidate(ids, stm_state=stm).logits
        assert torch.allclose(before, after, atol=1e-4) == invariant


def test_init_schemes_set_the_weight_scales():
    fan_in = tiny_model(hidden_size=64, num_attention_heads=4, vocab_size=2000)
    embedding = fan_in.model.embed_tokens.weight
    assert 0.9 < float(embedding[8:].std()) < 1.1  # unit-variance token embedding
    assert float(embedding[fan_in.config.pad_token_id].abs().max()) == 0.0  # padding row stays zero
    q_proj = fan_in.model.decoder.layers[0].self_attn.q_proj.weight
    bound = q_proj.shape[1] ** -0.5
    assert float(q_proj.abs().max()) <= bound and float(q_proj.abs().max()) > 0.9 * bound  # U(-1/sqrt(fan_in), ..)
    gate = fan_in.model.memory_attention.layers[0].gate.proj.bias
    assert torch.allclose(gate, torch.full_like(gate, fan_in.config.residual_gate_init_bias))  # gates keep their bias
    normal = tiny_model(hidden_size=64, num_attention_heads=4, vocab_size=2000, init_scheme="normal")
    assert abs(float(normal.model.embed_tokens.weight[8:].std()) - normal.config.initializer_range) < 0.002


def test_memory_rope_false_makes_memory_reads_position_free():
    # a memory read rotated by the query position (the paper's RoPE on queries) changes with the position
    # of the reading token; with memory_rope=False it depends on content only
    stm = torch.randn(1, *tiny_config().stm_shape)
    for memory_rope, position_free in ((True, False), (False, True)):
        model = tiny_model(memory_rope=memory_rope)
        cross = model.model.decoder.layers[0].memory_cross_attn
        assert cross.rope_query == memory_rope
        assert model.model.memory_attention.layers[0].attention.rope_key == memory_rope
        hidden = torch.randn(1, 1, model.config.hidden_size).expand(1, 5, -1)  # one state at positions 0..4
        rotary = model.model.decoder.rotary_emb(torch.arange(5)[None])
        with torch.no_grad():
            out, _ = cross(hidden, key_value_states=stm[:, 0], rotary=rotary)
        assert torch.allclose(out[:, 0], out[:, 4], atol=1e-5) == position_free


def test_permuting_memory_slots_leaves_decoder_logits_unchanged():
    model = tiny_model()
    ids = random_ids(2, 10)
    stm = torch.randn(2, *model.config.stm_shape)
    permutation = torch.randperm(model.config.stm_size)
    logits = model(ids, stm_state=stm).logits
    permuted = model(ids, stm_state=stm[:, :, permutation]).logits
    torch.testing.assert_close(logits, permuted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_type", ["static", "elementwise", "linear"])
def test_simple_memory_attention_with_per_layer_gate_is_permutation_equivariant(gate_type):
    model = tiny_model(
        memory_attention_variant="simple", residual_gate_granularity="layer", residual_gate_type=gate_type
    )
    stm = torch.randn(2, *model.config.stm_shape)
    ids = random_ids(2, 14)
    permutation = torch.randperm(model.config.stm_size)
    new = model.update_memory(stm, ids)
    new_from_permuted = model.update_memory(stm[:, :, permutation], ids)
    torch.testing.assert_close(new[:, :, permutation], new_from_permuted, atol=1e-5, rtol=1e-5)


def test_encoder_is_bidirectional_and_decoder_is_causal():
    model = tiny_model()
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 8:] = random_ids(1, 4, seed=7)[0]
    stm = model.init_memory(1)
    decoder_before = model(ids, stm_state=stm).logits
    decoder_after = model(changed, stm_state=stm).logits
    torch.testing.assert_close(decoder_before[:, :8], decoder_after[:, :8])  # past unaffected by the future
    assert (decoder_before[:, 8:] - decoder_after[:, 8:]).abs().max() > 1e-4
    encoder_before = model.model.encode(ids).last_hidden_state
    encoder_after = model.model.encode(changed).last_hidden_state
    assert (encoder_before[:, :8] - encoder_after[:, :8]).abs().max() > 1e-4  # earlier tokens see later ones


@pytest.mark.parametrize("variant", ["simple", "self", "interlayer", "gated-self-interlayer"])
@pytest.mark.parametrize(
    "gate", [("static", "sigmoid", "slot"), ("elementwise", "tanh", "layer"), ("linear", "sigmoid", "layer")]
)
def test_every_memory_attention_variant_and_gate_updates_memory(variant, gate):
    gate_type, activation, granularity = gate
    model = tiny_model(
        memory_attention_variant=variant,
        residual_gate_type=gate_type,
        residual_gate_activation=activation,
        residual_gate_granularity=granularity,
    )
    stm = model.init_memory(2)
    new = model.update_memory(stm, random_ids(2, 10))
    assert new.shape == stm.shape and torch.isfinite(new).all()
    assert (new - stm).abs().max() > 1e-5
    new.sum().backward()
    assert all(p.grad is not None for p in model.model.memory_attention.layers.parameters())


def test_sigmoid_gate_keeps_memory_bounded_over_many_updates():
    model = tiny_model()
    stm = model.init_memory(1)
    with torch.no_grad():
        for turn in range(50):
            stm = model.update_memory(stm, random_ids(1, 16, seed=turn))
    assert stm.abs().max() < 50  # a convex blend of normalised updates cannot explode


def test_memory_attention_ignores_padding():
    model = tiny_model()
    stm = model.init_memory(1)
    ids = random_ids(1, 10)
    padded = torch.cat([ids, torch.full((1, 5), model.config.pad_token_id)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1).long()
    torch.testing.assert_close(model.update_memory(stm, ids), model.update_memory(stm, padded, mask))


def test_dense_decoder_feed_forward_has_no_aux_loss():
    model = tiny_model(decoder_feed_forward="dense")
    ids = random_ids(1, 8)
    out = model(ids, labels=ids)
    assert out.router_aux_loss == 0
    assert torch.isfinite(out.loss)


def test_moe_routes_top_k_and_records_router_logits():
    model = tiny_model(num_shared_experts=1)
    moe = model.model.decoder.layers[0].feed_forward
    x = torch.randn(3, 7, model.config.hidden_size)
    out, router_logits = moe(x)
    assert out.shape == x.shape and router_logits.shape == (3 * 7, 4)
    assert tuple(moe.experts.gate_up_proj.shape) == (4, 2 * 64, 32) and tuple(moe.experts.down_proj.shape) == (4, 32, 64)
    counts = model.num_parameters_by_component()
    per_expert = 3 * 32 * 64
    layers = model.config.num_hidden_layers
    assert counts["decoder"] - counts["decoder_active"] == layers * (4 - 2) * per_expert
    ids = random_ids(2, 6)
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == layers and out.router_logits[0].shape == (2 * 6, 4)
    assert out.aux_loss > 0 and out.router_aux_loss is out.aux_loss


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("bias", [False, True])
def test_every_experts_implementation_matches_a_dense_reference(implementation, bias):
    # transformers' experts implementations (grouped_mm, the default; batched_mm) and the eager one agree with a
    # token-by-token reference, for a decoding step (one token) and for many tokens
    model = tiny_model(num_shared_experts=1, moe_expert_bias=bias)
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    moe = model.model.decoder.layers[0].feed_forward
    experts = moe.experts
    if bias:
        with torch.no_grad():
            experts.gate_up_proj_bias.normal_()
            experts.down_proj_bias.normal_()
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        batched, _ = moe(x)
        one_by_one = torch.cat([moe(x[:, t : t + 1])[0] for t in range(5)], dim=1)
        # reference: renormalised top-k router probabilities, every expert as its own gated feed-forward
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(moe.router(flat), -1)
        weights, chosen = probs.topk(moe.top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        hidden = model.config.decoder_intermediate_size
        expected = moe.shared_experts[0](flat).clone()
        for n in range(flat.shape[0]):
            for w, e in zip(weights[n], chosen[n].tolist()):
                gate_up = experts.gate_up_proj[e] @ flat[n] + (experts.gate_up_proj_bias[e] if bias else 0)
                inner = torch.nn.functional.silu(gate_up[:hidden]) * gate_up[hidden:]
                expected[n] += w * (experts.down_proj[e] @ inner + (experts.down_proj_bias[e] if bias else 0))
    torch.testing.assert_close(one_by_one, batched, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched.reshape(-1, x.shape[-1]), expected, atol=1e-6, rtol=1e-5)


def test_load_balancing_loss_is_transformers_own():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_model()
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, 4, 2, mask)
    torch.testing.assert_close(out.aux_loss, expected)


def test_router_aux_loss_only_when_training_or_asked():
    model = tiny_model()
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert model(ids).router_aux_loss is None  # eval, no labels: inference skips the balancing loss
        assert model(ids, output_router_aux_loss=True).router_aux_loss > 0
        with_labels = model(ids, labels=ids)
    assert with_labels.router_aux_loss > 0
    model.train()
    assert model(ids).router_aux_loss > 0


def test_return_dict_false_returns_tuples():
    model = tiny_model()
    ids = random_ids(2, 6)
    with torch.no_grad():
        full = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], full.loss)  # loss, aux_loss, logits, cache
        torch.testing.assert_close(as_tuple[2], full.logits)
        backbone = model.model(ids, return_dict=False)
        assert isinstance(backbone, tuple)
        torch.testing.assert_close(backbone[0], model.model(ids).last_hidden_state)
        model.config.return_dict = False
        assert isinstance(model(ids), tuple) and isinstance(model.model(ids), tuple)
        assert not isinstance(model(ids, return_dict=True), tuple)


def test_rope_parameters_replace_the_top_level_rope_theta():
    config = tiny_config(rope_theta=500.0)  # the earlier argument (and config.json key) is moved in
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert config.rope_theta == 500.0 and "rope_theta" not in config.to_dict()
    assert tiny_config().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    reloaded = RxTConfig.from_dict(config.to_dict())
    assert reloaded.rope_parameters == config.rope_parameters
    with pytest.raises(ValueError, match="rope_parameters"):  # scaling types: tests/test_rope_scaling.py
        tiny_config(rope_parameters={"rope_type": "ntk-by-parts", "factor": 2.0, "rope_theta": 10000.0})
    ids = random_ids(1, 8)
    logits = {theta: tiny_model(rope_theta=theta)(ids).logits for theta in (500.0, 10000.0)}
    assert not torch.allclose(logits[500.0], logits[10000.0])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_decode_step_reads_nothing_back_to_the_host(implementation, monkeypatch):
    """One decoding step (a token with the cache of a padded batch) never reads a tensor on the host (`.item()`,
    `.tolist()`, `bool(tensor)`, ...): on an accelerator each of those would wait for the device."""
    config = tiny_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    stm = torch.randn(2, *config.stm_shape)
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, stm_state=stm)
        token = prefill.logits[:, -1:].argmax(-1)
        reads = []
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"):
            original = getattr(torch.Tensor, name)

            def record(self, *args, _name=name, _original=original, **kwargs):
                reads.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, record)
        model(token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1), stm_state=stm,
              **{CACHE_FIELD: output_cache(prefill)})
        monkeypatch.undo()
    assert reads == []


def test_wrong_stm_state_raises_naming_the_expected_shape():
    model = tiny_model()
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"expected \[batch=2, layers=2, slots=8, dim=32\]"):
        model(ids, stm_state=torch.zeros(2, 2, 7, 32))
    with pytest.raises(ValueError, match="expected"):
        model(ids, stm_state=torch.zeros(2, 8, 32))
    with pytest.raises(TypeError, match=r"dtype torch.float16.*\[batch=2"):
        model(ids, stm_state=torch.zeros(2, 2, 8, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 65))


# ----------------------------------------------------------------------------------------------------
# attention backends, padding, gradient checkpointing


def test_eager_and_sdpa_agree():
    config = tiny_config()
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stm = torch.randn(2, *config.stm_shape)
    real = mask.bool()  # what a padded position computes differs (sdpa: zeros) and is not part of the contract
    torch.testing.assert_close(
        eager(ids, attention_mask=mask, stm_state=stm).logits[real],
        sdpa(ids, attention_mask=mask, stm_state=stm).logits[real],
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        eager.update_memory(stm, ids, mask), sdpa.update_memory(stm, ids, mask), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(padding_side):
    model = tiny_model()
    pad = model.config.pad_token_id
    rows = [random_ids(1, 12, seed=3), random_ids(1, 7, seed=4)]
    stms = torch.randn(2, *model.config.stm_shape)
    ids = torch.full((2, 12), pad)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(12 - row.shape[1], 12) if padding_side == "left" else slice(0, row.shape[1])
        ids[i, span], mask[i, span] = row[0], 1
    batched = model(ids, attention_mask=mask, stm_state=stms).logits
    for i, row in enumerate(rows):
        alone = model(row, stm_state=stms[i : i + 1]).logits[0]
        span = slice(12 - row.shape[1], 12) if padding_side == "left" else slice(0, row.shape[1])
        torch.testing.assert_close(batched[i, span], alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        stm = model.update_memory(model.init_memory(2), ids)
        model(ids, stm_state=stm, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# save / load


def test_auto_class_from_config_without_remote_code():
    model = AutoModelForCausalLM.from_config(tiny_config())
    assert isinstance(model, RxTForCausalLM)


def test_tied_embeddings_are_stored_once(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    reloaded = RxTForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


REMOTE_LOADER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder, auto_name = sys.argv[1], sys.argv[2]
    auto = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}.get(auto_name)
    if auto is None:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
        print(config.model_type, config.stm_size)
        raise SystemExit
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "modeling_rxt" not in sys.modules, "the project must not be imported"
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        out = model(inputs["ids"], stm_state=inputs["stm"])
    result = {"output": out.logits if auto_name == "AutoModelForCausalLM" else out.last_hidden_state}
    if auto_name == "AutoModelForCausalLM":  # two turns of a conversation: generate, write memory, generate again
        stm = inputs["stm"]
        for turn in range(2):
            answer = model.generate(inputs["ids"], stm_state=stm, max_new_tokens=5, do_sample=False)
            stm = model.update_memory(stm, answer)
            result[f"answer{turn}"] = answer
        result["stm"] = stm
    torch.save(result, folder + "/" + auto_name + ".pt")
    """
)


def test_save_pretrained_writes_safetensors_modeling_files_and_auto_map(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_rxt.py", "modeling_rxt.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_rxt.RxTConfig",
        "AutoModel": "modeling_rxt.RxTModel",
        "AutoModelForCausalLM": "modeling_rxt.RxTForCausalLM",
    }


@pytest.mark.parametrize("auto_name", ["AutoConfig", "AutoModel", "AutoModelForCausalLM"])
def test_remote_code_round_trip_in_a_fresh_process(tmp_path, auto_name):
    """Load a saved folder in a process that never imports the project (with `$RXT_REMOTE_PYTHON`: another
    virtualenv, e.g. the newest transformers) and check logits, and a two-turn generate + memory update."""
    model = tiny_model()
    folder = tmp_path / "rxt-tiny"
    model.save_pretrained(folder)
    ids = random_ids(2, 9)
    stm = torch.randn(2, *model.config.stm_shape)
    torch.save({"ids": ids, "stm": stm}, folder / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOADER)
    result = subprocess.run(
        [remote_python(), str(script), str(folder), auto_name],
        cwd=tmp_path,
        env=remote_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if auto_name == "AutoConfig":
        assert result.stdout.split() == ["rxt", "8"]
        return
    loaded = torch.load(folder / f"{auto_name}.pt")
    with torch.no_grad():
        out = model(ids, stm_state=stm) if auto_name == "AutoModelForCausalLM" else model.model(ids, stm_state=stm)
        expected = out.logits if auto_name == "AutoModelForCausalLM" else out.last_hidden_state
        assert torch.equal(loaded["output"], expected)
        if auto_name == "AutoModelForCausalLM":
            for turn in range(2):
                answer = model.generate(ids, stm_state=stm, max_new_tokens=5, do_sample=False)
                stm = model.update_memory(stm, answer)
                assert torch.equal(loaded[f"answer{turn}"], answer)
            torch.testing.assert_close(loaded["stm"], stm)


def test_memory_can_ignore_template_tokens():
    model = tiny_model(memory_ignores_template_tokens=True)
    config = model.config
    content = random_ids(1, 6)
    interaction = torch.cat(
        [torch.tensor([[config.bos_token_id, config.query_token_id]]), content[:, :3],
         torch.tensor([[config.answer_token_id]]), content[:, 3:], torch.tensor([[config.eos_token_id]])], dim=1
    )
    stm = model.init_memory(1)
    encoded = model.model.encode(interaction).layer_states
    template = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 0]])
    expected = model.model.memory_attention(stm, encoded, template)
    torch.testing.assert_close(model.update_memory(stm, interaction), expected)
    model.config.memory_ignores_template_tokens = False
    assert (model.update_memory(stm, interaction) - expected).abs().max() > 1e-6
