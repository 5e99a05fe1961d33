"""recipes/rxt-alpha-micro.yaml (the RxT-Alpha Micro card's curriculum on its Hub data sets) and
recipes/finetune-converted.yaml (stages 4-5 from a saved / converted checkpoint).

No network: the Hub data sets are replaced by tiny local folders in their column and split layout
(`--set ...data.source=<folder>`), the model is shrunk with `--set model.overrides.*`.
"""

import json
import math

import pytest
import torch

from conftest import tiny_corpus
from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.recipes.cli import main
from rxt_hf.recipes.recipe import load_recipe

ALPHA_MICRO = "recipes/rxt-alpha-micro.yaml"
MRL_SUBSETS = {  # subset -> (follow-up interactions per conversation, split -> rows); the Hub set's splits
    "steps-2": (2, {"train": 4, "validation": 2}),
    "steps-4": (4, {"train": 4, "validation": 2}),
    "steps-6": (6, {"train": 4, "validation": 2, "supervised": 6}),
    "steps-8": (8, {"train": 4, "validation": 3}),
    "steps-8-lr": (8, {"train": 4, "validation": 2}),
    "steps-12": (12, {"validation": 2}),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def conversation(index: int, follow_ups: int, split: str) -> dict:
    """One row in the column layout of ReactiveAI/TinyStories-MRL: query, answer, interactions: [{query, answer}]."""
    sentences = tiny_corpus(40)
    first = sentences[(index * 4) % 40]
    return {
        "query": f"Tell me a story about {first.split()[0]}.",
        "answer": f"{first} The end of story {index} of {split}.",
        "interactions": [
            {"query": f"What happened next in part {k}?", "answer": sentences[(index * 4 + k) % 40]}
            for k in range(1, follow_ups + 1)
        ],
    }


def hub_layout_data(root):
    """Local stand-ins for the recipe's three Hub data sets, in their splits (and subsets) and columns."""
    texts = tiny_corpus(64)
    stories = [" ".join(texts[i : i + 4]) for i in range(0, 64, 4)]  # 16 "stories", column text
    write_jsonl(root / "TinyStories" / "train.jsonl", [{"text": s} for s in stories])
    write_jsonl(root / "TinyStories" / "validation.jsonl", [{"text": s} for s in stories[:2]])
    pairs = [{"query": texts[i], "answer": texts[i + 1]} for i in range(0, 20, 2)]  # query / answer
    write_jsonl(root / "SFT" / "train.jsonl", pairs[:8])
    write_jsonl(root / "SFT" / "validation.jsonl", pairs[8:])
    for subset, (steps, splits) in MRL_SUBSETS.items():
        for split, rows in splits.items():
            write_jsonl(root / "MRL" / subset / f"{split}.jsonl", [conversation(i, steps, split) for i in range(rows)])
    return {name: str(root / name) for name in ("TinyStories", "SFT", "MRL")}


TINY_MODEL = {  # the preset's structure (MoE decoder, SQA, interlayer memory attention, slot gate), shrunk
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_query_heads": 2,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "decoder_intermediate_size": 32,
    "encoder_intermediate_size": 48,
    "stm_size": 16,
    "max_position_embeddings": 48,
}
# rows per optimizer step in the shrunk run: stage -> batch settings
TINY_BATCHES = {
    "joint-lm-pretraining": {"per_device_train_batch_size": 8},
    "joint-sft": {"per_device_train_batch_size": 8},
    "memory-attention": {"per_device_train_batch_size": 4},
    "smat": {"per_device_train_batch_size": 6},
}


def tiny_overrides(sources: dict[str, str], recipe) -> list[str]:
    """--set arguments: local data in the Hub layout, a shrunk model, small batches and lengths, CPU."""
    sets = [f"data.source={sources['TinyStories']}", "tokenizer.vocab_size=400", "tokenizer.num_texts=1000"]
    sets += [f"model.overrides.{key}={value}" for key, value in TINY_MODEL.items()]
    for stage in recipe.stages:
        source = stage.data.get("source")
        if source == "ReactiveAI/TinyStories-Plus-Interaction-SFT":
            sets.append(f"stages.{stage.name}.data.source={sources['SFT']}")
        elif source == "ReactiveAI/TinyStories-MRL":
            sets.append(f"stages.{stage.name}.data.source={sources['MRL']}")
        prefix = f"stages.{stage.name}.config"
        if stage.trainer == "mrl":
            sets += [f"{prefix}.per_device_train_batch_size=4", f"{prefix}.num_generations=2",
                     f"{prefix}.max_completion_length=6", f"{prefix}.max_interaction_length=48",
                     f"{prefix}.use_cpu=true", f"{prefix}.disable_tqdm=true"]
        else:
            sets += [f"{prefix}.{key}={value}" for key, value in TINY_BATCHES[stage.name].items()]
            sets += [f"{prefix}.max_length=48", f"{prefix}.disable_tqdm=true", f"{prefix}.report_to=none"]
    sets += [f"evaluation.data.source={sources['MRL']}", "evaluation.num_conversations=2",
             "evaluation.max_new_tokens=4", "evaluation.batch_size=2"]
    return sets


def test_alpha_micro_recipe_is_the_cards_curriculum():
    recipe = load_recipe(ALPHA_MICRO)  # parses, and every stage's trainer config builds
    assert [(s.name, s.trainer) for s in recipe.stages] == [
        ("joint-lm-pretraining", "joint-lm"), ("joint-sft", "joint-lm"), ("memory-attention", "memory-attention"),
        ("smat", "smat"), ("mrl-2", "mrl"), ("mrl-4", "mrl"), ("mrl-6", "mrl"), ("mrl-8", "mrl"), ("mrl-8-lr", "mrl"),
    ]
    data = {s.name: recipe.stage_data(s) for s in recipe.stages}
    assert data["joint-lm-pretraining"]["source"] == "roneneldan/TinyStories"
    assert data["joint-sft"]["source"] == "ReactiveAI/TinyStories-Plus-Interaction-SFT"
    for name in ("memory-attention", "smat"):  # the card: TinyStories-MRL, steps-6 subset, supervised split
        assert {k: data[name][k] for k in ("source", "subset", "train_split")} == {
            "source": "ReactiveAI/TinyStories-MRL", "subset": "steps-6", "train_split": "supervised"}
    assert [data[f"mrl-{n}"]["subset"] for n in ("2", "4", "6", "8", "8-lr")] == [
        "steps-2", "steps-4", "steps-6", "steps-8", "steps-8-lr"]
    for stage in recipe.stages[4:]:  # episode length = the subset's number of follow-up interactions
        config = stage.build_config(output_dir="unused")
        assert config.curriculum_steps == [int(data[stage.name]["subset"].split("-")[1])]
        assert config.curriculum_strategies == (["long-range"] if stage.name.endswith("-lr") else ["cumulative"])
        assert config.max_interaction_length == 256 and config.beta == 0.0
    # stage 3 as the card states it: one epoch, label weights 0.9 then 0.5 - 5% per step, up to 15% random, noise
    memory = recipe.stage("memory-attention")
    config = memory.build_config(output_dir="unused")
    assert memory.epochs == 1
    assert (config.first_step_new_data_weight, config.step_decay_start, config.step_decay, config.weight_jitter) == (
        0.9, 0.5, 0.05, 0.15)
    assert config.input_noise_std > 0 and config.label_noise_std > 0 and config.max_length == 256
    assert memory.steps_for_epochs(13890) == math.ceil(13890 / config.per_device_train_batch_size)
    # stage 4: gradual unfreezing, decoder -> + memory attention -> + encoder, one epoch each
    smat = recipe.stage("smat")
    schedule = smat.build_config(output_dir="unused").freeze_schedule
    assert smat.epochs == 3 and schedule["decoder"] == 0 < schedule["memory_attention"] < schedule["encoder"] < 1
    # the card's architecture: the preset at full size, 256-token interactions, STM 6 x 256 x 128
    assert recipe.model == {"preset": "rxt-alpha-micro"} and recipe.tokenizer["vocab_size"] == 7500
    model = RxTForCausalLM(RxTConfig.from_preset("rxt-alpha-micro", vocab_size=7500))
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_query_heads, c.num_key_value_heads) == (
        128, 6, 8, 4, 4)
    assert (c.decoder_feed_forward, c.num_experts, c.num_experts_per_token, c.decoder_intermediate_size) == (
        "moe", 12, 2, 256)
    assert (c.encoder_intermediate_size, c.memory_attention_variant, c.residual_gate_type) == (
        384, "interlayer", "linear")
    assert (c.residual_gate_granularity, c.max_position_embeddings, c.stm_size) == ("slot", 256, 256)
    assert list(model.init_memory(1).shape) == [1, 6, 256, 128]
    assert 11e6 < model.num_parameters() < 13e6  # the card: ~12M
    assert recipe.evaluation_data()["subset"] == "steps-8" and recipe.evaluation["split"] == "validation"


