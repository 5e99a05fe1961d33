"""Pictures of a run: recall by distance (`rxt eval`) and the training curves of every stage (`rxt train`).

Both read what the run already wrote (`evaluation.json`, each stage folder's `log.jsonl`) and save a PNG beside
it. matplotlib draws off-screen (the Agg backend); without matplotlib installed nothing is drawn and the caller is
told why.
"""

from __future__ import annotations

import json
from pathlib import Path

# The curves worth drawing, in the order they are looked for in a stage's log records.
CURVE_KEYS = ("loss", "reward", "mlm_loss", "decoder_loss", "ce_loss")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("drawing the run's PNGs needs matplotlib: pip install matplotlib") from error
    return plt


def plot_recall(evaluation: dict, path: str | Path) -> Path:
    """Bar chart of recall accuracy by distance, with memory and without (the no-memory control)."""
    plt = _pyplot()
    with_memory = evaluation["recall_accuracy"]
    without = evaluation.get("recall_accuracy_no_memory") or {}
    counts = evaluation.get("recall_count") or {}
    distances = sorted(with_memory, key=int)
    positions = range(len(distances))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    bars = axes.bar(
        [p - width / 2 for p in positions], [100 * with_memory[d] for d in distances], width, label="with memory"
    )
    axes.bar([p + width / 2 for p in positions], [100 * without.get(d, 0.0) for d in distances], width,
             label="no memory (control)", color="#bbbbbb")
    for bar, distance in zip(bars, distances):
        axes.annotate(f"{100 * with_memory[distance]:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axes.set_xticks(list(positions), [f"{d}\n(n={counts.get(d, '?')})" for d in distances])
    axes.set_xlabel("recall distance (turns since the fact was said)")
    axes.set_ylabel("recall accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Recall by distance, {evaluation.get('num_conversations', '?')} test conversations")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def read_log(path: str | Path) -> list[dict]:
    """The per-step records of a stage's `log.jsonl` (the final summary record left out)."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not a JSON record ({error}): fix or delete the line.") from None
        if not record.get("final") and "step" in record:
            records.append(record)
    return records


def plot_training_curves(output_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """One panel per stage folder of `output_dir` that has a `log.jsonl`: its loss (and reward) against the step.
    Returns the PNG's path, or None when no stage logged anything."""
    output_dir = Path(output_dir)
    stages = []
    for folder in sorted(p for p in output_dir.iterdir() if p.is_dir() and (p / "log.jsonl").is_file()):
        records = read_log(folder / "log.jsonl")
        curves = {
            key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))] for key in CURVE_KEYS
        }
        curves = {key: points for key, points in curves.items() if points}
        if curves:
            stages.append((folder.name, curves))
    if not stages:
        return None
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3), squeeze=False)
    for axes, (name, curves) in zip(panels[0], stages):
        for key, points in curves.items():
            target = axes.twinx() if key == "reward" and len(curves) > 1 else axes
            steps, values = zip(*points)
            target.plot(steps, values, label=key, color="C1" if key == "reward" else None, linewidth=1.2,
                        marker="." if len(points) < 20 else None)
            if target is not axes:
                target.set_ylabel("reward", color="C1")
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("step")
        axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    path = Path(path) if path else output_dir / "training_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["plot_recall", "plot_training_curves", "read_log"]
