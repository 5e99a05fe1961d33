"""Run a recipe: data -> tokenizer -> each curriculum stage in order -> final model -> evaluation.

Folder layout under the recipe's `output_dir`:

```
tokenizer/                 the tokenizer (trained on the recipe's data unless the recipe names one)
01-joint-lm-pretraining/   one saved model per stage (model + tokenizer + model card + log.jsonl + checkpoint-N/)
...
final/                     the last stage's model, its card carrying the evaluation table
training_curves.png        every stage's loss (and reward) against the step, from the stages' log.jsonl
evaluation.json / .md      `rxt eval` of the final model on the held-out test split
evaluation.png             its recall by distance, with memory and without
evaluation-long-range.*    the same on longer conversations (only with `evaluation.long_range` in the recipe)
```

A stage starts from the previous stage's folder, so any stage can be (re)run alone once its
predecessor exists (`rxt train RECIPE --from-stage smat`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, build_tokenizer, special_token_ids
from rxt_hf.trainers.data import load_rxt_dataset
from rxt_hf.trainers.evaluation import evaluate_memory, format_evaluation_table

from .plots import plot_recall, plot_training_curves
from .recipe import Recipe, StageSpec

SYNTHETIC_KEYS = ("num_conversations", "num_turns", "max_recall_distance", "seed", "same_kind_prob")
PREFERENCE_FILE = "preference_evaluation.json"  # written by an rxrlhf stage: preference accuracy before / after


def log(message: str) -> None:
    print(f"[rxt {time.strftime('%H:%M:%S')}] {message}", flush=True)


def draw(plot, *args) -> None:
    """Save one of the run's PNGs (recipes/plots.py); a missing matplotlib costs the picture, not the run."""
    try:
        path = plot(*args)
    except ImportError as error:
        log(f"no PNG: {error}")
        return
    if path is not None:
        log(f"wrote {path}")


def is_synthetic(data: dict) -> bool:
    return data.get("source") in (None, "synthetic")


def load_stage_dataset(seed: int, data: dict, kind: str, num_turns=None, extra_splits=()):
    """The stage's DatasetDict (train / validation / test, or the source's own splits) from the embedded
    generator or a real source (a Hub data set, or a local file / folder in the same columns)."""
    if is_synthetic(data):
        synthetic = {key: data[key] for key in SYNTHETIC_KEYS if key in data}
        synthetic.setdefault("seed", seed)
        if num_turns is not None:
            synthetic["num_turns"] = num_turns
        return load_rxt_dataset("synthetic", kind, **synthetic)
    if num_turns is not None:
        raise ValueError(
            f"data.turn_datasets needs the synthetic source (it generates one data set per turn count); with "
            f"source={data['source']!r} use the smat config's turn_curriculum alone (conversations are truncated)."
        )
    split_names = [data.get(key) for key in ("train_split", "eval_split") if data.get(key)] + list(extra_splits)
    return load_rxt_dataset(
        data["source"],
        kind,
        column_mapping=data.get("column_mapping"),
        subset=data.get("subset"),
        split_names=split_names,
    )


def describe_source(data: dict) -> str:
    subset = f" (subset {data['subset']!r})" if data.get("subset") else ""
    return f"source={data.get('source', 'synthetic')!r}{subset}"


def pick_split(dataset, data: dict, name: str | None, where: str, optional: bool = False):
    """Split `name` of a DatasetDict (None for name None, or for a missing optional split)."""
    if name is None:
        return None
    if name in dataset:
        return dataset[name]
    if optional:
        return None
    raise ValueError(
        f"{where}={name!r} is not a split of {describe_source(data)}; its splits are {list(dataset)}. "
        f"Fix: set {where} to one of them."
    )


def stage_splits(dataset, data: dict):
    """(train, evaluation) splits of a stage: `data.train_split` (default train) and `data.eval_split` (default
    validation when the data set has one; null for none)."""
    train = pick_split(dataset, data, data.get("train_split", "train"), "data.train_split")
    evaluation = pick_split(
        dataset, data, data.get("eval_split", "validation"), "data.eval_split", optional="eval_split" not in data
    )
    return train, evaluation