def test_alpha_micro_recipe_runs_every_stage_on_local_hub_layout_data(tmp_path):
    sources = hub_layout_data(tmp_path / "data")
    out = tmp_path / "out"
    overrides = tiny_overrides(sources, load_recipe(ALPHA_MICRO))
    argv = ["train", ALPHA_MICRO, "--output", str(out)]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0

    recipe = load_recipe(ALPHA_MICRO, overrides)
    folders = [f"{i + 1:02d}-{s.name}" for i, s in enumerate(recipe.stages)]
    for folder in ["tokenizer", *folders, "final"]:
        assert (out / folder).is_dir(), folder
    final = RxTForCausalLM.from_pretrained(out / "final")
    assert (final.config.memory_attention_variant, final.config.decoder_feed_forward) == ("interlayer", "moe")
    assert final.config.hidden_size == 32 and final.config.vocab_size <= 400

    # stage lengths come from the recipe's epochs and the split each stage trains on
    history = json.loads((out / "final" / "rxt_training_history.json").read_text())
    steps = [entry["steps"] for entry in history]
    expected = [
        math.ceil(16 / 8),      # stage 1: 1 epoch of the 16 TinyStories train rows, batch 8
        2 * math.ceil(8 / 8),   # stage 2: 2 epochs of 8 SFT train rows
        math.ceil(6 / 4),       # stage 3: 1 epoch of steps-6's *supervised* split (6 rows; train has 4)
        math.ceil(3 * 6 / 6),   # stage 4: 3 epochs of the supervised split, batch 6
        *[math.ceil(4 / 2)] * 5,  # MRL: 1 epoch of 4 train conversations, 4 rollouts = 2 conversations per step
    ]
    assert steps == expected
    mrl = [entry["config"] for entry in history[4:]]  # the MRL curriculum: one stage per subset
    assert [(c["curriculum_steps"], c["curriculum_strategies"]) for c in mrl] == [
        ([2], ["cumulative"]), ([4], ["cumulative"]), ([6], ["cumulative"]), ([8], ["cumulative"]),
        ([8], ["long-range"])]
    # the final evaluation read the held-out TinyStories-MRL split: perplexity with memory and without
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_conversations"] == 2 and evaluation["num_turns"] == 2 * 9
    assert evaluation["answer_perplexity"] > 0 and evaluation["answer_perplexity_no_memory"] > 0


