"""attention-variants: encoder forward time at long lengths for MHA, GQA, MQA, sSQA, SQA and xSQA.

All variants keep the hidden size, the number of heads used to split it (`num_attention_heads`, so the head
dim is the same) and everything else of the preset; only the query heads and key/value heads change:

| variant | query heads | key/value heads |
|---|---|---|
| MHA  | H   | H   |
| GQA  | H   | H/4 |
| MQA  | H   | 1   |
| sSQA | H/2 | H/2 |
| SQA  | H/2 | H/4 |
| xSQA | H/4 | H/4 |

The encoder runs one sequence of each length (bidirectional self-attention + dense SwiGLU, every layer);
`max_position_embeddings` is raised to the longest length. Parameter counts per variant are reported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import timing
from .common import DEFAULT_PRESET, build_rxt, random_tokens

NAME = "attention-variants"
DESCRIPTION = "Encoder forward time at 1k/4k/8k tokens for MHA, GQA, MQA, sSQA, SQA and xSQA of the same hidden size."
DEFAULTS = dict(
    preset=DEFAULT_PRESET, lengths=(1024, 4096, 8192), target_lengths=(4096, 8192), repeats=5, warmup=1, warmup_max_length=2048
)
SMOKE = {**DEFAULTS, "lengths": (32, 64), "target_lengths": (64,), "repeats": 1, "warmup": 1}
VARIANTS = ("MHA", "GQA", "MQA", "sSQA", "SQA", "xSQA")
TARGETS = {"sSQA": 1.6, "xSQA": 2.5}


def variant_heads(num_heads: int) -> dict[str, tuple[int, int]]:
    """`{variant: (query heads, key/value heads)}` for a model splitting its hidden size into `num_heads` heads."""
    if num_heads % 4:
        raise ValueError(f"num_attention_heads={num_heads}: the variants need a multiple of 4 heads.")
    return {
        "MHA": (num_heads, num_heads),
        "GQA": (num_heads, num_heads // 4),
        "MQA": (num_heads, 1),
        "sSQA": (num_heads // 2, num_heads // 2),
        "SQA": (num_heads // 2, num_heads // 4),
        "xSQA": (num_heads // 4, num_heads // 4),
    }


def build_variant(preset: str, query_heads: int, key_value_heads: int, max_length: int, seed: int = 0):
    return build_rxt(
        preset,
        seed=seed,
        num_query_heads=query_heads,
        num_key_value_heads=key_value_heads,
        max_position_embeddings=max_length,
    )


def encoder_parameters(model) -> dict[str, int]:
    encoder = model.model.encoder
    attention = sum(p.numel() for layer in encoder.layers for p in layer.self_attn.parameters())
    return {"encoder": sum(p.numel() for p in encoder.parameters()), "encoder_attention": attention}


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    lengths = [int(n) for n in opts["lengths"]]
    missing = [n for n in opts["target_lengths"] if n not in lengths]
    if missing:
        raise ValueError(f"target_lengths {missing} are not among the measured lengths {lengths}.")
    with timing.torch_threads(threads), torch.inference_mode():
        probe = build_rxt(opts["preset"], seed=seed)
        heads = variant_heads(probe.config.num_attention_heads)
        models = {name: build_variant(opts["preset"], q, kv, max(lengths), seed) for name, (q, kv) in heads.items()}
        payload = timing.new_payload(
            NAME,
            DESCRIPTION,
            smoke,
            {
                **opts,
                "seed": seed,
                "hidden_size": probe.config.hidden_size,
                "num_hidden_layers": probe.config.num_hidden_layers,
                "num_attention_heads": probe.config.num_attention_heads,
                "head_dim": probe.config.hidden_size // probe.config.num_attention_heads,
                "attn_implementation": probe.config._attn_implementation,
                "variants": {name: {"query_heads": q, "key_value_heads": kv} for name, (q, kv) in heads.items()},
            },
        )
        del probe
        generator = torch.Generator().manual_seed(seed)
        results = {
            name: {"query_heads": q, "key_value_heads": kv, "parameters": encoder_parameters(models[name]), "encoder_s": {}}
            for name, (q, kv) in heads.items()
        }
        for length in lengths:  # length outer, variants inner: drifts of the machine hit every variant alike
            ids = random_tokens(length, models["MHA"].config.vocab_size, generator)
            for name, model in models.items():
                warmup = opts["warmup"] if length <= opts["warmup_max_length"] else 0
                summary, _ = timing.measure(lambda: model.model.encode(ids), repeats=opts["repeats"], warmup=warmup)
                results[name]["encoder_s"][str(length)] = summary
        for name in VARIANTS:
            results[name]["speedup_vs_mha"] = {
                str(n): timing.ratio(results["MHA"]["encoder_s"][str(n)]["median"], results[name]["encoder_s"][str(n)]["median"])
                for n in lengths
            }
            results[name]["tokens_per_s"] = {
                str(n): n / results[name]["encoder_s"][str(n)]["median"] for n in lengths
            }
        payload["results"] = {"lengths": lengths, "variants": results}

    payload["targets"] = {
        f"{variant}_speedup_vs_MHA_at_{n}": timing.target(
            f"MHA / {variant} encoder forward time at {n} tokens", results[variant]["speedup_vs_mha"][str(n)], goal
        )
        for variant, goal in TARGETS.items()
        for n in opts["target_lengths"]
    }
    payload["notes"].append(
        f"Warm-up calls only up to {opts['warmup_max_length']} tokens (each variant was warmed up at the shorter "
        "lengths first; a single forward beyond that takes seconds, so first-call overheads are negligible)."
    )
    if plot:
        written = timing.plot_lines(
            timing.results_dir(output_dir) / f"{NAME}.png",
            {name: (lengths, [results[name]["encoder_s"][str(n)]["median"] for n in lengths]) for name in VARIANTS},
            f"Encoder forward time ({payload['config']['num_hidden_layers']} layers, hidden {payload['config']['hidden_size']})",
            "tokens",
            "seconds (median)",
            logx=True,
            logy=True,
            subtitle=timing.machine_subtitle(payload["machine"]),
        )
        if written is not None:
            payload["plots"].append(str(Path(written)))
    return timing.finish(NAME, payload, output_dir)
