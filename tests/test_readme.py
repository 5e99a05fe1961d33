"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {})


@pytest.mark.parametrize("name", ["default-recipe-evaluation.json", "default-recipe-long-range-evaluation.json"])
def test_readme_results_table_is_the_one_the_default_run_wrote(name):
    """The README shows the default recipe's evaluations (6-turn and 10-turn test conversations) exactly as
    `rxt train` / `rxt eval` rendered them."""
    import json

    from rxt_hf.trainers.evaluation import format_evaluation_table

    result_file = README.parent / "benchmarks" / "results" / name
    if not result_file.exists():
        pytest.skip(f"no recorded {name}")
    table = format_evaluation_table(json.loads(result_file.read_text()))
    assert table in README.read_text()