def test_alpha_micro_recipe_names_a_missing_split_before_training(tmp_path):
    sources = hub_layout_data(tmp_path / "data")
    overrides = tiny_overrides(sources, load_recipe(ALPHA_MICRO)) + ["stages.smat.data.train_split=supervisd"]
    argv = ["train", ALPHA_MICRO, "--output", str(tmp_path / "out")]
    for item in overrides:
        argv += ["--set", item]
    with pytest.raises(ValueError, match=r"stages\[smat\].data: data.train_split='supervisd' is not a split"):
        main(argv)
    assert not any((tmp_path / "out").glob("01-*"))


FINETUNE = "recipes/finetune-converted.yaml"


def saved_checkpoint(folder):
    """A folder as `rxt convert` writes one: RxTForCausalLM.save_pretrained + its tokenizer (here rxt-tiny)."""
    from rxt_hf.modeling_rxt import build_tokenizer, special_token_ids

    tokenizer = build_tokenizer(tiny_corpus(240), vocab_size=400, model_max_length=48)
    config = RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer), max_position_embeddings=48,
                                   **special_token_ids(tokenizer))
    torch.manual_seed(3)
    model = RxTForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_finetune_recipe_is_valid():
    recipe = load_recipe(FINETUNE)
    assert [(s.name, s.trainer) for s in recipe.stages] == [("smat", "smat"), ("mrl", "mrl")]
    assert recipe.model == {"from_pretrained": "converted/rxt-alpha-micro"}
    assert recipe.tokenizer == {"path": "converted/rxt-alpha-micro"}
    assert recipe.evaluation["split"] == recipe.data["eval_split"] == "validation"


