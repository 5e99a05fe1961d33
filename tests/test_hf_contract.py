"""The transformers model contract for RxT, checked the way transformers' common tests do: output flags
(`output_attentions`, `output_hidden_states`, `return_dict`) in forward and in `generate(return_dict_in_generate=True)`,
every generation mode with a memory (`stm_state`) against the plain no-cache reference, a changed `stm_state` over a
filled cache, and the capability flags. Tiny config: GQA memory/self-attention heads (4 query, 2 key/value heads)
and an MoE decoder."""

import copy

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, RxTModel, output_cache
from transformers.cache_utils import StaticCache
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

BATCH, LENGTH, NEW = 2, 7, 5


def tiny_config(**overrides):
    overrides = {"num_query_heads": 4, "num_key_value_heads": 2, **overrides}
    return RxTConfig.from_preset("rxt-tiny", **overrides)


def tiny_model(cls=RxTForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def inputs(model, batch=BATCH, length=LENGTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    content = torch.randint(8, 400, (batch, length - 3), generator=generator)
    config = model.config
    bos = torch.full((batch, 1), config.bos_token_id)
    query = torch.full((batch, 1), config.query_token_id)
    answer = torch.full((batch, 1), config.answer_token_id)
    ids = torch.cat([bos, query, content, answer], dim=1)
    stm = model.init_memory(batch, mode="normal", generator=torch.Generator().manual_seed(seed)) * 50
    return ids, stm


def test_config_heads_are_gqa_and_decoder_is_moe():
    config = tiny_config()
    num_heads, query_heads, kv_heads = config.heads_for("self_attention")
    assert query_heads == 4 and kv_heads == 2 and config.decoder_feed_forward == "moe"


# --- forward outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RxTModel, RxTForCausalLM])
def test_output_attentions_and_hidden_states_shapes(cls):
    model = tiny_model(cls, attn_implementation="eager")
    config = model.config
    ids, stm = inputs(model)
    with torch.no_grad():
        out = model(ids, stm_state=stm, output_attentions=True, output_hidden_states=True)
    _, heads, _ = config.heads_for("self_attention")
    query_heads = config.heads_for("self_attention")[1]
    slots = config.stm_shape[1]
    assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
    for self_weights, cross_weights in zip(out.attentions, out.cross_attentions):
        assert tuple(self_weights.shape) == (BATCH, query_heads, LENGTH, LENGTH)
        assert tuple(cross_weights.shape) == (BATCH, config.heads_for("memory_cross_attention")[1], LENGTH, slots)
        assert torch.allclose(self_weights.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions
        assert torch.allclose(cross_weights.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(self_weights.triu(1) == 0)  # causal
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(tuple(h.shape) == (BATCH, LENGTH, config.hidden_size) for h in out.hidden_states)


def test_outputs_absent_by_default_and_from_config_flags():
    model = tiny_model(attn_implementation="eager")
    ids, stm = inputs(model)
    with torch.no_grad():
        out = model(ids, stm_state=stm)
        assert out.attentions is None and out.cross_attentions is None and out.hidden_states is None
        model.config.output_attentions = True
        model.config.output_hidden_states = True
        out = model(ids, stm_state=stm)
    assert len(out.attentions) == len(out.cross_attentions) == model.config.num_hidden_layers
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_attention_weights_with_cache_cover_past_and_memory():
    model = tiny_model(attn_implementation="eager")
    ids, stm = inputs(model)
    with torch.no_grad():
        first = model(ids[:, :-1], stm_state=stm, use_cache=True)
        step = model(ids[:, -1:], stm_state=stm, past_key_values=output_cache(first), output_attentions=True)
    query_heads = model.config.heads_for("self_attention")[1]
    assert tuple(step.attentions[0].shape) == (BATCH, query_heads, 1, LENGTH)
    assert tuple(step.cross_attentions[0].shape)[-1] == model.config.stm_shape[1]


def test_output_attentions_with_sdpa_is_refused_with_the_fix():
    model = tiny_model(attn_implementation="sdpa")
    ids, stm = inputs(model)
    with pytest.raises(ValueError, match="output_attentions=True needs eager attention.*attn_implementation='eager'"):
        model(ids, stm_state=stm, output_attentions=True)


@pytest.mark.parametrize("cls", [RxTModel, RxTForCausalLM])
def test_return_dict_false_returns_the_same_values_as_a_tuple(cls):
    model = tiny_model(cls, attn_implementation="eager")
    ids, stm = inputs(model)
    flags = dict(output_attentions=True, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        as_dict = model(ids, stm_state=stm, **flags)
        as_tuple = model(ids, stm_state=stm, return_dict=False, **flags)
        model.config.return_dict = False
        from_config = model(ids, stm_state=stm, **flags)
    expected = as_dict.to_tuple()
    for result in (as_tuple, from_config):
        assert isinstance(result, tuple) and len(result) == len(expected)
        first = result[0]
        assert torch.equal(first, expected[0])
        assert len(result[-1]) == model.config.num_hidden_layers  # cross_attentions come last


# --- generate dict outputs ----------------------------------------------------------------------------

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20),
    "beam_search": dict(do_sample=False, num_beams=3),
    "beam_sample": dict(do_sample=True, num_beams=3, top_k=20),
}


@pytest.mark.parametrize("mode", MODES)
def test_generate_dict_outputs(mode):
    model = tiny_model(attn_implementation="eager")
    ids, stm = inputs(model)
    config = model.config
    torch.manual_seed(1)
    out = model.generate(
        ids,
        stm_state=stm,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        return_dict_in_generate=True,
        output_attentions=True,
        output_hidden_states=True,
        output_scores=True,
        output_logits=True,
        **MODES[mode],
    )
    beams = MODES[mode].get("num_beams", 1)
    rows = BATCH * beams
    expected_class = GenerateBeamDecoderOnlyOutput if beams > 1 else GenerateDecoderOnlyOutput
    assert isinstance(out, expected_class)
    assert tuple(out.sequences.shape) == (BATCH, LENGTH + NEW)
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == NEW
    query_heads = config.heads_for("self_attention")[1]
    for step, (step_attentions, step_hidden) in enumerate(zip(out.attentions, out.hidden_states)):
        length = LENGTH if step == 0 else 1
        assert len(step_attentions) == config.num_hidden_layers
        assert tuple(step_attentions[0].shape) == (rows, query_heads, length, LENGTH + step)
        assert len(step_hidden) == config.num_hidden_layers + 1
        assert tuple(step_hidden[0].shape) == (rows, length, config.hidden_size)
    assert all(tuple(s.shape) == (rows, config.vocab_size) for s in out.scores)


# --- generation modes against the no-cache reference ----------------------------------------------------


def greedy_reference(model, ids, stm, steps):
    """Full forward without any cache at every step (the reference every mode must match)."""
    with torch.no_grad():
        for _ in range(steps):
            token = model(ids, stm_state=stm, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids


def generate(model, ids, stm, **kwargs):
    return model.generate(ids, stm_state=stm, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs)


def test_greedy_equals_the_reference_loop():
    model = tiny_model()
    ids, stm = inputs(model)
    assert torch.equal(generate(model, ids, stm, do_sample=False), greedy_reference(model, ids, stm, NEW))


@pytest.mark.parametrize("mode", ["sample", "beam_search", "beam_sample"])
def test_cached_mode_equals_the_same_mode_withoutoutput_cache(mode):
    model = tiny_model()
    ids, stm = inputs(model)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        results.append(generate(model, ids, stm, use_cache=use_cache, **MODES[mode]))
    assert torch.equal(*results)


def test_beam_search_reads_the_memory():
    model = tiny_model()
    ids, stm = inputs(model)
    with_memory = generate(model, ids, stm, num_beams=3, do_sample=False)
    other = generate(model, ids, torch.zeros_like(stm), num_beams=3, do_sample=False)
    assert not torch.equal(with_memory, other)


@pytest.mark.parametrize(
    "mode",
    [
        "assisted",
        "prompt_lookup",
        "static_cache",
    ],
)
def test_single_row_modes_equal_the_reference_loop(mode):
    model = tiny_model()
    ids, stm = inputs(model, batch=1)
    kwargs = {
        "assisted": dict(assistant_model=copy.deepcopy(model)),
        "prompt_lookup": dict(prompt_lookup_num_tokens=3),
        "static_cache": dict(cache_implementation="static"),
    }[mode]
    result = generate(model, ids, stm, do_sample=False, **kwargs)
    assert torch.equal(result, greedy_reference(model, ids, stm, NEW))


def test_static_cache_batch_equals_the_reference_loop():
    model = tiny_model()
    ids, stm = inputs(model)
    result = generate(model, ids, stm, do_sample=False, cache_implementation="static")
    assert torch.equal(result, greedy_reference(model, ids, stm, NEW))


# --- a changed memory over a filled cache -------------------------------------------------------------


def test_a_new_stm_state_over_a_filled_cache_is_re_projected():
    model = tiny_model()
    ids, stm = inputs(model)
    other = stm.flip(0) * -1.0
    with torch.no_grad():
        first = model(ids[:, :-1], stm_state=stm, use_cache=True)
        step = model(ids[:, -1:], stm_state=other, past_key_values=output_cache(first))
        # the cached self-attention over the prefix was computed with `stm`; the reference does the same
        prefix_only = model(ids[:, :-1], stm_state=stm, use_cache=True)
        cache = output_cache(prefix_only)
        cache.cross_attention_cache = type(cache.cross_attention_cache)(config=model.config)
        cache.is_updated = {}
        expected = model(ids[:, -1:], stm_state=other, past_key_values=cache)
        same_memory = model(ids[:, -1:], stm_state=stm, past_key_values=output_cache(model(ids[:, :-1], stm_state=stm)))
    assert torch.equal(step.logits, expected.logits)
    assert not torch.allclose(step.logits, same_memory.logits)


def test_the_same_stm_state_keeps_the_cached_memory_projection():
    model = tiny_model()
    ids, stm = inputs(model)
    with torch.no_grad():
        first = model(ids[:, :-1], stm_state=stm, use_cache=True)
        cache = output_cache(first)
        cached_keys = cache.cross_attention_cache.layers[0].keys
        model(ids[:, -1:], stm_state=stm, past_key_values=cache)
    assert cache.cross_attention_cache.layers[0].keys is cached_keys


# --- capability flags ---------------------------------------------------------------------------------


def test_sdpa_flag_is_true_and_sdpa_matches_eager():
    assert RxTForCausalLM._supports_sdpa
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    ids, stm = inputs(eager)
    with torch.no_grad():
        assert torch.allclose(eager(ids, stm_state=stm).logits, sdpa(ids, stm_state=stm).logits, atol=1e-4)


def test_unsupported_backends_are_refused_by_transformers():
    # flex attention with the flag forced on compiles and runs on CPU (torch 2.13, transformers 5.23) and the encoder
    # matches eager, but compiled flex_attention returns NaN / wrong values for the memory cross-attention (decoder
    # logits 0.3 off, NaN rows; uncompiled flex_attention is right): it stays refused
    assert not RxTForCausalLM._supports_flex_attn and not RxTForCausalLM._supports_flash_attn
    with pytest.raises(ValueError):
        tiny_model(attn_implementation="flex_attention")


def test_no_split_modules_name_real_layer_classes():
    model = tiny_model()
    classes = {type(module).__name__ for module in model.modules()}
    assert set(RxTForCausalLM._no_split_modules) <= classes


def test_attention_backend_and_compile_flags_are_on():
    # packed rows and custom attention functions are tested against padded batches / sdpa in test_packed_sequences.py,
    # the compiled decoding step below
    assert RxTForCausalLM._supports_attention_backend is True
    assert RxTForCausalLM._can_compile_fullgraph is True


# --- static cache and a full-graph compiled decoding step -------------------------------------------------


def compiled_static_greedy(model, ids, stm, steps, with_mask):
    """Greedy decoding as `generate` runs it with a static cache: an eager prefill into a `StaticCache` (the model pairs
    it with a static memory cache of `stm_size` slots), then every one-token step through
    `torch.compile(model.forward, fullgraph=True)`, which raises on any graph break. The "eager" backend runs the
    captured graph with torch's own kernels, so the tokens can be compared exactly."""
    torch.compiler.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
    mask = torch.ones_like(ids) if with_mask else None
    with torch.no_grad():
        out = model(ids, stm_state=stm, attention_mask=mask, past_key_values=cache, use_cache=True)
        for index in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if index == steps - 1:
                break
            if with_mask:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = step(token, stm_state=stm, attention_mask=mask, past_key_values=output_cache(out), use_cache=True)
    return ids, output_cache(out)


@pytest.mark.parametrize("feed_forward", ["dense", "moe"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_compiled_static_decoding_step_equals_the_reference_loop(feed_forward, with_mask):
    assert RxTForCausalLM._can_compile_fullgraph
    model = tiny_model(decoder_feed_forward=feed_forward)
    ids, stm = inputs(model)
    result, cache = compiled_static_greedy(model, ids, stm, NEW, with_mask)
    assert torch.equal(result, greedy_reference(model, ids, stm, NEW))
    assert isinstance(cache.self_attention_cache, StaticCache) and isinstance(cache.cross_attention_cache, StaticCache)
    assert tuple(cache.cross_attention_cache.layers[0].keys.shape)[2] == model.config.stm_size


def test_a_new_stm_state_over_a_static_cache_is_re_projected_in_place():
    model = tiny_model()
    ids, stm = inputs(model)
    other = stm.flip(0) * -1.0

    def last_step(cache, memory):
        with torch.no_grad():
            filled = output_cache(model(ids[:, :-1], stm_state=stm, past_key_values=cache, use_cache=True))
            memory_keys = filled.cross_attention_cache.layers[0].keys
            logits = model(ids[:, -1:], stm_state=memory, past_key_values=filled).logits
        return logits, filled.cross_attention_cache.layers[0].keys is memory_keys

    static_other, same_address = last_step(StaticCache(config=model.config, max_cache_len=LENGTH), other)
    dynamic_other, _ = last_step(None, other)  # the dynamic path, tested above against a fresh memory cache
    static_same, _ = last_step(StaticCache(config=model.config, max_cache_len=LENGTH), stm)
    assert same_address  # emptied and refilled in place: compiled steps keep reading the same tensors
    assert torch.allclose(static_other, dynamic_other, atol=1e-5)
    assert not torch.allclose(static_other, static_same)


# --- modes transformers itself refuses here ---------------------------------------------------------------


def test_contrastive_search_is_not_in_library():
    model = tiny_model()
    ids, stm = inputs(model, batch=1)
    with pytest.raises(ValueError, match="Contrastive Search requires `trust_remote_code=True`"):
        model.generate(ids, stm_state=stm, max_new_tokens=2, penalty_alpha=0.6, top_k=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="offloading needs an accelerator; refused on CPU builds")
def test_offloaded_cache_is_refused_without_an_accelerator():
    model = tiny_model()
    ids, stm = inputs(model, batch=1)
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        model.generate(ids, stm_state=stm, max_new_tokens=2, cache_implementation="offloaded")
