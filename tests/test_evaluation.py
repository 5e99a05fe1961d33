"""Memory evaluation (`rxt eval`): batching, control, oracle and the report table. CPU, seconds."""

import json
import math

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.tokenization_rxt import encode_interaction, special_token_ids
from rxt_hf.trainers.evaluation import evaluate_memory, format_evaluation_table, keywords_match
from rxt_hf.trainers.synthetic_data import build_synthetic_dataset

NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster and does not fight over the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conversations():
    data = build_synthetic_dataset("multi-turn", num_conversations=12, num_turns=(3, 6), max_recall_distance=3, seed=3)
    rows = data["train"].select(range(6))
    assert sum(d > 0 for row in rows for d in row["recall_distance"]) > 0
    return rows


def scripted_generation(tokenizer, answers: dict):
    """A `generate_fn` that answers each prompt (token ids without padding) with `answers[prompt]`."""
    ids = special_token_ids(tokenizer)

    def generate(model, input_ids, attention_mask, stm_state, max_new_tokens, eos_token_id, pad_token_id):
        out = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            answer = answers[tuple(t for t, m in zip(row, mask) if m)]
            out.append(row + tokenizer(answer, add_special_tokens=False)["input_ids"] + [ids["eos_token_id"]])
        width = max(len(o) for o in out)
        return torch.tensor([o + [ids["pad_token_id"]] * (width - len(o)) for o in out])

    return generate


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    config = RxTConfig.from_preset(
        "rxt-tiny", vocab_size=len(tiny_tokenizer), max_position_embeddings=160, **special_token_ids(tiny_tokenizer)
    )
    torch.manual_seed(0)
    return RxTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batched(model, tiny_tokenizer, conversations):
    return evaluate_memory(
        model, tiny_tokenizer, conversations, max_new_tokens=NEW_TOKENS, batch_size=4, progress=False, return_turns=True
    )


