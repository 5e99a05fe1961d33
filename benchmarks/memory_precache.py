"""memory-precache: generation with memory keys/values projected once per `generate()` call vs every step.

The precached path is RxT's normal `generate()` (memory cross-attention keys/values in the cross-attention half
of an `EncoderDecoderCache`, projected at the first step). The recomputed path passes a
:class:`~benchmarks.common.RecomputedMemoryCache`, which never reports the memory as cached, so every step
projects the STM again (and replaces, never appends to, the stored keys/values). The model code is untouched.

Both paths must produce identical tokens; the memory key projections are counted with forward hooks
(precached: one call per layer; recomputed: one per layer and step).
"""

from __future__ import annotations

import time

import torch

from rxt_hf.modeling_rxt import CACHE_FIELD

from . import timing
from .common import (
    DEFAULT_PRESET,
    CallCounter,
    build_rxt,
    describe_rxt,
    generation_kwargs,
    memory_key_projections,
    new_recomputed_memory_cache,
    rxt_query,
)

NAME = "memory-precache"
DESCRIPTION = "RxT generation with memory K/V precached once per generate() call vs recomputed every step."
DEFAULTS = dict(preset=DEFAULT_PRESET, query_length=32, answer_length=128, batch_size=1, repeats=5, warmup=2)
SMOKE = {**DEFAULTS, "query_length": 8, "answer_length": 6, "repeats": 1, "warmup": 1}


def generate_both(model, query, stm, answer_length: int) -> dict:
    """Run both paths once (untimed) with hooks: tokens, per-step logits and memory-key projection counts."""
    kw = generation_kwargs(answer_length, model.config.pad_token_id, model.config.eos_token_id)
    mask = torch.ones_like(query)
    outputs = {}
    for path in ("precached", "recomputed"):
        extra = {CACHE_FIELD: new_recomputed_memory_cache(model)} if path == "recomputed" else {}
        with CallCounter(memory_key_projections(model)) as counter:
            out = model.generate(
                query, attention_mask=mask, stm_state=stm, return_dict_in_generate=True, output_logits=True, **kw, **extra
            )
        outputs[path] = {"sequences": out.sequences, "logits": torch.stack(out.logits, 1), "k_proj_calls": counter.calls}
    return outputs


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    q_len, a_len, batch, repeats, warmup = (
        opts[k] for k in ("query_length", "answer_length", "batch_size", "repeats", "warmup")
    )
    with timing.torch_threads(threads), torch.inference_mode():
        model = build_rxt(opts["preset"], seed=seed)
        config = model.config
        payload = timing.new_payload(NAME, DESCRIPTION, smoke, {**opts, "seed": seed, "rxt": describe_rxt(model, opts["preset"])})
        generator = torch.Generator().manual_seed(seed)
        query = rxt_query(config, q_len, generator, batch=batch)
        stm = (torch.randn((batch, *config.stm_shape), generator=generator) * 0.5).to(model.dtype)
        kw = generation_kwargs(a_len, config.pad_token_id, config.eos_token_id)
        mask = torch.ones_like(query)

        check = generate_both(model, query, stm, a_len)
        identical = bool(torch.equal(check["precached"]["sequences"], check["recomputed"]["sequences"]))
        max_logit_diff = float((check["precached"]["logits"] - check["recomputed"]["logits"]).abs().max())

        def precached():
            return model.generate(query, attention_mask=mask, stm_state=stm, **kw)

        def recomputed(cache):
            return model.generate(query, attention_mask=mask, stm_state=stm, **{CACHE_FIELD: cache}, **kw)

        def fresh_cache():
            return new_recomputed_memory_cache(model)

        # interleave the two paths so that slow drifts of the machine hit both alike
        for _ in range(warmup):
            precached()
            recomputed(fresh_cache())
        pre_samples, re_samples = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            precached()
            pre_samples.append(time.perf_counter() - start)
            cache = fresh_cache()
            start = time.perf_counter()
            recomputed(cache)
            re_samples.append(time.perf_counter() - start)
        pre, rec = timing.summarize(pre_samples), timing.summarize(re_samples)
        tokens = batch * a_len
        payload["results"] = {
            "precached": {"generate_s": pre, "tokens_per_s": tokens / pre["median"], "k_proj_calls": check["precached"]["k_proj_calls"]},
            "recomputed": {"generate_s": rec, "tokens_per_s": tokens / rec["median"], "k_proj_calls": check["recomputed"]["k_proj_calls"]},
            "identical_tokens": identical,
            "max_abs_logit_difference": max_logit_diff,
            "expected_k_proj_calls": {"precached": config.num_hidden_layers, "recomputed": config.num_hidden_layers * a_len},
            "recomputed_over_precached_time": timing.ratio(rec["median"], pre["median"]),
        }

    payload["targets"] = {
        "precached_speedup": timing.target(
            "recomputed / precached generate() time (precached faster by at least this factor)",
            payload["results"]["recomputed_over_precached_time"],
            1.2,
        ),
        "identical_tokens": timing.target("both paths generate identical tokens", identical, True, "=="),
    }
    return timing.finish(NAME, payload, output_dir)
