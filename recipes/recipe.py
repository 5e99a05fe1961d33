"""Training recipes: one YAML file describes data, tokenizer, model and every curriculum stage.

```yaml
name: default
output_dir: outputs/default
seed: 0
data:                      # shared by all stages; a stage may override any key under its own `data:`
  source: synthetic        # embedded generator | local .jsonl/.parquet file or folder | Hub data set name
  subset: null             # Hub config name (load_dataset(source, subset)); for a local folder: its sub-folder
  train_split: train       # the split a stage trains on (e.g. `supervised` of ReactiveAI/TinyStories-MRL)
  eval_split: validation   # the split evaluated during a stage (null: none)
  column_mapping: {}       # rename columns of your data to text / query / answer / interactions
  num_conversations: 4000  # synthetic only
  num_turns: 6
  max_recall_distance: 4
  same_kind_prob: 0.0      # synthetic only: chance that a fact repeats a kind planted before (two gifts, two towns)
tokenizer: {vocab_size: 2000}          # or {path: folder-with-a-saved-tokenizer}
model: {preset: rxt-tiny, overrides: {hidden_size: 128}}   # or {from_pretrained: folder}
stages:
  - {name: joint-lm-pretraining, trainer: joint-lm, config: {mode: pretraining, max_steps: 300}}
  - {name: smat, trainer: smat, data: {turn_datasets: [2, 3, 4, 6]}, config: {...}}
  - {name: sft, trainer: joint-lm, epochs: 2, config: {mode: sft}}   # epochs: max_steps from the data size
evaluation: {num_conversations: 200, num_turns: 6, max_new_tokens: 24, data: {split...}, split: test,
             long_range: {num_turns: 10, max_recall_distance: 8}}   # optional second evaluation, longer conversations
```

`load_recipe` checks everything (unknown keys, stage trainers, config fields and their types) before
any training starts, and raises a `ValueError` naming the place, the value and the fix.
`load_recipe(path, overrides=["stages.smat.config.max_steps=10", ...])` (the command line's
`rxt train RECIPE --set KEY=VALUE`) changes values of the YAML file before that check.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

import importlib

# trainer name -> (module, config class, trainer class); imported on use (the MRL stage pulls in TRL)
STAGE_TRAINERS = {
    "joint-lm": ("rxt_hf.trainers.joint_lm_trainer", "JointLMConfig", "JointLMTrainer"),
    "memory-attention": ("rxt_hf.trainers.memory_attention_trainer", "MemoryAttentionConfig", "MemoryAttentionTrainer"),
    "smat": ("rxt_hf.trainers.smat_trainer", "SMATConfig", "SMATTrainer"),
    "mrl": ("rxt_hf.trainers.mrl_trainer", "MRLConfig", "MRLTrainer"),
    "rxrlhf": ("rxt_hf.trainers.rxrlhf_trainer", "RxRLHFConfig", "RxRLHFTrainer"),
}


def stage_classes(trainer: str) -> tuple[type, type]:
    module, config_name, trainer_name = STAGE_TRAINERS[trainer]
    module = importlib.import_module(module)
    return getattr(module, config_name), getattr(module, trainer_name)
DATA_KEYS = {
    "source",
    "column_mapping",
    "num_conversations",
    "num_turns",
    "max_recall_distance",
    "same_kind_prob",
    "seed",
    "turn_datasets",
    "split",
    "subset",
    "train_split",
    "eval_split",
}
TOP_LEVEL_KEYS = {"name", "output_dir", "seed", "data", "tokenizer", "model", "stages", "evaluation", "description"}
TOKENIZER_KEYS = {"vocab_size", "min_frequency", "path", "num_texts"}
MODEL_KEYS = {"preset", "overrides", "from_pretrained"}
EVALUATION_KEYS = {
    "num_conversations", "num_turns", "max_new_tokens", "batch_size", "memory_from", "split", "seed", "data",
    "long_range",
}
STAGE_KEYS = {"name", "trainer", "data", "config", "epochs", "optional"}


def recipe_error(where: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"recipe {where}={value!r} is invalid: {fix}")


@dataclass
class StageSpec:
    name: str
    trainer: str
    config: dict[str, Any]
    data: dict[str, Any]
    epochs: float | None = None  # passes over the training split; sets max_steps once the data is loaded
    optional: bool = False  # not in the main job: runs only when named (`--stages NAME` / `--from-stage NAME`)

    @property
    def config_class(self):
        return stage_classes(self.trainer)[0]

    @property
    def trainer_class(self):
        return stage_classes(self.trainer)[1]

    @property
    def data_kind(self) -> str:
        if self.trainer == "joint-lm":
            return "interaction-sft" if self.config.get("mode", "pretraining") == "sft" else "pretraining"
        if self.trainer == "rxrlhf":
            return "preference"
        return "multi-turn"

    def build_config(self, output_dir: str, **extra) -> Any:
        return self.config_class(**{**self.config, "output_dir": output_dir, **extra})

    def steps_for_epochs(self, num_rows: int) -> int:
        """``max_steps`` for ``epochs`` passes over ``num_rows`` training rows (conversations, texts...): rows per
        optimizer step are batch size x gradient accumulation (MRL: rollouts / ``num_generations``)."""
        config = self.build_config(output_dir="unused")
        rows = config.per_device_train_batch_size * config.gradient_accumulation_steps
        if self.trainer == "mrl":  # MRL's batch counts rollouts: num_generations per conversation
            rows /= config.num_generations
        return max(1, math.ceil(self.epochs * num_rows / rows))


@dataclass
class Recipe:
    name: str
    output_dir: str
    seed: int
    data: dict[str, Any]
    tokenizer: dict[str, Any]
    model: dict[str, Any]
    stages: list[StageSpec]
    evaluation: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"unknown stage {name!r}: this recipe has stages {[s.name for s in self.stages]}.")

    def stage_data(self, stage: StageSpec) -> dict[str, Any]:
        return {**self.data, **stage.data}

    def evaluation_data(self) -> dict[str, Any]:
        """The data the final evaluation reads: the recipe's ``data`` with ``evaluation.data`` on top."""
        return {**self.data, **(self.evaluation.get("data") or {})}

    def long_range_evaluation_data(self) -> dict[str, Any] | None:
        """The data of the second, long-range evaluation: `evaluation_data()` with `evaluation.long_range` on top
        (e.g. `{num_turns: 10, max_recall_distance: 8}`); None when the recipe has none."""
        long_range = self.evaluation.get("long_range")
        return None if long_range is None else {**self.evaluation_data(), **long_range}