def test_result_keys_types_and_json(batched, conversations):
    r = batched
    assert r["num_conversations"] == 6
    assert r["num_turns"] == sum(1 + len(row["interactions"]) for row in conversations)
    for key in ("answer_perplexity", "answer_perplexity_no_memory", "answer_loss", "answer_loss_no_memory"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert math.isclose(r["answer_perplexity"], math.exp(r["answer_loss"]))
    for key in ("recall_accuracy", "recall_accuracy_no_memory", "recall_count"):
        assert isinstance(r[key], dict) and all(isinstance(d, int) and d >= 1 for d in r[key])
    for d, acc in r["recall_accuracy"].items():
        assert 0.0 <= acc <= 1.0 and 0.0 <= r["recall_accuracy_no_memory"][d] <= 1.0
    assert 0.0 <= r["recall_accuracy_overall"] <= 1.0
    assert r["examples"] and {"query", "reference", "generated"} <= set(r["examples"][0])
    assert r["examples"][0]["recall_distance"] > 0  # recall turns are shown first
    assert r["max_new_tokens"] == NEW_TOKENS and r["memory_from"] == "generated"
    json.dumps(r)


def test_distances_counted_from_the_data(batched, conversations):
    expected = {}
    for row in conversations:
        for d in row["recall_distance"]:
            if d > 0:
                expected[d] = expected.get(d, 0) + 1
    assert batched["recall_count"] == expected
    assert batched["recall_count_overall"] == sum(expected.values())
    assert batched["max_recall_distance"] == max(expected)
    overall = sum(batched["recall_accuracy"][d] * n for d, n in expected.items()) / sum(expected.values())
    assert batched["recall_accuracy_overall"] == pytest.approx(overall)


def test_batched_equals_one_conversation_at_a_time(model, tiny_tokenizer, conversations, batched):
    alone = evaluate_memory(
        model, tiny_tokenizer, conversations, max_new_tokens=NEW_TOKENS, batch_size=1, progress=False, return_turns=True
    )
    assert [t["generated"] for t in alone["turns"]] == [t["generated"] for t in batched["turns"]]
    assert [t["generated_no_memory"] for t in alone["turns"]] == [t["generated_no_memory"] for t in batched["turns"]]
    assert alone["recall_accuracy"] == batched["recall_accuracy"]
    assert alone["recall_accuracy_no_memory"] == batched["recall_accuracy_no_memory"]
    assert alone["answer_perplexity"] == pytest.approx(batched["answer_perplexity"], abs=1e-4)
    assert alone["answer_perplexity_no_memory"] == pytest.approx(batched["answer_perplexity_no_memory"], abs=1e-4)


def test_memory_matters_and_the_control_never_reads_updated_memory(model, tiny_tokenizer, conversations, monkeypatch):
    kwargs = dict(max_new_tokens=NEW_TOKENS, batch_size=3, progress=False, return_turns=True, max_conversations=3)
    clean = evaluate_memory(model, tiny_tokenizer, conversations, **kwargs)

    calls = []
    real_update = model.update_memory

    def sabotaged_update(stm, input_ids, attention_mask=None):
        new = real_update(stm, input_ids, attention_mask)
        calls.append(input_ids.shape[0])
        return new + 3.0 * torch.randn(new.shape, generator=torch.Generator().manual_seed(len(calls)))

    monkeypatch.setattr(model, "update_memory", sabotaged_update)
    broken = evaluate_memory(model, tiny_tokenizer, conversations, **kwargs)
    # one update per conversation per turn: the memory run only (the control does not write memory)
    assert sum(calls) == clean["num_turns"]
    assert broken["answer_perplexity_no_memory"] == pytest.approx(clean["answer_perplexity_no_memory"], abs=1e-5)
    assert [t["generated_no_memory"] for t in broken["turns"]] == [t["generated_no_memory"] for t in clean["turns"]]
    assert abs(broken["answer_perplexity"] - clean["answer_perplexity"]) > 1e-3
    # the first turn of every conversation reads a fresh memory in both runs
    first = [t for t in clean["turns"] if t["turn"] == 0]
    assert all(t["answer_loss"] == pytest.approx(t["answer_loss_no_memory"], abs=1e-5) for t in first)


def test_memory_from_reference_writes_reference_answers(model, tiny_tokenizer, conversations, monkeypatch):
    written = []
    real_update = model.update_memory

    def spy(stm, input_ids, attention_mask=None):
        assert not model.training and not torch.is_grad_enabled()
        written.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return real_update(stm, input_ids, attention_mask)

    monkeypatch.setattr(model, "update_memory", spy)
    row = conversations[0]
    model.train()
    try:
        result = evaluate_memory(
            model, tiny_tokenizer, [row], max_new_tokens=NEW_TOKENS, memory_from="reference", progress=False
        )
        assert model.training  # training mode restored
    finally:
        model.eval()
    turns = [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row["interactions"]]
    assert written == [encode_interaction(tiny_tokenizer, q, a) for q, a in turns]
    assert result["memory_from"] == "reference"


def test_oracle_generation_scores_full_recall(model, tiny_tokenizer, conversations):
    answers = {}
    for row in conversations:
        for q, a in [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row["interactions"]]:
            answers.setdefault(tuple(encode_interaction(tiny_tokenizer, q)), set()).add(a)
    # recall queries are unambiguous (checked below)
    oracle = scripted_generation(tiny_tokenizer, {prompt: sorted(texts)[0] for prompt, texts in answers.items()})

    # only conversations whose recall queries are unambiguous
    rows = [
        r for r in conversations
        if all(len(answers[tuple(encode_interaction(tiny_tokenizer, t["query"]))]) == 1 for t in r["interactions"])
    ]
    assert rows
    result = evaluate_memory(model, tiny_tokenizer, rows, max_new_tokens=NEW_TOKENS, progress=False, generate_fn=oracle)
    assert result["recall_count_overall"] > 0
    assert result["recall_accuracy_overall"] == 1.0
    assert all(acc == 1.0 for acc in result["recall_accuracy"].values())


def test_recall_split_by_fact_kind_and_same_kind_rival(model, tiny_tokenizer):
    """Two gifts then a painted door: the gift question has a rival (the other gift), the colour question none."""
    row = {
        "query": "Anna gave me a red cup.", "answer": "Okay.",
        "interactions": [
            {"query": "Bob gave me a blue hat.", "answer": "Okay."},
            {"query": "I painted the door green.", "answer": "Okay."},
            {"query": "What did Anna give me?", "answer": "Anna gave you a red cup."},
            {"query": "What colour is the door?", "answer": "The door is green."},
        ],
        "recall_distance": [0, 0, 3, 2],
        "answer_keywords": [[], [], ["red", "cup"], ["green"]],
        "fact_keys": ["gift:Anna", "gift:Bob", "paint:door", "gift:Anna", "paint:door"],
        "conversation_id": "two-gifts",
    }
    # the gift question gets the rival's value, every other turn its reference
    answers = {tuple(encode_interaction(tiny_tokenizer, t["query"])): t["answer"] for t in row["interactions"]}
    answers[tuple(encode_interaction(tiny_tokenizer, "What did Anna give me?"))] = "Bob gave you a blue hat."
    answers[tuple(encode_interaction(tiny_tokenizer, row["query"]))] = "Okay."
    scripted = scripted_generation(tiny_tokenizer, answers)

    result = evaluate_memory(model, tiny_tokenizer, [row], max_new_tokens=12, progress=False, generate_fn=scripted)
    assert result["recall_by_same_kind_rival"] == {
        "with_rival": {"accuracy": 0.0, "count": 1}, "without_rival": {"accuracy": 1.0, "count": 1}
    }
    assert result["recall_by_fact_kind"] == {"gift": {"accuracy": 0.0, "count": 1}, "paint": {"accuracy": 1.0, "count": 1}}
    table = format_evaluation_table(json.loads(json.dumps(result)))
    assert "another fact of the asked kind came before the question: 0.0% (1 questions); when none did: 100.0% (1)" in table
    assert "Recall by fact kind: gift 0.0% (1), paint 100.0% (1)." in table

    without = {k: v for k, v in row.items() if k != "fact_keys"}  # the public data sets: no split, no error
    plain = evaluate_memory(model, tiny_tokenizer, [without], max_new_tokens=12, progress=False, generate_fn=scripted)
    assert "recall_by_same_kind_rival" not in plain and "recall_by_fact_kind" not in plain
    assert plain["recall_accuracy_overall"] == result["recall_accuracy_overall"] == 0.5

    with pytest.raises(ValueError, match="fact_keys has 4 entries .* one entry per turn"):
        evaluate_memory(model, tiny_tokenizer, [dict(row, fact_keys=row["fact_keys"][1:])], progress=False)


def test_synthetic_rows_split_recall_by_rival(batched):
    """The embedded data carries fact_keys: every recall question lands in one group of each split."""
    total = batched["recall_count_overall"]
    assert sum(g["count"] for g in batched["recall_by_same_kind_rival"].values()) == total
    assert sum(g["count"] for g in batched["recall_by_fact_kind"].values()) == total
    assert set(batched["recall_by_fact_kind"]) <= {"put", "lives", "called", "gift", "paint", "count"}


def test_bad_arguments_raise(model, tiny_tokenizer, conversations):
    with pytest.raises(ValueError, match="memory_from"):
        evaluate_memory(model, tiny_tokenizer, conversations, memory_from="oracle", progress=False)
    with pytest.raises(TypeError, match="dataset\\['test'\\]"):
        evaluate_memory(model, tiny_tokenizer, {"test": conversations}, progress=False)


def test_keywords_match_whole_words_case_insensitive():
    assert keywords_match("Your captain is called Jadric.", ["jadric"])
    assert keywords_match("It is in the old mill.", ["old", "mill"])
    assert not keywords_match("It is in the old mill.", ["old", "barn"])
    assert not keywords_match("Jadrics are here", ["Jadric"])
    assert not keywords_match("anything", [])


def test_format_evaluation_table_shows_the_numbers(batched):
    fake = dict(batched)
    fake.update(
        recall_accuracy={1: 0.875, 3: 0.5},
        recall_accuracy_no_memory={1: 0.0625, 3: 0.0},
        recall_count={1: 16, 3: 8},
        recall_accuracy_overall=0.75,
        recall_accuracy_overall_no_memory=0.041666,
        recall_count_overall=24,
        answer_perplexity=3.14159,
        answer_perplexity_no_memory=27.5,
    )
    for result in (fake, json.loads(json.dumps(fake))):  # int keys and JSON string keys
        table = format_evaluation_table(result)
        lines = table.splitlines()
        assert lines[0].startswith("| recall distance")
        assert "| 1 | 87.5% | 6.2% | 16 |" in lines
        assert "| 2 | n/a | n/a | 0 |" in lines
        assert "| 3 | 50.0% | 0.0% | 8 |" in lines
        assert "| overall | 75.0% | 4.2% | 24 |" in lines
        assert "3.14" in table and "27.50" in table
    assert "| overall |" in format_evaluation_table(batched)