def test_finetune_recipe_trains_a_saved_checkpoint_on_local_conversations(tmp_path):
    checkpoint = tmp_path / "converted"
    start, tokenizer = saved_checkpoint(checkpoint)
    write_jsonl(tmp_path / "conversations" / "train.jsonl", [conversation(i, 4, "train") for i in range(4)])
    write_jsonl(tmp_path / "conversations" / "validation.jsonl", [conversation(i, 3, "validation") for i in range(2)])
    out = tmp_path / "out"
    sets = [
        f"model.from_pretrained={checkpoint}", f"tokenizer.path={checkpoint}",
        f"data.source={tmp_path / 'conversations'}",
        "stages.smat.config.per_device_train_batch_size=2", "stages.smat.config.max_length=48",
        "stages.smat.config.disable_tqdm=true", "stages.smat.config.report_to=none",
        "stages.mrl.config.per_device_train_batch_size=4", "stages.mrl.config.num_generations=2",
        "stages.mrl.config.max_completion_length=6", "stages.mrl.config.max_interaction_length=48",
        "stages.mrl.config.use_cpu=true", "stages.mrl.config.disable_tqdm=true",
        "evaluation.num_conversations=2", "evaluation.max_new_tokens=4", "evaluation.batch_size=2",
    ]
    argv = ["train", FINETUNE, "--output", str(out)]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    for folder in ("01-smat", "02-mrl", "final"):
        assert (out / folder / "config.json").is_file(), folder
    history = json.loads((out / "final" / "rxt_training_history.json").read_text())
    assert [(e["stage"], e["steps"]) for e in history] == [("smat", 2 * math.ceil(4 / 2)), ("mrl", math.ceil(4 / 2))]
    final = RxTForCausalLM.from_pretrained(out / "final")
    # it started from the checkpoint: the embedding, frozen in both stages, is exactly the saved one ...
    assert torch.equal(final.get_input_embeddings().weight, start.get_input_embeddings().weight)
    # ... and the trained components moved away from it
    for component in ("decoder", "memory_attention", "encoder"):
        before = dict(getattr(start.model, component).named_parameters())
        after = dict(getattr(final.model, component).named_parameters())
        assert any(not torch.equal(after[name], value) for name, value in before.items()), component
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "final").get_vocab() == tokenizer.get_vocab()
    evaluation = json.loads((out / "evaluation.json").read_text())  # on the validation split, 2 conversations x 4 turns
    assert evaluation["num_conversations"] == 2 and evaluation["num_turns"] == 8
