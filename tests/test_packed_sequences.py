"""Packed sequences and custom attention functions (issue 21, `_supports_attention_backend`).

Several sequences packed in one row (no padding, `position_ids` restarting at 0 for each) get transformers'
block-causal mask from `create_causal_mask`; every token's logits equal the same sequences run padded in a batch.
The memory is per batch row: all sequences packed into one row read that row's STM, so the padded reference gives
each sequence the same STM row. Packing is detected only without an `attention_mask` and without a cache
(transformers' rule), so the packed call passes `use_cache=False`."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

LENGTHS = (6, 4, 5)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = RxTConfig.from_preset("rxt-tiny", num_query_heads=4, num_key_value_heads=2, **overrides)
    return RxTForCausalLM(config).eval()


def sequences(model):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(8, 400, (length,), generator=generator) for length in LENGTHS]


def padded_logits(model, seqs, stm_row):
    """Per-sequence logits [T_i, V] from a right-padded batch, each row reading `stm_row` [1, L, S, D]."""
    longest = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), longest), model.config.pad_token_id)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    stm = stm_row.expand(len(seqs), -1, -1, -1).contiguous()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, stm_state=stm, use_cache=False).logits
    return [logits[row, : len(seq)] for row, seq in enumerate(seqs)]


def packed_logits(model, seqs, stm_row):
    """Per-sequence logits [T_i, V] from one packed row with restarting `position_ids`."""
    ids = torch.cat(seqs)[None]  # [1, sum T_i]
    position_ids = torch.cat([torch.arange(len(seq)) for seq in seqs])[None]
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, stm_state=stm_row, use_cache=False).logits[0]
    return list(logits.split([len(seq) for seq in seqs]))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_row_matches_padded_batch(implementation):
    model = tiny_model(attn_implementation=implementation)
    seqs = sequences(model)
    stm_row = model.init_memory(1, mode="normal", generator=torch.Generator().manual_seed(2)) * 50
    for packed, padded in zip(packed_logits(model, seqs, stm_row), padded_logits(model, seqs, stm_row)):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packed_row_without_position_ids_is_one_sequence():
    # the reference check that packing is what changes the logits: the same row read as one sequence differs
    model = tiny_model(attn_implementation="sdpa")
    seqs = sequences(model)
    stm_row = model.init_memory(1, mode="normal", generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        whole = model(torch.cat(seqs)[None], stm_state=stm_row, use_cache=False).logits[0]
    second = whole[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]]
    assert not torch.allclose(second, padded_logits(model, seqs, stm_row)[1], atol=1e-3)


def test_custom_attention_function_gets_transformers_arguments():
    # `_supports_attention_backend`: a function registered through AttentionInterface is called with the
    # arguments transformers' own functions take, and a module carrying the attributes they read
    calls = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append((module, query.shape, key.shape, kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rxt_test_recording_sdpa", recording_sdpa)
    assert RxTForCausalLM._supports_attention_backend
    custom = tiny_model(attn_implementation="rxt_test_recording_sdpa")
    reference = tiny_model(attn_implementation="sdpa")
    seqs = sequences(custom)
    ids = torch.stack([seqs[0][:4], seqs[2][:4]])
    stm = custom.init_memory(2, mode="normal", generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        torch.testing.assert_close(custom(ids, stm_state=stm).logits, reference(ids, stm_state=stm).logits)
        custom.update_memory(stm, ids)
    assert calls
    for module, query_shape, key_shape, kwargs in calls:
        assert {"dropout", "scaling", "is_causal"} <= set(kwargs)
        assert kwargs["dropout"] == 0.0 and kwargs["scaling"] == module.head_dim**-0.5
        for attribute in ("layer_idx", "num_key_value_groups", "is_causal", "training", "config"):
            assert hasattr(module, attribute), attribute
        assert query_shape[1] == module.num_key_value_groups * key_shape[1]  # [B, Hq, T, hd] vs [B, Hkv, T, hd]
