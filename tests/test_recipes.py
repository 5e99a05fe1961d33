"""Recipes and the `rxt` command: validation before training, a tiny end-to-end run, restarts, eval, chat."""

import json
import subprocess
import textwrap

import pytest
import torch
import yaml

from conftest import remote_env, remote_python
from rxt_hf.recipes.cli import main
from rxt_hf.recipes.recipe import load_recipe, parse_recipe

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "synthetic", "num_conversations": 60, "num_turns": 3, "max_recall_distance": 2},
    "tokenizer": {"vocab_size": 400},
    "model": {"preset": "rxt-tiny", "overrides": {"max_position_embeddings": 96, "stm_size": 8}},
    "stages": [
        {"name": "pretrain", "trainer": "joint-lm", "config": {"mode": "pretraining", "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96}},
        {"name": "sft", "trainer": "joint-lm", "config": {"mode": "sft", "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48}},
        {"name": "memory", "trainer": "memory-attention", "config": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48}},
        {
            "name": "smat",
            "trainer": "smat",
            "data": {"turn_datasets": [2, 3]},
            "config": {"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 48, "recall_weight": 3.0,
                       "turn_curriculum": [[0.0, 2], [0.5, 3]]},
        },
        {
            "name": "mrl",
            "trainer": "mrl",
            "data": {"seed": 1},  # fresh episodes, as in the default recipe
            "config": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4,
                       "curriculum_steps": [2], "max_interaction_length": 48, "freeze_schedule": {"memory_attention": 0},
                       "save_strategy": "no", "use_cpu": True, "disable_tqdm": True},
        },
    ],
    "evaluation": {"num_conversations": 4, "num_turns": 3, "max_new_tokens": 4, "batch_size": 4,
                   "long_range": {"num_turns": 4, "max_recall_distance": 3}},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def with_changes(change):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    change(recipe)
    return recipe


def test_default_recipe_is_valid():
    recipe = load_recipe("recipes/default.yaml")
    assert [s.trainer for s in recipe.stages] == ["joint-lm", "joint-lm", "memory-attention", "smat", "mrl"]
    mrl = recipe.stages[-1]
    assert recipe.stage_data(mrl)["seed"] != recipe.seed  # MRL episodes are not the supervised stages' conversations


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["stages"][0].update(trainer="ppo"), "stages\\[pretrain\\].trainer='ppo'"),
        (lambda r: r["stages"][1]["config"].update(learning_rat=0.1), "learning_rat"),
        (lambda r: r["stages"][2]["config"].update(max_steps="many"), "max_steps='many'"),
        (lambda r: r["stages"][3]["config"].update(turn_curriculum=[[0.5, 2]]), "turn_curriculum"),
        (lambda r: r.update(stages=[]), "stages"),
        (lambda r: r["model"].pop("preset"), "model"),
        (lambda r: r["data"].update(shuffle=True), "data.shuffle"),
        (lambda r: r["stages"][3]["data"].update(recall_weight=3.0), r"stages\[smat\].data.recall_weight.*config"),
    ],
)
def test_bad_recipe_values_fail_before_training(tmp_path, change, message):
    path = write_recipe(tmp_path, with_changes(change))
    with pytest.raises(ValueError, match=message):
        main(["train", str(path), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_missing_column_fails_before_training(tmp_path):
    rows = [{"question": "Where?", "answer": "Here."}] * 4
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = with_changes(lambda r: r["stages"][1].update(data={"source": str(tmp_path / "sft.jsonl")}))
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(ValueError, match="query"):
        main(["train", str(path), "--output", str(tmp_path / "out")])
    assert not any((tmp_path / "out").glob("01-*"))


REMOTE_CHAT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "modeling_rxt" not in sys.modules and type(model).__module__.startswith("transformers_modules")
    stm = model.init_memory(1)
    for text in ["I put the red lantern in the old mill.", "Where did I put the lantern?"]:
        query = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
        ids = query["input_ids"]
        out = model.generate(ids, stm_state=stm, max_new_tokens=6, do_sample=False)
        stm = model.update_memory(stm, out)
        print(repr(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    print(list(stm.shape))
    """
)


def test_tiny_recipe_end_to_end_restart_eval_and_chat(tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path, TINY_RECIPE)
    out = tmp_path / "out"
    assert main(["train", str(path), "--output", str(out)]) == 0
    for folder in ("tokenizer", "01-pretrain", "02-sft", "03-memory", "04-smat", "05-mrl", "final"):
        assert (out / folder).is_dir(), folder
    # every stage logged its records (the TRL stage too), drawn into one picture; the evaluation has its own
    for folder in ("01-pretrain", "02-sft", "03-memory", "04-smat", "05-mrl"):
        assert (out / folder / "log.jsonl").is_file(), folder
    for picture in ("training_curves.png", "evaluation.png", "evaluation-long-range.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    summary = json.loads((out / "run_summary.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert summary["final_model"].endswith("final") and "recall_accuracy" in evaluation
    # the long-range evaluation plays as many test conversations, each 4 turns long instead of 3
    long_range = json.loads((out / "evaluation-long-range.json").read_text())
    conversations = evaluation["num_conversations"]
    assert conversations > 0 and long_range["num_conversations"] == conversations
    assert (evaluation["num_turns"], long_range["num_turns"]) == (3 * conversations, 4 * conversations)
    assert summary["evaluation_long_range"]["num_turns"] == 4 * conversations
    assert (out / "evaluation-long-range.md").is_file()
    card = (out / "final" / "README.md").read_text()
    for stage in ("pretrain", "sft", "memory", "smat", "mrl"):
        assert stage in card or stage.replace("pretrain", "pretraining") in card
    assert "no-memory" in card.lower() or "without memory" in card.lower()

    # restart from a later stage: the earlier stages are not re-run
    before = (out / "01-pretrain" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", str(path), "--output", str(out), "--from-stage", "smat", "--no-eval"]) == 0
    assert (out / "01-pretrain" / "model.safetensors").stat().st_mtime_ns == before
    # only stage 5 (MRL) from the saved SMAT model
    smat_before = (out / "04-smat" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", str(path), "--output", str(out), "--stages", "mrl", "--no-eval"]) == 0
    assert (out / "04-smat" / "model.safetensors").stat().st_mtime_ns == smat_before
    assert (out / "05-mrl" / "config.json").is_file()

    # rxt eval writes JSON and prints the table
    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--num-conversations", "3", "--num-turns", "3", "--output", str(tmp_path / "e.json")]) == 0
    assert "recall distance" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["num_conversations"] == 3

    # rxt chat: two messages, then quit
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Ann has a red kite.\nWhat does Ann have?\n/quit\n"))
    assert main(["chat", str(out / "final"), "--max-new-tokens", "4", "--memory", str(tmp_path / "chat.stm")]) == 0
    assert capsys.readouterr().out.count("rxt> ") == 2 and (tmp_path / "chat.stm").exists()

    # the saved model chats with memory in a process that never imports the project
    script = tmp_path / "remote_chat.py"
    script.write_text(REMOTE_CHAT)
    result = subprocess.run(
        [remote_python(), str(script), str(out / "final")],
        cwd=tmp_path, env=remote_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[1, 2, 8, 32]"


def test_parse_recipe_reports_stage_lookup_errors():
    recipe = parse_recipe(TINY_RECIPE)
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        recipe.stage("nope")


def test_optional_stages_run_only_when_named():
    from rxt_hf.recipes.pipeline import select_stages

    recipe = parse_recipe(with_changes(lambda r: r["stages"][-1].update(optional=True)))
    names = lambda stages: [stage.name for stage in stages]  # noqa: E731
    assert names(select_stages(recipe)) == ["pretrain", "sft", "memory", "smat"]  # the main job
    assert names(select_stages(recipe, from_stage="memory")) == ["memory", "smat"]
    assert names(select_stages(recipe, from_stage="mrl")) == ["mrl"]
    assert names(select_stages(recipe, stages=["mrl"])) == ["mrl"]
    # the default recipe's main job stops after stage 4; stage 5 is there by name
    default = load_recipe("recipes/default.yaml")
    assert names(select_stages(default))[-1] == "smat" and default.stage("mrl").optional
    # an optional stage sits after the main job, and optional is a boolean
    def optional_in_the_middle(r):
        r["stages"][2]["optional"] = True
    for change, message in [
        (optional_in_the_middle, r"stages\[smat\].optional=False is invalid: optional stages come after every stage"),
        (lambda r: r["stages"][-1].update(optional="yes"), r"stages\[mrl\].optional='yes' is invalid: it must be true"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_recipe(with_changes(change))


def test_overrides_change_recipe_values_before_validation(tmp_path):
    from rxt_hf.recipes.recipe import apply_overrides

    path = write_recipe(tmp_path, TINY_RECIPE)
    recipe = load_recipe(path, [
        "stages.smat.config.max_steps=7",         # a stage by name
        "stages.0.config.learning_rate=0.01",     # ... or by index
        "data.source=stories.jsonl",              # plain strings stay strings
        "model.overrides.stm_size=16",            # numbers are read as YAML
        "stages.mrl.config.curriculum_steps=[1, 2]",
        "evaluation.data.subset=steps-2",         # missing mappings on the way are created
    ])
    assert recipe.stage("smat").config["max_steps"] == 7
    assert recipe.stages[0].config["learning_rate"] == 0.01
    assert recipe.data["source"] == "stories.jsonl" and recipe.model["overrides"]["stm_size"] == 16
    assert recipe.stage("mrl").config["curriculum_steps"] == [1, 2]
    assert recipe.evaluation_data() == {**recipe.data, "subset": "steps-2"}
    assert recipe.long_range_evaluation_data() == {**recipe.data, "subset": "steps-2", "num_turns": 4,
                                                   "max_recall_distance": 3}
    # the YAML file and a mapping given to apply_overrides are not changed
    assert yaml.safe_load(path.read_text()) == TINY_RECIPE
    raw = json.loads(json.dumps(TINY_RECIPE))
    assert apply_overrides(raw, {"seed": 5})["seed"] == 5 and raw["seed"] == 0
    for overrides, message in [
        (["max_steps"], "override 'max_steps' is invalid: write KEY=VALUE"),
        (["stages.nope.config.max_steps=1"], r"no list element 'nope'.*'pretrain', 'sft'"),
        (["seed.value=1"], "'seed' holds the int 0, not a mapping"),
        (["stages.smat.config.max_steps=many"], r"stages\[smat\].config.max_steps='many'"),
        (["data.subset=[1]"], r"data.subset=\[1\] is invalid: it must be a non-empty string or null"),
        (["stages.smat.data.same_kind_prob=2"], r"stages\[smat\].data.same_kind_prob=2 is invalid: it must be a probability"),
        (["evaluation.long_range.num_turn=10"], r"evaluation.long_range.num_turn=10 is invalid: unknown key"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_recipe(path, overrides)


def test_set_on_the_command_line_is_checked_before_training(tmp_path):
    path = write_recipe(tmp_path, TINY_RECIPE)
    with pytest.raises(ValueError, match=r"stages\[sft\].config.learning_rat"):
        main(["train", str(path), "--output", str(tmp_path / "out"), "--set", "stages.sft.config.learning_rat=0.1"])
    assert not (tmp_path / "out").exists()


def test_epochs_set_the_stage_length_from_the_data_size():
    recipe = parse_recipe(with_changes(lambda r: (
        r["stages"][1].update(epochs=1.5),
        r["stages"][1]["config"].pop("max_steps"),
        r["stages"][1]["config"].update(per_device_train_batch_size=4, gradient_accumulation_steps=2),
        r["stages"][4].update(epochs=2),
        r["stages"][4]["config"].pop("max_steps"),
    )))
    assert recipe.stage("sft").steps_for_epochs(10) == 2    # 15 rows / 8 rows per step
    assert recipe.stage("mrl").steps_for_epochs(5) == 5     # 10 conversations / (4 rollouts / 2 generations)
    for change, message in [
        (lambda r: r["stages"][1].update(epochs=2), r"config.max_steps=2 is invalid: epochs=2 sets the stage length"),
        (lambda r: r["stages"][1].update(epochs=0), r"stages\[sft\].epochs=0 is invalid"),
        (lambda r: (r["stages"][3].update(epochs=1), r["stages"][3]["config"].pop("max_steps")), "turn_datasets"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_recipe(with_changes(change))
