"""The run's pictures: recall by distance and the stages' training curves, drawn from what the run wrote."""

import json

import pytest

from rxt_hf.recipes.plots import plot_recall, plot_training_curves, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_recall_draws_with_and_without_memory(tmp_path):
    evaluation = {
        "num_conversations": 10,
        "recall_accuracy": {"1": 0.9, "2": 0.75, "10": 0.5},
        "recall_accuracy_no_memory": {"1": 0.0, "2": 0.05},
        "recall_count": {"1": 10, "2": 8, "10": 4},
    }
    path = plot_recall(evaluation, tmp_path / "evaluation.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_one_panel_per_logged_stage(tmp_path):
    for name, key in (("01-pretrain", "loss"), ("05-mrl", "reward")):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"step": s, key: 1.0 / s} for s in range(1, 6)] + [{"step": 5, "final": True, "train_loss": 0.2}]
        if key == "reward":
            records = [{**r, "loss": 0.1} for r in records]
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tokenizer").mkdir()  # folders without a log are not stages
    assert len(read_log(tmp_path / "01-pretrain" / "log.jsonl")) == 5  # the final summary is not a point
    path = plot_training_curves(tmp_path)
    assert path == tmp_path / "training_curves.png" and path.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_without_logs_draw_nothing(tmp_path):
    assert plot_training_curves(tmp_path) is None


def test_bad_log_line_names_the_problem(tmp_path):
    (tmp_path / "log.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"log.jsonl line 1 is not a JSON record"):
        read_log(tmp_path / "log.jsonl")
