"""latency-per-turn: a multi-turn conversation with RxT against two stateless Llama setups, side by side.

Every turn has a fixed query length and an answer forced to full length (`min_new_tokens = max_new_tokens`).

- **rxt**: the decoder reads the query and the STM; after the answer, `update_memory` (encoder + memory
  attention over query + answer) writes the new STM. The update is timed separately: the user has the answer
  before it starts (a chat session runs it in the background).
- **stateless_full_history** (baseline a): the prompt is every previous query and answer plus the new query,
  re-encoded from scratch each turn (standard chat-template use).
- **stateless_kv_cache** (baseline b): the KV cache of the history is kept between turns; only the new tokens
  are processed (the strongest stateless setup).

Per turn and system: time to first token (streamer timestamp of the first new token), whole-turn latency (query
in -> last answer token out), tokens processed (counted at the embedding layer) and cumulative, the state kept
between turns (STM bytes vs KV-cache bytes) and the KV cache held during the turn. `context_tokens` is the
conversation text the model attends over at the end of the turn (RxT: this interaction only, plus the STM).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from rxt_hf.modeling_rxt import CACHE_FIELD, output_cache

from . import timing
from .common import (
    DEFAULT_PRESET,
    CallCounter,
    TokenTimer,
    build_llama_baseline,
    build_rxt,
    cache_bytes,
    describe_llama,
    describe_rxt,
    generation_kwargs,
    parameter_counts,
    rxt_query,
    stm_bytes,
)

NAME = "latency-per-turn"
DESCRIPTION = (
    "Per-turn latency of a multi-turn conversation: RxT (fixed-size memory) vs a same-size stateless Llama "
    "re-reading the history (a) or keeping its KV cache (b)."
)
DEFAULTS = dict(preset=DEFAULT_PRESET, turns=32, query_length=32, answer_length=64, repeats=5, warmup=1)
SMOKE = {**DEFAULTS, "turns": 3, "query_length": 8, "answer_length": 4, "repeats": 1, "warmup": 1}
SYSTEMS = ("rxt", "stateless_full_history", "stateless_kv_cache")
LABELS = {
    "rxt": "RxT (STM)",
    "stateless_full_history": "Llama, full history re-encoded (a)",
    "stateless_kv_cache": "Llama, KV cache kept (b)",
}


def _empty_record() -> dict[str, Any]:
    return {
        "ttft_s": [],
        "turn_s": [],
        "tokens_processed": [],
        "cumulative_tokens": [],
        "state_bytes": [],
        "turn_cache_bytes": [],
        "context_tokens": [],
    }


def _timed_generate(model, input_ids, counter: CallCounter, timer: TokenTimer, **kwargs):
    """One generate() call: returns (ttft, whole turn, output, tokens embedded)."""
    counter.reset()
    timer.start()
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), streamer=timer, return_dict_in_generate=True, **kwargs
    )
    end = time.perf_counter()
    return timer.first_token_s, end - timer.start_time, output, counter.tokens


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    turns, q_len, a_len, repeats, warmup = (opts[k] for k in ("turns", "query_length", "answer_length", "repeats", "warmup"))
    if q_len + a_len > 256 and opts["preset"] == DEFAULT_PRESET:
        raise ValueError(f"query_length + answer_length = {q_len + a_len}: one RxT-Alpha Micro interaction holds 256 tokens.")
    with timing.torch_threads(threads), torch.inference_mode():
        rxt = build_rxt(opts["preset"], seed=seed)
        config = rxt.config
        llama = build_llama_baseline(config, max_position_embeddings=max(4096, turns * (q_len + a_len) + 64), seed=seed)
        payload = timing.new_payload(
            NAME,
            DESCRIPTION,
            smoke,
            {**opts, "seed": seed, "rxt": describe_rxt(rxt, opts["preset"]), "llama": describe_llama(llama)},
        )
        payload["config"]["parameters"] = parameter_counts(rxt, llama)
        kw = generation_kwargs(a_len, config.pad_token_id, config.eos_token_id)
        generator = torch.Generator().manual_seed(seed)
        queries = [rxt_query(config, q_len, generator) for _ in range(turns)]
        timer = TokenTimer()
        rxt_counter = CallCounter([rxt.model.embed_tokens])
        llama_counter = CallCounter([llama.model.embed_tokens])

        # warm-up: one turn-1 of every system (allocator, kernels, first-call overheads)
        stm = rxt.init_memory(1)
        for _ in range(warmup):
            answer = rxt.generate(queries[0], attention_mask=torch.ones_like(queries[0]), stm_state=stm, **kw)
            rxt.update_memory(stm, answer, torch.ones_like(answer))
            llama.generate(queries[0], attention_mask=torch.ones_like(queries[0]), **kw)

        records = {name: _empty_record() for name in SYSTEMS}
        records["rxt"]["memory_update_s"] = []
        records["rxt"]["decoder_tokens"] = []
        records["rxt"]["encoder_tokens"] = []
        records["stateless_full_history"]["history_token_bytes"] = []
        history = None  # (a): every previous query and answer
        kv_cache, kv_sequences = None, None  # (b)
        identical_histories = True

        with rxt_counter, llama_counter:
            for turn in range(turns):
                query = queries[turn]

                # --- RxT: answer (user-facing), then the memory update (background) --------------------
                ttfts, totals = [], []
                for _ in range(repeats):
                    ttft, total, output, decoder_tokens = _timed_generate(rxt, query, rxt_counter, timer, stm_state=stm, **kw)
                    ttfts.append(ttft)
                    totals.append(total)
                interaction = output.sequences
                interaction_mask = torch.ones_like(interaction)
                rxt_counter.reset()
                update, stm_new = timing.measure(
                    lambda: rxt.update_memory(stm, interaction, interaction_mask), repeats=repeats, warmup=0
                )
                encoder_tokens = rxt_counter.tokens // repeats
                stm = stm_new
                rec = records["rxt"]
                rec["ttft_s"].append(timing.summarize(ttfts))
                rec["turn_s"].append(timing.summarize(totals))
                rec["memory_update_s"].append(update)
                rec["decoder_tokens"].append(decoder_tokens)
                rec["encoder_tokens"].append(encoder_tokens)
                rec["tokens_processed"].append(decoder_tokens + encoder_tokens)
                rec["state_bytes"].append(stm.numel() * stm.element_size())
                rec["turn_cache_bytes"].append(cache_bytes(output_cache(output)))
                rec["context_tokens"].append(interaction.shape[1])

                # --- (a) stateless, full history re-encoded -------------------------------------------
                prompt = query if history is None else torch.cat([history, query], dim=1)
                ttfts, totals = [], []
                for _ in range(repeats):
                    ttft, total, output, tokens = _timed_generate(llama, prompt, llama_counter, timer, **kw)
                    ttfts.append(ttft)
                    totals.append(total)
                history = output.sequences
                rec = records["stateless_full_history"]
                rec["ttft_s"].append(timing.summarize(ttfts))
                rec["turn_s"].append(timing.summarize(totals))
                rec["tokens_processed"].append(tokens)
                rec["state_bytes"].append(0)  # nothing but the text is kept between turns
                rec["history_token_bytes"].append(history.numel() * history.element_size())
                rec["turn_cache_bytes"].append(cache_bytes(output_cache(output)))
                rec["context_tokens"].append(history.shape[1])

                # --- (b) stateless, KV cache kept between turns ----------------------------------------
                prompt = query if kv_sequences is None else torch.cat([kv_sequences, query], dim=1)
                ttfts, totals = [], []
                for _ in range(repeats):
                    cache = copy.deepcopy(kv_cache)  # each repeat starts from the same cached history
                    extra = {} if cache is None else {CACHE_FIELD: cache}
                    ttft, total, output, tokens = _timed_generate(llama, prompt, llama_counter, timer, **kw, **extra)
                    ttfts.append(ttft)
                    totals.append(total)
                kv_cache, kv_sequences = output_cache(output), output.sequences
                identical_histories &= bool(torch.equal(kv_sequences, history))
                rec = records["stateless_kv_cache"]
                rec["ttft_s"].append(timing.summarize(ttfts))
                rec["turn_s"].append(timing.summarize(totals))
                rec["tokens_processed"].append(tokens)
                rec["state_bytes"].append(cache_bytes(kv_cache))
                rec["turn_cache_bytes"].append(cache_bytes(kv_cache))
                rec["context_tokens"].append(kv_sequences.shape[1])

            # --- bound: the same Llama answering the last query with no history at all -------------------
            # (a) / this is the most any decoder exactly as fast as the Llama could gain over (a) at that turn
            no_history = []
            for _ in range(repeats):
                no_history.append(_timed_generate(llama, queries[-1], llama_counter, timer, **kw)[1])

        for rec in records.values():
            running = 0
            for tokens in rec["tokens_processed"]:
                running += tokens
                rec["cumulative_tokens"].append(running)
            rec["ttft_median_s"] = [s["median"] for s in rec["ttft_s"]]
            rec["turn_median_s"] = [s["median"] for s in rec["turn_s"]]
        records["rxt"]["memory_update_median_s"] = [s["median"] for s in records["rxt"]["memory_update_s"]]

        payload["results"] = {
            "turns": list(range(1, turns + 1)),
            **records,
            "stm_bytes_formula": stm_bytes(config, rxt.dtype),
            "baselines_generate_identical_tokens": identical_histories,
            "llama_no_history_last_turn_s": timing.summarize(no_history),
        }

    # --- targets (last turn vs first turn / vs the baselines) -----------------------------------------
    rxt_turn = records["rxt"]["turn_median_s"]
    rxt_ttft = records["rxt"]["ttft_median_s"]
    a = records["stateless_full_history"]
    b = records["stateless_kv_cache"]
    last = turns
    payload["targets"] = {
        "rxt_last_over_first_turn": timing.target(
            f"RxT whole-turn latency, turn {last} / turn 1", timing.ratio(rxt_turn[-1], rxt_turn[0]), 1.15, "<="
        ),
        "stateless_a_over_rxt_ttft": timing.target(
            f"baseline (a) / RxT time to first token at turn {last}", timing.ratio(a["ttft_median_s"][-1], rxt_ttft[-1]), 10.0
        ),
        "stateless_a_over_rxt_turn": timing.target(
            f"baseline (a) / RxT whole-turn latency at turn {last}", timing.ratio(a["turn_median_s"][-1], rxt_turn[-1]), 2.0
        ),
        "stateless_b_over_rxt_turn": timing.target(
            f"baseline (b) / RxT whole-turn latency at turn {last} (> 1: RxT faster)",
            timing.ratio(b["turn_median_s"][-1], rxt_turn[-1]),
            1.0,
            ">",
        ),
        "rxt_state_fixed_size": timing.target(
            "RxT keeps a fixed-size state (STM bytes equal at every turn)",
            len(set(records["rxt"]["state_bytes"])) == 1,
            True,
            "==",
        ),
    }
    payload["results"]["ratios_at_last_turn"] = {
        "stateless_b_over_rxt_ttft": timing.ratio(b["ttft_median_s"][-1], rxt_ttft[-1]),
        "rxt_ttft_last_over_first": timing.ratio(rxt_ttft[-1], rxt_ttft[0]),
        "rxt_turn_plus_memory_update_s": rxt_turn[-1] + records["rxt"]["memory_update_median_s"][-1],
        "stateless_b_state_over_stm_bytes": timing.ratio(b["state_bytes"][-1], records["rxt"]["state_bytes"][-1]),
        "stateless_a_over_llama_no_history_turn": timing.ratio(
            a["turn_median_s"][-1], payload["results"]["llama_no_history_last_turn_s"]["median"]
        ),
    }
    payload["notes"].append(
        "Whole-turn latency is what the user waits for (query in -> last answer token out); RxT's memory update "
        "runs after the answer (in the background in a chat session) and is reported separately as memory_update_s."
    )
    payload["notes"].append(
        "ratios_at_last_turn.stateless_a_over_llama_no_history_turn is baseline (a)'s last turn over the same Llama "
        "answering the last query with no history: the (a) / RxT whole-turn ratio that a decoder exactly as fast "
        "as the Llama with an empty context would reach. Below the target, the target is out of reach at this "
        "model size on this machine, whatever the memory costs."
    )

    if plot:
        _plots(payload, output_dir)
    return timing.finish(NAME, payload, output_dir)


def _plots(payload: dict, output_dir) -> None:
    results = payload["results"]
    turns = results["turns"]
    subtitle = timing.machine_subtitle(payload["machine"])
    folder = timing.results_dir(output_dir)
    whole = {LABELS[s]: (turns, results[s]["turn_median_s"]) for s in SYSTEMS}
    whole["RxT memory update (background)"] = (turns, results["rxt"]["memory_update_median_s"])
    for path, series, title in (
        (folder / f"{NAME}.png", whole, "Whole-turn latency (query in -> last answer token out)"),
        (
            folder / f"{NAME}-ttft.png",
            {LABELS[s]: (turns, results[s]["ttft_median_s"]) for s in SYSTEMS},
            "Time to first token",
        ),
    ):
        written = timing.plot_lines(path, series, title, "turn", "seconds (median)", subtitle=subtitle)
        if written is not None:
            payload["plots"].append(str(Path(written)))
