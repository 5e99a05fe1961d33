"""tensorbleu: per-sentence BLEU of a batch on token-id tensors (TensorBLEU) vs sacrebleu in a Python loop.

The batch is seeded and synthetic: `batch_size` candidates of `length` token ids drawn from a Zipf-like
distribution over `vocab_size` ids (frequent ids repeat inside a sentence, so clipping matters), and one
reference per candidate made by copying it and replacing each token with a fresh draw with a per-row
probability uniform in `[mutation_min, mutation_max]`, so the BLEU values spread from near 0 to near 1.

- TensorBLEU: one `TensorBLEU(smoothing=...)(candidates, references)` call on the `[B, T]` id tensors (CPU,
  torch threads as given by `--threads`), returning the `[B]` scores.
- sacrebleu: `BLEU(tokenize="none", smooth_method=..., effective_order=True).sentence_score` over the pairs in a
  Python loop, each id rendered as the word `w<id>` (as in `tests/test_tensorbleu.py`). The strings are rendered
  before the clock starts (rendering is timed separately and reported), the metric object is built once.

Both are timed interleaved (warm-up calls, then `repeats` timed rounds of each; medians reported). The two BLEU
vectors must agree to 1e-4 (max absolute difference reported). A sweep over smaller batches (leading rows of the
same batch) shows how both scale with the batch size.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rxt_hf.trainers.tensorbleu import TensorBLEU

from . import timing

NAME = "tensorbleu"
DESCRIPTION = "Per-sentence BLEU of 256 x 128-token pairs: TensorBLEU on id tensors vs sacrebleu sentence BLEU in a loop."
DEFAULTS = dict(
    batch_size=256,
    length=128,
    vocab_size=2000,
    zipf_exponent=1.0,
    mutation_min=0.05,
    mutation_max=0.9,
    smoothing="exp",
    sweep_batch_sizes=(16, 64),
    repeats=5,
    warmup=2,
)
SMOKE = {**DEFAULTS, "batch_size": 8, "length": 16, "vocab_size": 50, "sweep_batch_sizes": (2, 4), "repeats": 1, "warmup": 1}
TARGET_SPEEDUP = 10.0
TOLERANCE = 1e-4


def make_batch(
    batch_size: int,
    length: int,
    vocab_size: int,
    generator: torch.Generator,
    zipf_exponent: float = 1.0,
    mutation_min: float = 0.05,
    mutation_max: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(candidates [B, T], references [B, T], mutation rate per row [B])`: references are mutated copies."""
    if not 0.0 <= mutation_min <= mutation_max <= 1.0:
        raise ValueError(f"need 0 <= mutation_min <= mutation_max <= 1, got {mutation_min}, {mutation_max}")
    frequency = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64) ** zipf_exponent
    order = torch.randperm(vocab_size, generator=generator)  # frequent ids are not simply the small ones

    def draw(count: int) -> torch.Tensor:
        return order[torch.multinomial(frequency, count, replacement=True, generator=generator)]

    candidates = draw(batch_size * length).view(batch_size, length)
    rate = mutation_min + (mutation_max - mutation_min) * torch.rand(batch_size, 1, generator=generator, dtype=torch.float64)
    replace = torch.rand(batch_size, length, generator=generator, dtype=torch.float64) < rate
    references = torch.where(replace, draw(batch_size * length).view(batch_size, length), candidates)
    return candidates, references, rate.squeeze(1)


def render(ids: torch.Tensor) -> list[str]:
    """Each row of ids as a sentence of words `w<id>` (sacrebleu's input, `tokenize="none"`)."""
    return [" ".join(f"w{i}" for i in row) for row in ids.tolist()]


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    quantile = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {
        "min": ordered[0],
        "p10": quantile(0.1),
        "p25": quantile(0.25),
        "median": statistics.median(ordered),
        "p75": quantile(0.75),
        "p90": quantile(0.9),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "fraction_zero": sum(v == 0.0 for v in ordered) / len(ordered),
    }


