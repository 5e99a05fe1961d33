"""batched-interactions: aggregate tokens/s for 1, 8 and 32 concurrent conversations.

Each concurrency level runs whole interactions as one batch: a batched `generate()` (every conversation reads
its own STM row; answers forced to full length) followed by one batched `update_memory()`. Aggregate tokens/s
is `conversations x answer tokens / (generate + memory update time)`; generate-only tokens/s is reported too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import timing
from .common import DEFAULT_PRESET, build_rxt, describe_rxt, generation_kwargs, rxt_query, stm_bytes

NAME = "batched-interactions"
DESCRIPTION = "Aggregate tokens/s of RxT for 1, 8 and 32 concurrent conversations (batched generation + memory update)."
DEFAULTS = dict(preset=DEFAULT_PRESET, concurrency=(1, 8, 32), query_length=32, answer_length=64, repeats=3, warmup=1)
SMOKE = {**DEFAULTS, "concurrency": (1, 4), "query_length": 8, "answer_length": 4, "repeats": 1, "warmup": 1}
TARGET_SPEEDUP = 6.0


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    levels = [int(n) for n in opts["concurrency"]]
    q_len, a_len, repeats, warmup = (opts[k] for k in ("query_length", "answer_length", "repeats", "warmup"))
    with timing.torch_threads(threads), torch.inference_mode():
        model = build_rxt(opts["preset"], seed=seed)
        config = model.config
        payload = timing.new_payload(NAME, DESCRIPTION, smoke, {**opts, "seed": seed, "rxt": describe_rxt(model, opts["preset"])})
        kw = generation_kwargs(a_len, config.pad_token_id, config.eos_token_id)
        generator = torch.Generator().manual_seed(seed)
        results = {}
        for batch in levels:
            query = rxt_query(config, q_len, generator, batch=batch)
            mask = torch.ones_like(query)
            # a different memory per conversation, as after some turns of distinct conversations
            stm = (torch.randn((batch, *config.stm_shape), generator=generator) * config.stm_init_std).to(model.dtype)

            def interaction():
                start = time.perf_counter()
                sequences = model.generate(query, attention_mask=mask, stm_state=stm, **kw)
                generated = time.perf_counter()
                new_stm = model.update_memory(stm, sequences, torch.ones_like(sequences))
                return generated - start, time.perf_counter() - generated, sequences, new_stm

            for _ in range(warmup):
                interaction()
            generate_samples, update_samples = [], []
            for _ in range(repeats):
                generate_s, update_s, sequences, new_stm = interaction()
                generate_samples.append(generate_s)
                update_samples.append(update_s)
            total = [g + u for g, u in zip(generate_samples, update_samples)]
            answer_tokens = batch * (sequences.shape[1] - q_len)
            results[str(batch)] = {
                "conversations": batch,
                "answer_tokens": answer_tokens,
                "generate_s": timing.summarize(generate_samples),
                "memory_update_s": timing.summarize(update_samples),
                "interaction_s": timing.summarize(total),
                "tokens_per_s": answer_tokens / timing.summarize(total)["median"],
                "generate_tokens_per_s": answer_tokens / timing.summarize(generate_samples)["median"],
                "stm_bytes": new_stm.numel() * new_stm.element_size(),
                "stm_bytes_formula": stm_bytes(config, model.dtype, conversations=batch),
            }
        base = results[str(levels[0])]["tokens_per_s"]
        for record in results.values():
            record["speedup_vs_first"] = timing.ratio(record["tokens_per_s"], base)
        payload["results"] = {"concurrency": levels, "levels": results}

    top = levels[-1]
    payload["targets"] = {
        "batched_speedup": timing.target(
            f"aggregate tokens/s with {top} conversations / with {levels[0]}",
            results[str(top)]["speedup_vs_first"],
            TARGET_SPEEDUP,
        )
    }
    if plot:
        written = timing.plot_lines(
            timing.results_dir(output_dir) / f"{NAME}.png",
            {
                "generate + memory update": (levels, [results[str(n)]["tokens_per_s"] for n in levels]),
                "generate only": (levels, [results[str(n)]["generate_tokens_per_s"] for n in levels]),
            },
            "RxT aggregate answer tokens/s vs concurrent conversations",
            "concurrent conversations",
            "tokens/s",
            logx=True,
            subtitle=timing.machine_subtitle(payload["machine"]),
        )
        if written is not None:
            payload["plots"].append(str(Path(written)))
    return timing.finish(NAME, payload, output_dir)
