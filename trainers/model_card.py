"""Model card (README.md) for a saved RxT model, filled from `model_cards/rxt_model_card.md` (Jinja2).

The card is built from facts only: the config (architecture), `num_parameters_by_component()` (parameter
table), the stage history written by the trainers (`rxt_training_history.json`: every stage with the
hyper-parameters it actually used), a data description and, when given, an evaluation dict.

Evaluation dict format (every key optional):

```python
{
    "recall_accuracy": {1: 0.82, 2: 0.71, ...},             # by distance, with memory
    "recall_accuracy_no_memory": {1: 0.03, 2: 0.02, ...},   # control: STM reset before every turn
    "perplexity": 3.1, "eval_loss": 1.2, ...                # any other scalars: listed in a table
}
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE_NAME = "rxt_model_card.md"


def _template_text() -> str:
    try:
        from importlib.resources import files

        return (files("model_cards") / TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME).read_text(encoding="utf-8")


def _attention_kind(heads: int, query: int, kv: int) -> str:
    if query == heads and kv == heads:
        return "MHA"
    if query == heads and kv == 1:
        return "MQA"
    if query == heads:
        return "GQA"
    if query == kv and query * 2 == heads:
        return "symmetric SQA"
    if query == kv and query * 4 <= heads:
        return "extreme SQA"
    return "SQA" + (" + GQA" if kv < query else "")


def _format_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _percent(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{100 * value:.1f}%" if value <= 1.0 else f"{value:.1f}%"


def _by_distance(mapping: Any) -> dict[int, Any]:
    if not isinstance(mapping, dict):
        return {}
    out = {}
    for key, value in mapping.items():
        try:
            out[int(str(key).lstrip("d"))] = value
        except ValueError:
            continue
    return out


def _evaluation_rows(evaluation: dict | None):
    if not evaluation:
        return [], []
    memory = _by_distance(evaluation.get("recall_accuracy"))
    control = _by_distance(evaluation.get("recall_accuracy_no_memory"))
    recall_rows = [
        {"distance": d, "memory": _percent(memory.get(d)), "control": _percent(control.get(d))}
        for d in sorted(set(memory) | set(control))
    ]
    scalar_rows = [
        (key, _format_number(value))
        for key, value in evaluation.items()
        if key not in ("recall_accuracy", "recall_accuracy_no_memory") and isinstance(value, (int, float, str))
    ]
    return recall_rows, scalar_rows


def render_model_card(
    model,
    stage_history: list[dict] | None = None,
    evaluation: dict | None = None,
    data_description: str = "",
    model_path: str = "path/to/model",
    title: str | None = None,
) -> str:
    """The model card text (see `write_model_card`)."""
    import jinja2

    config = model.config
    attention = []
    names = {
        "self_attention": "self-attention (decoder causal, encoder bidirectional)",
        "memory_cross_attention": "memory cross-attention (decoder reads STM)",
        "memory_attention": "memory attention (STM queries encoded data)",
    }
    for role, (heads, query, kv) in config.attention_heads().items():
        attention.append(
            {
                "name": names[role],
                "heads": heads,
                "head_dim": config.hidden_size // heads,
                "query": query,
                "kv": kv,
                "kind": _attention_kind(heads, query, kv),
            }
        )
    if config.decoder_feed_forward == "moe":
        decoder_ff = (
            f"Mixture-of-Experts: {config.num_experts} SwiGLU experts (intermediate "
            f"{config.decoder_intermediate_size}), top-{config.num_experts_per_token} routing"
            + (f", {config.num_shared_experts} shared" if config.num_shared_experts else "")
            + f", aux loss coef {config.router_aux_loss_coef}"
        )
    else:
        decoder_ff = f"dense SwiGLU, intermediate {config.decoder_intermediate_size}"
    counts = model.num_parameters_by_component()
    parameters = [(name, _format_number(int(count))) for name, count in counts.items()]
    history = []
    for entry in stage_history or []:
        entry = dict(entry)
        entry["config_json"] = json.dumps(entry.get("config", {}), indent=2, sort_keys=True, default=str)
        for key in ("steps", "effective_batch_size", "tokens_seen", "train_runtime_s", "final_loss"):
            entry[key] = _format_number(entry.get(key))
        entry.setdefault("trainer", "")
        history.append(entry)
    recall_rows, scalar_rows = _evaluation_rows(evaluation)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    template = environment.from_string(_template_text())
    return template.render(
        title=title or f"RxT ({config.hidden_size}-dim, {config.num_hidden_layers} layers)",
        config=config,
        attention=attention,
        decoder_ff=decoder_ff,
        stm_shape=" x ".join(str(n) for n in config.stm_shape),
        parameters=parameters,
        history=history,
        stages=[entry.get("stage", "?") for entry in stage_history or []],
        total_steps=sum(int(entry.get("steps") or 0) for entry in stage_history or []),
        data_description=data_description or "Not described.",
        recall_rows=recall_rows,
        scalar_rows=scalar_rows,
        model_path=model_path,
    )


def write_model_card(
    model,
    output_dir: str,
    stage_history: list[dict],
    evaluation: dict | None,
    data_description: str,
) -> str:
    """Write `output_dir/README.md` for `model` (an `RxTForCausalLM`); returns the file path."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    text = render_model_card(
        model,
        stage_history=stage_history,
        evaluation=evaluation,
        data_description=data_description,
        model_path=str(output_dir),
    )
    file = path / "README.md"
    file.write_text(text, encoding="utf-8")
    return str(file)


__all__ = ["write_model_card", "render_model_card"]
