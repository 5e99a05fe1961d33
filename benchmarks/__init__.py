"""Speed, cost and quality benchmarks for RxT, each writing JSON (and PNG plots).

Every benchmark is a module with ``run(smoke=False, output_dir=None, threads=None, seed=0, plot=True, **options)``
returning its payload (see :mod:`benchmarks.timing` for the schema) after writing ``OUTPUT_DIR/NAME.json``
(default ``benchmarks/results/``). ``smoke=True`` runs tiny sizes in seconds (for tests).

    >>> from rxt_hf.benchmarks import run_benchmark
    >>> payload = run_benchmark("memory-precache", smoke=True)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module (imported lazily: importing the package stays cheap)
BENCHMARKS: dict[str, str] = {
    "latency-per-turn": "rxt_hf.benchmarks.latency_per_turn",
    "decode-overhead": "rxt_hf.benchmarks.decode_overhead",
    "memory-precache": "rxt_hf.benchmarks.memory_precache",
    "attention-variants": "rxt_hf.benchmarks.attention_variants",
    "batched-interactions": "rxt_hf.benchmarks.batched_interactions",
    "quality-vs-stateless": "rxt_hf.benchmarks.quality_vs_stateless",
    "tensorbleu": "rxt_hf.benchmarks.tensorbleu",
    "serve": "rxt_hf.benchmarks.serve",
}


def get_benchmark(name: str):
    """The module of benchmark `name` (it has `NAME`, `DESCRIPTION`, `DEFAULTS`, `SMOKE` and `run`)."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}: choose one of {sorted(BENCHMARKS)} or 'all'.")
    return importlib.import_module(BENCHMARKS[name])


def run_benchmark(name: str, smoke: bool = False, **kwargs: Any) -> dict:
    """Run one benchmark (`output_dir`, `threads`, `seed`, `plot` and its own options go through `kwargs`)."""
    return get_benchmark(name).run(smoke=smoke, **kwargs)


def run_all(smoke: bool = False, **kwargs: Any) -> dict[str, dict]:
    """Run every benchmark in registry order; returns `{name: payload}`."""
    return {name: run_benchmark(name, smoke=smoke, **kwargs) for name in BENCHMARKS}


__all__ = ["BENCHMARKS", "get_benchmark", "run_benchmark", "run_all"]
