"""Shared helpers of the benchmarks: thread control, warm-up + repeated timing, summaries, machine facts,
result files (JSON) and optional plots (PNG, when matplotlib is installed).

Every benchmark builds one payload with :func:`new_payload` and writes it with :func:`write_result`::

    {
      "name": "latency-per-turn", "description": "...", "smoke": false,
      "created": "2025-...Z", "duration_s": 123.4,
      "machine": {...},            # machine_info()
      "config": {...},             # the options the benchmark ran with (sizes, repeats, models)
      "results": {...},            # raw samples and summaries, benchmark specific
      "targets": {KEY: {"description", "measured", "target", "comparison", "met"}},
      "plots": ["path/to/plot.png", ...],
      "notes": ["..."]
    }

Summaries (:func:`summarize`) are `{"median", "min", "max", "mean", "samples"}` in seconds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
DEFAULT_RESULTS_DIR = PACKAGE_ROOT / "results"
COMPARISONS = (">=", "<=", ">", "<", "==")


# ------------------------------------------------------------------------------------------------------
# threads and seeds


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `torch.set_num_threads(threads)` (None: leave it), restoring the old value after."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: use a positive number of CPU threads (or None for the default).")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------------
# timing


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and mean of timing samples (seconds), with the raw samples."""
    values = [float(s) for s in samples]
    if not values:
        raise ValueError("summarize() needs at least one sample.")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "samples": values,
    }


def measure(
    fn: Callable[[], Any],
    repeats: int = 3,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Time `fn()` `repeats` times after `warmup` untimed calls; returns `(summary, last result)`.

    `setup()` (untimed) runs before every call, warm-up included; when given, its result is passed to `fn`.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: measure at least once.")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: cannot be negative.")

    def call():
        return fn(setup()) if setup is not None else fn()

    for _ in range(warmup):
        call()
    samples, result = [], None
    for _ in range(repeats):
        argument = setup() if setup is not None else None
        start = time.perf_counter()
        result = fn(argument) if setup is not None else fn()
        samples.append(time.perf_counter() - start)
    return summarize(samples), result


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, `inf` when the denominator is 0 (JSON-safe through :func:`to_jsonable`)."""
    return float(numerator) / float(denominator) if denominator else math.inf


def target(description: str, measured: Any, goal: Any, comparison: str = ">=") -> dict[str, Any]:
    """One row of a benchmark's targets table: the measured value next to the goal, and whether it is met."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison={comparison!r}: choose one of {COMPARISONS}.")
    checks = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
    }
    return {
        "description": description,
        "measured": measured,
        "target": goal,
        "comparison": comparison,
        "met": bool(checks[comparison](measured, goal)),
    }


# ------------------------------------------------------------------------------------------------------
# machine facts


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(path: Path = REPO_ROOT) -> dict[str, Any]:
    """`{"commit": sha or None, "dirty": bool or None}` of the repository holding the benchmarks."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": sha or None, "dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, library versions, git commit."""
    import transformers

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
    }
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        info["usable_cores"] = os.cpu_count()
    info.update({f"git_{key}": value for key, value in git_commit().items()})
    return info


# ------------------------------------------------------------------------------------------------------
# results


def new_payload(name: str, description: str, smoke: bool, config: dict[str, Any]) -> dict[str, Any]:
    """The common skeleton of a result (see the module docstring); `duration_s` is set by `write_result`."""
    return {
        "name": name,
        "description": description,
        "smoke": bool(smoke),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "_started": time.perf_counter(),
        "duration_s": None,
        "machine": machine_info(),
        "config": dict(config),
        "results": {},
        "targets": {},
        "plots": [],
        "notes": [],
    }


def to_jsonable(value: Any) -> Any:
    """Tensors, tuples, paths and non-finite floats made JSON-safe (inf/nan become strings)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def results_dir(output_dir: str | os.PathLike | None = None) -> Path:
    path = Path(output_dir) if output_dir is not None else DEFAULT_RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(name: str, payload: dict[str, Any], output_dir: str | os.PathLike | None = None) -> Path:
    """Write `payload` to `OUTPUT_DIR/NAME.json` (default `benchmarks/results/`) and return the path.

    Sets `duration_s` from the payload's start time and drops private (`_`-prefixed) keys.
    """
    started = payload.pop("_started", None)
    if started is not None and payload.get("duration_s") is None:
        payload["duration_s"] = time.perf_counter() - started
    path = results_dir(output_dir) / f"{name}.json"
    clean = {k: v for k, v in payload.items() if not str(k).startswith("_")}
    path.write_text(json.dumps(to_jsonable(clean), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def finish(name: str, payload: dict[str, Any], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the result file (see `write_result`), record its path in the payload and return the payload."""
    payload["path"] = str(write_result(name, payload, output_dir))
    return payload


# ------------------------------------------------------------------------------------------------------
# plots


MATPLOTLIB_MISSING = (
    "matplotlib is not installed: no PNG plot written (the JSON has every number). "
    "Install it with `pip install -e .[bench]` or `pip install matplotlib`."
)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_lines(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    subtitle: str | None = None,
) -> Path | None:
    """A line plot of `{label: (xs, ys)}` saved as PNG; returns None (after a printed note) without matplotlib."""
    if not have_matplotlib():
        print(MATPLOTLIB_MISSING)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        axes.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    all_x = [x for xs, _ in series.values() for x in xs]
    if all_x and all(float(x).is_integer() for x in all_x) and not logx:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if logx:
        axes.set_xscale("log", base=2)
    if logy:
        axes.set_yscale("log")
    axes.set_title(title if subtitle is None else f"{title}\n{subtitle}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def machine_subtitle(machine: dict[str, Any]) -> str:
    return f"{machine.get('cpu', '?')}, {machine.get('torch_threads', '?')} threads, torch {machine.get('torch', '?')}"


# ------------------------------------------------------------------------------------------------------
# options


def resolve_options(defaults: dict[str, Any], smoke_defaults: dict[str, Any], smoke: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The options a benchmark runs with: full-size or smoke defaults, then the caller's overrides
    (None values are ignored; an unknown option is an error naming the valid ones)."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"unknown benchmark option(s) {unknown}; valid options: {sorted(defaults)}.")
    options = dict(smoke_defaults if smoke else defaults)
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options
