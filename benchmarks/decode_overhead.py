"""decode-overhead: tokens/s of RxT's decoder vs the same-size Llama answering the same query with no history.

RxT reads its STM through memory cross-attention with keys/values precached once per `generate()` call; the
Llama has no memory and no history. Both answer the same query with an answer forced to full length.

Reported per system: answer tokens/s over the whole `generate()` call, and decode-only tokens/s (after the first
token: no prompt processing). With `diagnostics`, three extra RxT variants separate where the overhead comes
from: a dense SwiGLU decoder of the active feed-forward width instead of the MoE (`rxt_dense_feed_forward`); an
MoE with only as many experts as each token uses (`rxt_all_experts_active`: the same routing work, but the
weights one step reads are the weights every step reads, as in the dense decoder); and the MoE decoder with a
1-slot STM (`rxt_tiny_memory`, memory cross-attention nearly free).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from . import timing
from .common import (
    DEFAULT_PRESET,
    TokenTimer,
    active_feed_forward_size,
    build_llama_baseline,
    build_rxt,
    describe_llama,
    describe_rxt,
    generation_kwargs,
    parameter_counts,
    rxt_query,
)

NAME = "decode-overhead"
DESCRIPTION = "Tokens/s of RxT's decoder (memory K/V precached) vs a same-size Llama with no history."
DEFAULTS = dict(preset=DEFAULT_PRESET, query_length=32, answer_length=128, repeats=9, warmup=2, diagnostics=True)
SMOKE = {**DEFAULTS, "query_length": 8, "answer_length": 6, "repeats": 1, "warmup": 1, "diagnostics": True}


def _time_generate_interleaved(systems: dict[str, tuple[Any, dict]], query: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict]:
    """Time `generate()` of every system round-robin (repeat r of each system runs before repeat r + 1 of any),
    so that drifts of the machine's speed hit all systems alike. `systems`: name -> (model, generate kwargs)."""
    timer = TokenTimer()
    mask = torch.ones_like(query)
    for _ in range(warmup):
        for model, kwargs in systems.values():
            model.generate(query, attention_mask=mask, **kwargs)
    samples = {name: {"totals": [], "decode_rates": [], "ttfts": [], "answer_tokens": 0} for name in systems}
    for _ in range(repeats):
        for name, (model, kwargs) in systems.items():
            timer.start()
            sequences = model.generate(query, attention_mask=mask, streamer=timer, **kwargs)
            record = samples[name]
            record["totals"].append(time.perf_counter() - timer.start_time)
            record["decode_rates"].append(timer.decode_tokens_per_s)
            record["ttfts"].append(timer.first_token_s)
            record["answer_tokens"] = sequences.shape[1] - query.shape[1]
    results = {}
    for name, record in samples.items():
        total = timing.summarize(record["totals"])
        results[name] = {
            "generate_s": total,
            "ttft_s": timing.summarize(record["ttfts"]),
            "answer_tokens": record["answer_tokens"],
            "tokens_per_s": record["answer_tokens"] / total["median"],
            "decode_tokens_per_s": timing.summarize(record["decode_rates"])["median"],
            "decode_tokens_per_s_samples": record["decode_rates"],
        }
    return results


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    q_len, a_len, repeats, warmup = (opts[k] for k in ("query_length", "answer_length", "repeats", "warmup"))
    with timing.torch_threads(threads), torch.inference_mode():
        rxt = build_rxt(opts["preset"], seed=seed)
        config = rxt.config
        llama = build_llama_baseline(config, max_position_embeddings=max(1024, q_len + a_len), seed=seed)
        payload = timing.new_payload(
            NAME, DESCRIPTION, smoke, {**opts, "seed": seed, "rxt": describe_rxt(rxt, opts["preset"]), "llama": describe_llama(llama)}
        )
        payload["config"]["parameters"] = parameter_counts(rxt, llama)
        kw = generation_kwargs(a_len, config.pad_token_id, config.eos_token_id)
        query = rxt_query(config, q_len, torch.Generator().manual_seed(seed))
        stm = rxt.init_memory(1)

        systems = {"rxt": (rxt, {"stm_state": stm, **kw}), "llama": (llama, kw)}
        if opts["diagnostics"]:
            dense = build_rxt(
                opts["preset"],
                seed=seed,
                decoder_feed_forward="dense",
                decoder_intermediate_size=active_feed_forward_size(config),
            )
            small = build_rxt(opts["preset"], seed=seed, stm_size=1)
            few_experts = build_rxt(opts["preset"], seed=seed, num_experts=config.num_experts_per_token)
            systems["rxt_all_experts_active"] = (few_experts, {"stm_state": few_experts.init_memory(1), **kw})
            systems["rxt_dense_feed_forward"] = (dense, {"stm_state": dense.init_memory(1), **kw})
            systems["rxt_tiny_memory"] = (small, {"stm_state": small.init_memory(1), **kw})
        results = _time_generate_interleaved(systems, query, repeats, warmup)
        payload["results"] = results

    def paired(name: str) -> float:
        """Median over rounds of (system's rate / the Llama's rate in the same round): drift between rounds cancels."""
        rates = zip(results[name]["decode_tokens_per_s_samples"], results["llama"]["decode_tokens_per_s_samples"])
        return statistics.median(timing.ratio(r, l) for r, l in rates)

    llama_rate = results["llama"]["decode_tokens_per_s"]
    payload["results"]["rxt_over_llama_decode_tokens_per_s"] = paired("rxt")
    payload["results"]["rxt_over_llama_decode_tokens_per_s_of_medians"] = timing.ratio(
        results["rxt"]["decode_tokens_per_s"], llama_rate
    )
    payload["results"]["rxt_over_llama_generate_tokens_per_s"] = timing.ratio(
        results["rxt"]["tokens_per_s"], results["llama"]["tokens_per_s"]
    )
    for variant in ("rxt_dense_feed_forward", "rxt_all_experts_active", "rxt_tiny_memory"):
        if variant in results:
            payload["results"][f"{variant}_over_llama_decode_tokens_per_s"] = paired(variant)
    payload["targets"] = {
        "rxt_over_llama_tokens_per_s": timing.target(
            "RxT decode tokens/s / Llama decode tokens/s (same query, no history; median of per-round ratios)",
            payload["results"]["rxt_over_llama_decode_tokens_per_s"],
            0.85,
        )
    }
    payload["notes"].append(
        "decode_tokens_per_s counts tokens after the first (streamer timestamps), so prompt processing is excluded; "
        "tokens_per_s is answer tokens over the whole generate() call. Ratios *_over_llama_decode_tokens_per_s are "
        "medians of per-round ratios (each round times every system once, round-robin); "
        "rxt_over_llama_decode_tokens_per_s_of_medians divides the two medians instead."
    )
    return timing.finish(NAME, payload, output_dir)