def check_data(recipe: Recipe, stages: list[StageSpec], evaluate: bool = False) -> None:
    """Load every non-synthetic stage data set (and the evaluation data) once before training, so a missing
    column or split fails first."""
    for stage in stages:
        data = recipe.stage_data(stage)
        if not is_synthetic(data):
            try:
                stage_splits(load_stage_dataset(recipe.seed, data, stage.data_kind), data)
            except ValueError as error:
                raise ValueError(f"recipe stages[{stage.name}].data: {error}") from error
    data = recipe.evaluation_data()
    if evaluate and not is_synthetic(data):
        split = recipe.evaluation.get("split", "test")
        try:
            dataset = load_stage_dataset(recipe.seed, data, "multi-turn", extra_splits=[split])
            pick_split(dataset, data, split, "evaluation.split")
        except ValueError as error:
            raise ValueError(f"recipe evaluation: {error}") from error


def prepare_tokenizer(recipe: Recipe, output_dir: Path):
    folder = output_dir / "tokenizer"
    if recipe.tokenizer.get("path"):
        return AutoTokenizer.from_pretrained(recipe.tokenizer["path"])
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    dataset = stage_splits(load_stage_dataset(recipe.seed, recipe.data, "pretraining"), recipe.data)[0]
    texts = dataset.select(range(min(len(dataset), recipe.tokenizer.get("num_texts", len(dataset)))))["text"]
    log(f"training a byte-level BPE tokenizer (vocab {recipe.tokenizer.get('vocab_size', 8000)}) on {len(texts)} texts")
    max_length = recipe.model.get("overrides", {}).get("max_position_embeddings", 256)
    tokenizer = build_tokenizer(
        texts,
        vocab_size=recipe.tokenizer.get("vocab_size", 8000),
        min_frequency=recipe.tokenizer.get("min_frequency", 2),
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(recipe: Recipe, tokenizer) -> RxTForCausalLM:
    if recipe.model.get("from_pretrained"):
        return RxTForCausalLM.from_pretrained(recipe.model["from_pretrained"])
    overrides = {**recipe.model.get("overrides", {}), **special_token_ids(tokenizer), "vocab_size": len(tokenizer)}
    config = RxTConfig.from_preset(recipe.model["preset"], **overrides)
    torch.manual_seed(recipe.seed)
    return RxTForCausalLM(config)


def stage_folder(output_dir: Path, recipe: Recipe, stage: StageSpec) -> Path:
    return output_dir / f"{recipe.stages.index(stage) + 1:02d}-{stage.name}"


def stage_args(recipe: Recipe, stage: StageSpec, folder: Path, num_rows: int | None):
    """The stage's trainer config; with `epochs`, max_steps covers that many passes over `num_rows` rows."""
    extra = {"seed": recipe.seed}
    if stage.epochs is not None:
        extra["max_steps"] = stage.steps_for_epochs(num_rows)
        log(f"stage {stage.name}: {stage.epochs:g} epoch(s) of {num_rows} training rows = {extra['max_steps']} steps")
    return stage.build_config(output_dir=str(folder), **extra)


def stage_datasets(seed: int, stage: StageSpec, data: dict):
    """(train, evaluation, held_out) of a stage. `train` is a dict {num_turns: split} with `data.turn_datasets`.
    `held_out` (preference data only: the test split, else validation) is scored before and after the stage."""
    if stage.data_kind == "preference":
        split = load_stage_dataset(seed, data, "preference")
        train, validation = stage_splits(split, data)
        return train, validation, split.get("test") or validation
    turn_counts = data.get("turn_datasets")
    if turn_counts:
        splits = {n: load_stage_dataset(seed, data, stage.data_kind, num_turns=n) for n in turn_counts}
        return {n: split["train"] for n, split in splits.items()}, splits[max(turn_counts)]["validation"], None
    train, evaluation = stage_splits(load_stage_dataset(seed, data, stage.data_kind), data)
    return train, evaluation, None


def run_stage(recipe: Recipe, stage: StageSpec, model, tokenizer, output_dir: Path, resume: bool) -> Path:
    """Train one stage from `model` and save its model folder. Every stage trainer is a `transformers.Trainer`
    (with the RxT stage mixin): built from (model, args, train / eval data, processing_class), resumed from the
    newest `checkpoint-N` of the stage folder with `--resume`, saved with `save_rxt_model`."""
    folder = stage_folder(output_dir, recipe, stage)
    data = recipe.stage_data(stage)
    train, evaluation, held_out = stage_datasets(recipe.seed, stage, data)
    args = stage_args(recipe, stage, folder, None if isinstance(train, dict) else len(train))
    if held_out is not None and args.eval_strategy == "no":
        evaluation = None  # the preference trainer would prepare an evaluation set it never uses
    log(f"stage {stage.name} ({stage.trainer}): {args.max_steps} steps -> {folder}")
    trainer = stage.trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=tokenizer)
    before = trainer.evaluate_preferences(held_out) if held_out is not None else None
    has_checkpoint = resume and folder.is_dir() and get_last_checkpoint(str(folder)) is not None
    metrics = trainer.train(resume_from_checkpoint=True if has_checkpoint else None).metrics
    log(f"stage {stage.name} done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    after = trainer.evaluate_preferences(held_out) if held_out is not None else None
    trainer.save_rxt_model(str(folder))
    if after is not None:
        report_preferences(stage, folder, len(held_out), before, after)
    return folder


def report_preferences(stage: StageSpec, folder: Path, count: int, before: dict | None, after: dict) -> None:
    """A preference stage's accuracy on the held-out conversations before and after it, written to
    `preference_evaluation.json` in the stage folder (the final evaluation adds it to the model card)."""
    from rxt_hf.trainers.rxrlhf_trainer import format_preference_table

    report = {"num_conversations": count, "before": before, "after": after}
    (folder / PREFERENCE_FILE).write_text(json.dumps(report, indent=2, default=str))
    log(f"stage {stage.name}: preference accuracy on {count} held-out conversations\n"
        + format_preference_table(before, after))


def select_stages(recipe: Recipe, stages: list[str] | None = None, from_stage: str | None = None) -> list[StageSpec]:
    """The stages to run: `stages` by name (optional ones too), else from `from_stage` on (that stage and the later
    main-job stages), else the main job (every stage not marked `optional`)."""
    if stages:
        return [recipe.stage(name) for name in stages]
    if from_stage is not None:
        start = recipe.stage(from_stage)
        return [stage for stage in recipe.stages[recipe.stages.index(start):] if not stage.optional or stage is start]
    return [stage for stage in recipe.stages if not stage.optional]


def run_recipe(
    recipe: Recipe,
    output_dir: str | None = None,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    resume: bool = False,
    evaluate: bool = True,
) -> dict:
    """Run the recipe's stages (the main job: every stage not marked `optional`; `stages` by name; or from
    `from_stage` on, that stage included) and evaluate the final model."""
    output_dir = Path(output_dir or recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    selected = select_stages(recipe, stages, from_stage)

    check_data(recipe, selected, evaluate)
    tokenizer = prepare_tokenizer(recipe, output_dir)
    first_index = recipe.stages.index(selected[0])
    if first_index == 0:
        model = build_model(recipe, tokenizer)
    else:
        previous = stage_folder(output_dir, recipe, recipe.stages[first_index - 1])
        if not (previous / "config.json").exists():
            raise ValueError(
                f"stage {selected[0].name!r} starts from the previous stage's model, but {previous} holds none: "
                f"run stage {recipe.stages[first_index - 1].name!r} first (or the whole recipe)."
            )
        log(f"loading {previous}")
        model = RxTForCausalLM.from_pretrained(previous)
    counts = model.num_parameters_by_component()
    log("parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))

    last_folder = None
    for stage in selected:
        last_folder = run_stage(recipe, stage, model, tokenizer, output_dir, resume)
        model = RxTForCausalLM.from_pretrained(last_folder)

    final = output_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(last_folder, final, ignore=shutil.ignore_patterns("checkpoints", "checkpoint-*", "runs", "*.jsonl"))
    result = {"output_dir": str(output_dir), "final_model": str(final), "train_minutes": (time.time() - started) / 60}
    draw(plot_training_curves, output_dir)
    if evaluate:
        result["evaluation"] = evaluate_recipe_model(recipe, final)
        long_range = recipe.long_range_evaluation_data()
        if long_range is not None:
            settings = {**recipe.evaluation, **{k: long_range[k] for k in ("num_turns", "seed") if k in long_range}}
            result["evaluation_long_range"] = evaluate_model(
                final, long_range, settings, recipe.seed, output_dir / "evaluation-long-range.json", model_card=False
            )
    result["total_minutes"] = (time.time() - started) / 60
    (output_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
    log(f"done in {result['total_minutes']:.1f} minutes; final model in {final}")
    rxt = Path(sys.argv[0]) if Path(sys.argv[0]).name == "rxt" else "rxt"
    log(f"chat with it: {rxt} chat {final}" + (f"    evaluation: {output_dir / 'evaluation.md'}" if evaluate else ""))
    return result


def evaluate_recipe_model(recipe: Recipe, folder: Path, output_json: Path | None = None) -> dict:
    """`rxt eval` with the recipe's evaluation data (`data` + `evaluation.data`) and settings."""
    return evaluate_model(folder, recipe.evaluation_data(), recipe.evaluation, recipe.seed, output_json)


def evaluate_model(
    folder: Path, data: dict | None = None, settings: dict | None = None, seed: int = 0, output_json: Path | None = None,
    model_card: bool = True,
) -> dict:
    """Evaluate a saved model on the held-out test split (embedded data by default); writes evaluation.json / .md /
    .png next to the model folder and (with `model_card`) puts the table into its model card."""
    from rxt_hf.trainers.model_card import write_model_card
    from rxt_hf.trainers.trainer_base import load_training_history

    folder, settings, data = Path(folder), dict(settings or {}), dict(data or {})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = RxTForCausalLM.from_pretrained(folder).eval()
    for key in ("num_turns", "seed"):
        if key in settings:
            data[key] = settings[key]
    data.setdefault("seed", seed)
    split = settings.get("split", "test")
    dataset = load_stage_dataset(seed, data, "multi-turn", extra_splits=[split])
    test = pick_split(dataset, data, split, "evaluation.split")
    count = min(len(test), settings.get("num_conversations") or len(test))
    log(f"evaluating {folder} on {count} test conversations")
    result = evaluate_memory(
        model,
        tokenizer,
        test,
        max_new_tokens=settings.get("max_new_tokens", 32),
        batch_size=settings.get("batch_size", 32),
        memory_from=settings.get("memory_from", "generated"),
        max_conversations=settings.get("num_conversations"),
    )
    table = format_evaluation_table(result)
    preference = folder / PREFERENCE_FILE
    if preference.is_file():  # the model's rxrlhf stage measured preference accuracy before / after
        from rxt_hf.trainers.rxrlhf_trainer import format_preference_table

        report = json.loads(preference.read_text())
        for when in ("before", "after"):
            for key in ("preference_accuracy", "logp_accuracy"):
                if (report.get(when) or {}).get(key) is not None:
                    result[f"{key}_{when}_rxrlhf"] = report[when][key]
        table += "\n\nPreference pairs (held-out), RxRLHF stage:\n\n" + format_preference_table(report.get("before"), report["after"])
    print(table, flush=True)
    output_json = Path(output_json) if output_json else folder.parent / "evaluation.json"
    output_json.write_text(json.dumps(result, indent=2, default=str))
    output_json.with_suffix(".md").write_text(table + "\n")
    draw(plot_recall, result, output_json.with_suffix(".png"))
    if model_card:
        history = load_training_history(folder)
        write_model_card(model, str(folder), history, result, data_description=describe_data(data, seed))
    return result


def describe_data(data: dict, seed: int) -> str:
    if is_synthetic(data):
        return (
            "The embedded synthetic story world of this project: multi-turn conversations that plant facts "
            f"(who / where / what / colour / how many) and ask for them 1-{data.get('max_recall_distance', 4)} turns "
            f"later; {data.get('num_conversations', 2000)} conversations per data set, seed {seed}."
        )
    subset = f", subset {data['subset']!r}" if data.get("subset") else ""
    return f"Data set {data['source']!r}{subset} (columns mapped with {data.get('column_mapping') or {}})."


__all__ = ["run_recipe", "evaluate_model", "evaluate_recipe_model", "load_stage_dataset"]
