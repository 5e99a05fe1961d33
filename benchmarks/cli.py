"""`rxt bench [NAME|all]`: run benchmarks from the command line.

Wire it into the ``rxt`` parser with::

    from rxt_hf.benchmarks.cli import add_bench_command
    add_bench_command(subparsers)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import BENCHMARKS, run_benchmark


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def targets_markdown(payloads: dict[str, dict]) -> str:
    """A Markdown table of every target of `{name: payload}`: benchmark, target, measured, goal, met."""
    lines = ["| benchmark | target | measured | goal | met |", "|---|---|---|---|---|"]
    for name, payload in payloads.items():
        for row in payload.get("targets", {}).values():
            goal = f"{row['comparison']} {_format_value(row['target'])}"
            lines.append(
                f"| {name} | {row['description'].replace('|', '&#124;')} | {_format_value(row['measured'])} | {goal} | "
                f"{'yes' if row['met'] else '**no**'} |"
            )
    return "\n".join(lines)


def load_results(output_dir: str | Path) -> dict[str, dict]:
    """`{name: payload}` of the result files present in `output_dir` (registry order)."""
    folder = Path(output_dir)
    return {
        name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        for name in BENCHMARKS
        if (folder / f"{name}.json").exists()
    }


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> `{key: value}`; a VALUE that reads as JSON (numbers, true, null, {...}) is parsed, any
    other is a string (a path, a name)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: write KEY=VALUE, e.g. --option rxt_model=outputs/default/final.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def command_bench(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    options = parse_options(getattr(args, "option", None))
    if options and args.name == "all":
        raise SystemExit("--option needs one benchmark NAME (options differ between benchmarks), not all.")
    payloads = {}
    for name in names:
        print(f"[bench] {name}{' (smoke)' if args.smoke else ''} ...", flush=True)
        start = time.perf_counter()
        payload = run_benchmark(
            name, smoke=args.smoke, output_dir=args.output_dir, threads=args.threads, seed=args.seed, plot=not args.no_plot,
            **options,
        )
        payloads[name] = payload
        print(f"[bench] {name}: {time.perf_counter() - start:.1f}s -> {payload['path']}", flush=True)
        for plot in payload.get("plots", []):
            print(f"[bench]   plot: {plot}")
    print()
    print(targets_markdown(payloads))
    return 0


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Register `bench NAME|all [--smoke] [--threads N] [--output-dir DIR] [--seed S] [--no-plot]`."""
    bench = subparsers.add_parser(
        "bench",
        help="run speed benchmarks (RxT vs a same-size stateless Llama) and write JSON + PNG results",
        description="Run one benchmark or all of them; each writes OUTPUT_DIR/NAME.json (and PNG plots). "
        f"Benchmarks: {', '.join(BENCHMARKS)}.",
    )
    bench.add_argument("name", nargs="?", default="all", choices=[*BENCHMARKS, "all"], metavar="NAME|all",
                       help=f"one of {', '.join(BENCHMARKS)}, or all (default)")
    bench.add_argument("--smoke", action="store_true", help="tiny sizes, seconds per benchmark (checks the plumbing, not the speed)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    bench.add_argument("--output-dir", default=None, help="where to write NAME.json and plots (default: benchmarks/results/)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    bench.add_argument("--no-plot", action="store_true", help="write the JSON only")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a benchmark option (repeatable; one benchmark only), e.g. "
                       "--option rxt_model=outputs/default/final --option minutes=5 for quality-vs-stateless")
    bench.set_defaults(func=command_bench)
    return bench


def main(argv=None) -> int:
    """Standalone entry point: `python -m rxt_hf.benchmarks.cli NAME|all ...`."""
    parser = argparse.ArgumentParser(prog="python -m rxt_hf.benchmarks.cli")
    subparsers = parser.add_subparsers(dest="command")
    add_bench_command(subparsers)
    args = parser.parse_args(["bench", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