def _check_keys(section: str, mapping: Any, allowed: set[str]) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise recipe_error(section, mapping, "it must be a mapping (key: value).")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise recipe_error(f"{section}.{unknown[0]}", mapping[unknown[0]], f"unknown key; allowed keys: {sorted(allowed)}.")
    return dict(mapping)


def _accepts(annotation, value) -> bool:
    """Whether `value` (from YAML) fits a dataclass field annotation (coarse: scalars, lists, dicts)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def check_stage_config(stage: StageSpec) -> None:
    """Every config key exists on the trainer's config class and has the right type; the config builds."""
    config_class = stage.config_class
    hints = typing.get_type_hints(config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    where = f"stages[{stage.name}].config"
    for key, value in stage.config.items():
        if key not in names:
            raise recipe_error(f"{where}.{key}", value, f"{config_class.__name__} has no such field; fields: {sorted(names)}.")
        if key == "output_dir":
            raise recipe_error(f"{where}.output_dir", value, "stage folders come from the recipe's output_dir.")
        if not _accepts(hints[key], value):
            raise recipe_error(f"{where}.{key}", value, f"expected {hints[key]}.")
    try:
        stage.build_config(output_dir="unused")
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe {where} is invalid: {error}") from error


def _check_data(section: str, mapping: Any) -> dict:
    """A `data:` mapping: known keys, and the source / subset / split selectors as strings."""
    if isinstance(mapping, dict) and "recall_weight" in mapping:
        raise recipe_error(f"{section}.recall_weight", mapping["recall_weight"],
                           "it is a smat config value now: move it to the stage's config (config.recall_weight).")
    data = _check_keys(section, mapping, DATA_KEYS)
    for key in ("source", "subset", "train_split", "eval_split"):
        if key not in data or (data[key] is None and key in ("subset", "eval_split")):
            continue
        if not isinstance(data[key], str) or not data[key]:
            nullable = " or null" if key in ("subset", "eval_split") else ""
            raise recipe_error(f"{section}.{key}", data[key], f"it must be a non-empty string{nullable}.")
    probability = data.get("same_kind_prob", 0.0)
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise recipe_error(f"{section}.same_kind_prob", probability, "it must be a probability between 0 and 1, e.g. 0.5.")
    return data


def _check_optional(name: str, entry: dict, earlier: list[StageSpec]) -> bool:
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        raise recipe_error(f"stages[{name}].optional", optional, "it must be true or false.")
    if not optional and any(stage.optional for stage in earlier):
        first = next(stage.name for stage in earlier if stage.optional)
        raise recipe_error(
            f"stages[{name}].optional", optional,
            f"optional stages come after every stage of the main job: move {name!r} before {first!r} or mark it "
            "optional too.",
        )
    return optional


def _check_epochs(name: str, entry: dict) -> float | None:
    epochs = entry.get("epochs")
    if epochs is None:
        return None
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs < math.inf:
        raise recipe_error(
            f"stages[{name}].epochs", epochs, "it must be a number > 0 (passes over the training split)."
        )
    steps = (entry.get("config") or {}).get("max_steps")
    if steps is not None:
        raise recipe_error(
            f"stages[{name}].config.max_steps",
            steps,
            f"epochs={epochs} sets the stage length already; keep one of the two.",
        )
    if (entry.get("data") or {}).get("turn_datasets") is not None:
        raise recipe_error(
            f"stages[{name}].epochs", epochs, "it cannot be combined with data.turn_datasets; give config.max_steps."
        )
    return float(epochs)


def parse_recipe(raw: dict, path: str | None = None) -> Recipe:
    raw = _check_keys("", raw, TOP_LEVEL_KEYS) if raw is not None else {}
    data = _check_data("data", raw.get("data"))
    tokenizer = _check_keys("tokenizer", raw.get("tokenizer"), TOKENIZER_KEYS)
    model = _check_keys("model", raw.get("model"), MODEL_KEYS)
    evaluation = _check_keys("evaluation", raw.get("evaluation"), EVALUATION_KEYS)
    if "data" in evaluation:
        evaluation["data"] = _check_data("evaluation.data", evaluation["data"])
    if evaluation.get("long_range") is not None:
        evaluation["long_range"] = _check_data("evaluation.long_range", evaluation["long_range"])
    if not model.get("preset") and not model.get("from_pretrained"):
        raise recipe_error("model", model, "give model.preset (e.g. rxt-alpha-micro) or model.from_pretrained (a folder).")
    if "path" not in tokenizer and not isinstance(tokenizer.get("vocab_size", 0), int):
        raise recipe_error("tokenizer.vocab_size", tokenizer.get("vocab_size"), "it must be an integer.")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise recipe_error("seed", seed, "it must be an integer.")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise recipe_error("stages", stages_raw, "give a non-empty list of stages.")
    stages, seen = [], set()
    for index, entry in enumerate(stages_raw):
        entry = _check_keys(f"stages[{index}]", entry, STAGE_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise recipe_error(f"stages[{index}].name", name, "each stage needs a unique non-empty name.")
        seen.add(name)
        trainer = entry.get("trainer")
        if trainer not in STAGE_TRAINERS:
            raise recipe_error(f"stages[{name}].trainer", trainer, f"choose one of {sorted(STAGE_TRAINERS)}.")
        stage = StageSpec(
            name=name,
            trainer=trainer,
            config=_check_keys(f"stages[{name}].config", entry.get("config"), set(entry.get("config") or {})),
            data=_check_data(f"stages[{name}].data", entry.get("data")),
            epochs=_check_epochs(name, entry),
            optional=_check_optional(name, entry, stages),
        )
        check_stage_config(stage)
        turns = stage.data.get("turn_datasets")
        if turns is not None and (trainer != "smat" or not all(isinstance(n, int) and n >= 1 for n in turns)):
            raise recipe_error(
                f"stages[{name}].data.turn_datasets", turns, "only smat stages take it: a list of turn counts >= 1."
            )
        stages.append(stage)
    return Recipe(
        name=str(raw.get("name", Path(path).stem if path else "recipe")),
        output_dir=str(raw.get("output_dir", "outputs/" + str(raw.get("name", "recipe")))),
        seed=seed,
        data=data,
        tokenizer=tokenizer,
        model=model,
        stages=stages,
        evaluation=evaluation,
        path=path,
    )


OVERRIDE_EXAMPLE = "stages.smat.config.max_steps=10"


def _parse_override(item: Any) -> tuple[str, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ValueError(f"override {item!r} is invalid: write KEY=VALUE with a dotted key, e.g. {OVERRIDE_EXAMPLE}.")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({error}); quote it.") from error
    return key.strip(), value


def _list_index(node: list, part: str, key: str) -> int:
    """The index of list element `part`: a number, or the `name` of a mapping element (stages)."""
    if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return int(part)
    for index, element in enumerate(node):
        if isinstance(element, dict) and element.get("name") == part:
            return index
    names = [e.get("name") for e in node if isinstance(e, dict)]
    raise ValueError(
        f"override {key!r}: no list element {part!r}; use an index below {len(node)} or a name from {names}."
    )


def _child(node: Any, part: str, key: str) -> Any:
    """The element `part` of a mapping (created empty when missing) or of a list."""
    if isinstance(node, list):
        node = node[_list_index(node, part, key)]
    elif isinstance(node, dict):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    if not isinstance(node, (dict, list)):
        raise ValueError(
            f"override {key!r}: {part!r} holds the {type(node).__name__} {node!r}, not a mapping with keys; "
            "shorten the key to set that value itself."
        )
    return node


def apply_overrides(raw: dict | None, overrides: Iterable[Any] | Mapping[str, Any] | None) -> dict:
    """A copy of the recipe mapping `raw` with each override applied in order.

    An override is ``"dotted.key=value"`` (the value is read as YAML: ``2``, ``0.5``, ``null``, ``[1, 2]``,
    ``{a: 1}``, a plain string) or a ``(dotted.key, value)`` pair; a mapping ``{dotted.key: value}`` works too.
    List elements (``stages``) are picked by index or by their ``name``: ``stages.smat.config.max_steps=10``,
    ``stages.0.data.source=data/stories.jsonl``. Missing mappings on the way are created; whether the result
    is a valid recipe is checked afterwards, as for the YAML file itself.
    """
    raw = copy.deepcopy(raw) if raw is not None else {}  # also un-shares YAML aliases (&anchor / *anchor)
    if not isinstance(raw, dict):
        raise recipe_error("", raw, "a recipe must be a mapping (key: value).")
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or [])
    for item in items:
        key, value = _parse_override(item)
        parts = key.split(".")
        if any(not part for part in parts):
            raise ValueError(f"override {key!r} has an empty key part; write it like {OVERRIDE_EXAMPLE}.")
        node: Any = raw
        for part in parts[:-1]:
            node = _child(node, part, key)
        last = parts[-1]
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            raise ValueError(f"override {key!r}: the parent of {last!r} is a {type(node).__name__}, not a mapping.")
    return raw


def load_recipe(path: str | Path, overrides: Iterable[Any] | Mapping[str, Any] | None = None) -> Recipe:
    """Read and validate a YAML recipe (nothing is trained or downloaded here), after applying `overrides`
    (see :func:`apply_overrides`; the command line's ``--set KEY=VALUE``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file {str(path)!r} does not exist; the default one is recipes/default.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"recipe file {str(path)!r} is not valid YAML: {error}") from error
    raw = apply_overrides(raw, overrides)  # a copy in any case: no mapping shared through YAML aliases
    return parse_recipe(raw, str(path))


__all__ = ["Recipe", "StageSpec", "STAGE_TRAINERS", "apply_overrides", "load_recipe", "parse_recipe"]