def _time_pair(tensor_fn, loop_fn, render_fn, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved timing (so slow drifts of a shared machine hit both alike): warm-up rounds, then timed ones."""
    for _ in range(warmup):
        tensor_fn(), loop_fn(), render_fn()
    samples: dict[str, list[float]] = {"tensorbleu": [], "sacrebleu": [], "render": []}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for key, fn in (("tensorbleu", tensor_fn), ("sacrebleu", loop_fn), ("render", render_fn)):
            start = time.perf_counter()
            outputs[key] = fn()
            samples[key].append(time.perf_counter() - start)
    summaries = {key: timing.summarize(values) for key, values in samples.items()}
    return {"summaries": summaries, "outputs": outputs}


def run(smoke: bool = False, output_dir=None, threads: int | None = None, seed: int = 0, plot: bool = True, **options) -> dict:
    import sacrebleu
    from sacrebleu.metrics import BLEU

    opts = timing.resolve_options(DEFAULTS, SMOKE, smoke, options)
    batch, length, vocab, repeats, warmup = (opts[k] for k in ("batch_size", "length", "vocab_size", "repeats", "warmup"))
    smoothing = opts["smoothing"]
    sizes = sorted({int(n) for n in opts["sweep_batch_sizes"] if 0 < int(n) < batch} | {batch})
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)

    with timing.torch_threads(threads), torch.inference_mode():
        payload = timing.new_payload(NAME, DESCRIPTION, smoke, {**opts, "seed": seed, "sacrebleu": sacrebleu.__version__})
        payload["config"]["sweep_batch_sizes"] = sizes
        generator = torch.Generator().manual_seed(seed)
        candidates, references, rates = make_batch(
            batch, length, vocab, generator, opts["zipf_exponent"], opts["mutation_min"], opts["mutation_max"]
        )
        bleu = TensorBLEU(smoothing=smoothing)  # sentence level: effective order, as sacrebleu's sentence_score
        metric = BLEU(tokenize="none", smooth_method=smoothing, effective_order=True)
        payload["config"]["tensorbleu"] = repr(bleu)
        payload["config"]["sacrebleu_metric"] = f"BLEU(tokenize='none', smooth_method={smoothing!r}, effective_order=True)"

        levels: dict[str, dict[str, Any]] = {}
        for size in sizes:
            cand, ref = candidates[:size], references[:size]
            hyps, refs = render(cand), [[r] for r in render(ref)]

            def tensor_fn(cand=cand, ref=ref):
                return bleu(cand, ref)

            def loop_fn(hyps=hyps, refs=refs):
                return [metric.sentence_score(h, r).score / 100.0 for h, r in zip(hyps, refs)]

            def render_fn(cand=cand, ref=ref):
                return render(cand), render(ref)

            timed = _time_pair(tensor_fn, loop_fn, render_fn, repeats, warmup)
            s = timed["summaries"]
            tensor_scores = timed["outputs"]["tensorbleu"].to(torch.float64)
            loop_scores = torch.tensor(timed["outputs"]["sacrebleu"], dtype=torch.float64)
            levels[str(size)] = {
                "batch_size": size,
                "tensorbleu_s": s["tensorbleu"],
                "sacrebleu_s": s["sacrebleu"],
                "render_s": s["render"],
                "speedup": timing.ratio(s["sacrebleu"]["median"], s["tensorbleu"]["median"]),
                "speedup_with_rendering": timing.ratio(
                    s["sacrebleu"]["median"] + s["render"]["median"], s["tensorbleu"]["median"]
                ),
                "max_abs_difference": float((tensor_scores - loop_scores).abs().max()),
                "tensorbleu_scores": tensor_scores.tolist(),
                "sacrebleu_scores": loop_scores.tolist(),
            }

        full = levels[str(batch)]
        payload["results"] = {
            "batch_size": batch,
            "tensorbleu_median_s": full["tensorbleu_s"]["median"],
            "sacrebleu_median_s": full["sacrebleu_s"]["median"],
            "render_median_s": full["render_s"]["median"],
            "speedup": full["speedup"],
            "speedup_with_rendering": full["speedup_with_rendering"],
            "max_abs_difference": full["max_abs_difference"],
            "tensorbleu_pairs_per_s": timing.ratio(batch, full["tensorbleu_s"]["median"]),
            "sacrebleu_pairs_per_s": timing.ratio(batch, full["sacrebleu_s"]["median"]),
            "bleu_spread": spread(full["sacrebleu_scores"]),
            "mutation_rate_spread": spread(rates.tolist()),
            "levels": {k: {key: v for key, v in level.items() if not key.endswith("_scores")} for k, level in levels.items()},
            "tensorbleu_scores": full["tensorbleu_scores"],
            "sacrebleu_scores": full["sacrebleu_scores"],
        }

    results = payload["results"]
    payload["targets"] = {
        "tensorbleu_speedup": timing.target(
            f"sacrebleu sentence BLEU loop / TensorBLEU time, {batch} pairs of {length} tokens (TensorBLEU faster by at least)",
            results["speedup"],
            TARGET_SPEEDUP,
        ),
        "agreement": timing.target(
            "max |TensorBLEU - sacrebleu| over the batch (BLEU in [0, 1])", results["max_abs_difference"], TOLERANCE, "<="
        ),
    }
    payload["notes"].append(
        f"sacrebleu times the loop over pre-rendered strings; rendering the ids as words takes another "
        f"{results['render_median_s'] * 1e3:.1f} ms (speed-up including it: {results['speedup_with_rendering']:.1f}x)."
    )
    if plot:
        written = timing.plot_lines(
            timing.results_dir(output_dir) / f"{NAME}.png",
            {
                "TensorBLEU (one call on id tensors)": (sizes, [levels[str(n)]["tensorbleu_s"]["median"] * 1e3 for n in sizes]),
                "sacrebleu sentence BLEU (Python loop)": (sizes, [levels[str(n)]["sacrebleu_s"]["median"] * 1e3 for n in sizes]),
            },
            f"Per-sentence BLEU of a batch of {length}-token pairs",
            "batch size (pairs)",
            "median time (ms)",
            logx=True,
            logy=True,
            subtitle=timing.machine_subtitle(payload["machine"]),
        )
        if written is not None:
            payload["plots"].append(str(Path(written)))
    return timing.finish(NAME, payload, output_dir)
