"""Tests of the embedded synthetic data (trainers/synthetic_data.py) and of loading and
collation (trainers/data.py). CPU, no network, small data."""

import re
from collections import Counter

import pytest
import torch

from rxt_hf.trainers.data import (
    ConversationCollator,
    InteractionCollator,
    TextCollator,
    load_rxt_dataset,
    tokenize_interaction,
)
from rxt_hf.trainers.synthetic_data import (
    FACT_KINDS,
    SyntheticWorld,
    build_synthetic_dataset,
    generate_conversations,
    vocabulary,
)

SPECIAL = ["[BOS]", "[EOS]", "[PAD]", "[UNK]", "[MASK]", "[Q]", "[A]", "[T]"]
BOS, EOS, PAD, Q, A = 0, 1, 2, 5, 6


def words(text):
    return set(re.findall(r"[A-Za-z0-9]+", text))


@pytest.fixture(scope="module")
def data_tokenizer():
    """A small byte-level BPE tokenizer with the RxT special tokens at ids 0..7, trained here
    (independent of modeling_rxt) on a little synthetic text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import trainers as tok_trainers
    from transformers import PreTrainedTokenizerFast

    texts = build_synthetic_dataset("pretraining", num_conversations=120, seed=0)["train"]["text"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, tok_trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
        unk_token="[UNK]", mask_token="[MASK]")
    assert [tokenizer.convert_tokens_to_ids(s) for s in SPECIAL] == list(range(8))
    return tokenizer


@pytest.fixture(scope="module")
def convs():
    return generate_conversations(300, num_turns=6, max_recall_distance=4, seed=0)


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- generator


def test_pool_sizes():
    w = SyntheticWorld(0)
    assert len(set(w.names)) >= 300
    assert len(set(w.places)) >= 150
    assert len(set(w.objects)) >= 150
    assert len(set(w.spots)) >= 150
    assert 15 <= len(set(w.colours)) <= 25
    assert w.numbers == list(range(2, 100))
    # pools are seed independent (shared vocabulary), and names never clash with other words
    assert SyntheticWorld(5).names == w.names
    other = {x.lower() for pool in (w.places, w.spots, w.objects, w.colours, w.roles,
                                    w.paintables, w.countables) for p in pool for x in p.split()}
    assert not {n.lower() for n in w.names} & other


def test_determinism():
    a = generate_conversations(20, num_turns=(2, 8), seed=3)
    b = generate_conversations(20, num_turns=(2, 8), seed=3)
    c = generate_conversations(20, num_turns=(2, 8), seed=4)
    assert a == b
    assert a != c
    assert generate_conversations(5, num_turns=(2, 8), seed=3) == a[:5]  # prefix-stable
    d1 = build_synthetic_dataset("multi-turn", num_conversations=40, seed=1)
    d2 = build_synthetic_dataset("multi-turn", num_conversations=40, seed=1)
    d3 = build_synthetic_dataset("multi-turn", num_conversations=40, seed=2)
    for split in ("train", "validation", "test"):
        assert d1[split].to_list() == d2[split].to_list()
    assert d1["train"].to_list() != d3["train"].to_list()


def test_conversation_structure(convs):
    for conv in convs:
        turns = conv["interactions"]
        assert len(turns) == 6
        assert turns[0]["recall_distance"] == 0
        assert any(t["recall_distance"] > 0 for t in turns)
        for t in turns:
            assert set(t) >= {"query", "answer", "recall_distance", "fact_key",
                              "answer_keywords"}
            assert isinstance(t["query"], str) and isinstance(t["answer"], str)
            if t["recall_distance"] == 0:
                assert t["answer_keywords"] == []
    ranged = generate_conversations(60, num_turns=(2, 8), seed=1)
    lengths = Counter(len(c["interactions"]) for c in ranged)
    assert min(lengths) >= 2 and max(lengths) <= 8 and len(lengths) >= 4
    # 2-turn conversations: always a plant then a recall at distance 1
    for conv in generate_conversations(30, num_turns=2, seed=2):
        assert [t["recall_distance"] for t in conv["interactions"]] == [0, 1]


def test_recall_keywords_planted_and_answered(convs):
    n_recalls = 0
    for conv in convs:
        turns = conv["interactions"]
        for i, t in enumerate(turns):
            d = t["recall_distance"]
            if d == 0:
                continue
            n_recalls += 1
            planted = turns[i - d]
            assert planted["fact_key"] == t["fact_key"]
            assert t["answer_keywords"]
            for kw in t["answer_keywords"]:
                assert kw in words(planted["query"]), (kw, planted["query"])
                assert kw in words(t["answer"]), (kw, t["answer"])
                assert kw not in words(t["query"]), (kw, t["query"])  # no leak in the question
                # the acknowledgement of the planting turn does not repeat the fact
                assert kw not in words(planted["answer"]), (kw, planted["answer"])
            # each fact is asked for once, no other turn plants the same key
            assert sum(x["fact_key"] == t["fact_key"] for x in turns) == 2
    assert n_recalls > 300


def test_acknowledgements_are_fact_free(convs):
    w = SyntheticWorld(0)
    entity_words = {x for pool in (w.names, w.places, w.spots, w.objects, w.colours, w.roles,
                                   w.paintables, w.countables) for p in pool for x in p.split()}
    entity_words |= {str(n) for n in w.numbers}
    acks = Counter()
    for conv in convs:
        for t in conv["interactions"]:
            if t.get("turn_type") == "plant":
                acks[t["answer"]] += 1
                assert not words(t["answer"]) & entity_words, t["answer"]
    assert 1 < len(acks) <= 10  # a handful of fixed sentences: no information about the fact


def test_distance_distribution_covers_range(convs):
    dist = Counter(t["recall_distance"] for c in convs for t in c["interactions"])
    for d in range(1, 5):
        assert dist[d] >= 30, dist
    assert max(dist) == 4
    short = generate_conversations(50, num_turns=8, max_recall_distance=2, seed=0)
    assert max(t["recall_distance"] for c in short for t in c["interactions"]) == 2


def test_vocabulary_is_modest():
    ds = build_synthetic_dataset("pretraining", num_conversations=600, seed=0)
    texts = [t for split in ds.values() for t in split["text"]]
    vocab = vocabulary(texts)
    assert 300 < len(vocab) < 3000


# ---------------------------------------------------------------------------------- data sets


def test_dataset_kinds_columns():
    pre = build_synthetic_dataset("pretraining", num_conversations=40)
    sft = build_synthetic_dataset("interaction-sft", num_conversations=40, num_turns=5)
    mt = build_synthetic_dataset("multi-turn", num_conversations=40, num_turns=5)
    for ds in (pre, sft, mt):
        assert set(ds) == {"train", "validation", "test"}
    assert pre["train"].column_names == ["text"]
    assert sft["train"].column_names == ["query", "answer"]
    assert sum(len(s) for s in sft.values()) == 40 * 5
    assert set(mt["train"].column_names) == {"query", "answer", "interactions",
                                            "recall_distance", "answer_keywords",
                                            "fact_keys", "conversation_id"}
    row = mt["train"][0]
    assert len(row["interactions"]) == 4
    assert set(row["interactions"][0]) == {"query", "answer"}
    assert len(row["recall_distance"]) == len(row["answer_keywords"]) == 4
    assert len(row["fact_keys"]) == 5  # one per turn, the first included
    for row in mt["train"]:
        keys = row["fact_keys"]
        for turn, d in enumerate(row["recall_distance"], start=1):
            if d > 0:  # a recall turn names the fact planted d turns before it
                assert keys[turn] and keys[turn] == keys[turn - d] and keys[turn].split(":")[0] in FACT_KINDS
    assert all(isinstance(t, str) for t in pre["train"]["text"])


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind") as err:
        build_synthetic_dataset("chat")
    assert "multi-turn" in str(err.value) and "'chat'" in str(err.value)
    with pytest.raises(ValueError, match="kind"):
        load_rxt_dataset(None, "chat")


def test_splits_share_no_conversation():
    ds = build_synthetic_dataset("multi-turn", num_conversations=100, seed=0)
    ids = {split: set(ds[split]["conversation_id"]) for split in ds}
    assert len(ids["train"]) == 90 and len(ids["validation"]) == 5 and len(ids["test"]) == 5
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    # the flat kinds are split by conversation too: test queries are those of test conversations
    convs = {c["conversation_id"]: c for c in generate_conversations(100, seed=0)}
    sft = build_synthetic_dataset("interaction-sft", num_conversations=100, seed=0)
    expected = [(t["query"], t["answer"]) for cid in sorted(ids["test"])
                for t in convs[cid]["interactions"]]
    assert list(zip(sft["test"]["query"], sft["test"]["answer"])) == expected


def _recalls_with_a_same_kind_rival(conversations):
    """How many recall questions have another fact of their kind planted before them, and how many in all."""
    rivals = total = 0
    for conv in conversations:
        turns = conv["interactions"]
        for i, turn in enumerate(turns):
            if turn["turn_type"] != "recall":
                continue
            kind, plant = turn["fact_key"].split(":")[0], i - turn["recall_distance"]
            total += 1
            rivals += any(
                other["turn_type"] == "plant" and j != plant and other["fact_key"].split(":")[0] == kind
                for j, other in enumerate(turns[:i])
            )
    return rivals, total


def test_same_kind_prob_plants_rival_facts_without_changing_the_default_data():
    default = generate_conversations(300, num_turns=6, seed=0)
    assert generate_conversations(300, num_turns=6, seed=0, same_kind_prob=0.0) == default
    base_rivals, total = _recalls_with_a_same_kind_rival(default)
    more_rivals, more_total = _recalls_with_a_same_kind_rival(generate_conversations(300, num_turns=6, seed=0, same_kind_prob=0.7))
    assert total > 100 and more_total > 100
    assert base_rivals / total < 0.3 < 0.5 < more_rivals / more_total
    # still one fact per key: a rival has the same kind, never the same key
    for conv in generate_conversations(100, num_turns=6, seed=0, same_kind_prob=1.0):
        planted = [t["fact_key"] for t in conv["interactions"] if t["turn_type"] == "plant"]
        assert len(planted) == len(set(planted))
        assert len({key.split(":")[0] for key in planted}) == 1
    # the split is by index: the test conversations of the default data keep their ids in a rival-rich build
    ids = lambda ds, split: set(ds[split]["conversation_id"])  # noqa: E731
    plain = build_synthetic_dataset("multi-turn", num_conversations=100, seed=0)
    rich = build_synthetic_dataset("multi-turn", num_conversations=100, seed=0, same_kind_prob=0.5)
    assert ids(plain, "test") == ids(rich, "test") and not ids(rich, "train") & ids(plain, "test")
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="same_kind_prob"):
            generate_conversations(2, same_kind_prob=bad)


# ---------------------------------------------------------------------------------- loading


def test_load_synthetic():
    ds = load_rxt_dataset(None, "interaction-sft", split="validation", num_conversations=40)
    assert ds.column_names == ["query", "answer"] and len(ds) > 0
    dd = load_rxt_dataset("synthetic", "pretraining", num_conversations=20)
    assert set(dd) == {"train", "validation", "test"}
    with pytest.raises(ValueError, match="split"):
        load_rxt_dataset(None, "pretraining", split="dev", num_conversations=20)


def test_local_jsonl_round_trip_with_renaming(tmp_path):
    mt = build_synthetic_dataset("multi-turn", num_conversations=30, num_turns=(2, 5))["train"]
    original = mt.to_list()
    renamed = mt.rename_columns({"query": "question", "answer": "response", "interactions": "turns"})
    path = tmp_path / "conversations.jsonl"
    renamed.to_json(str(path), lines=True)
    ds = load_rxt_dataset(str(path), "multi-turn", split="train",
                          column_mapping={"question": "query", "response": "answer",
                                          "turns": "interactions"})
    assert ds.to_list() == original
    # without the mapping: ValueError naming the missing column, the columns found and the fix
    with pytest.raises(ValueError) as err:
        load_rxt_dataset(str(path), "multi-turn")
    msg = str(err.value)
    assert "'query'" in msg and "question" in msg and "column_mapping" in msg


def test_local_parquet_directory_splits(tmp_path):
    sft = build_synthetic_dataset("interaction-sft", num_conversations=30)
    for split in ("train", "test"):
        sft[split].rename_column("answer", "reply").to_parquet(str(tmp_path / f"{split}.parquet"))
    dd = load_rxt_dataset(str(tmp_path), "interaction-sft", column_mapping={"reply": "answer"})
    assert set(dd) == {"train", "test"}
    for split in ("train", "test"):
        assert dd[split].to_list() == sft[split].to_list()
    single = load_rxt_dataset(str(tmp_path / "test.parquet"), "interaction-sft", split="train",
                              column_mapping={"reply": "answer"})
    assert single.to_list() == sft["test"].to_list()


def _mrl_rows(n, steps, tag):
    """Rows in the column layout of ReactiveAI/TinyStories-MRL: query, answer, interactions [{query, answer}]."""
    return [{"query": f"{tag} story {i}?", "answer": f"Once {i}.",
             "interactions": [{"query": f"Then {i}.{k}?", "answer": f"Next {k}."} for k in range(steps)]}
            for i in range(n)]


def test_local_folder_in_hub_layout_subset_and_named_splits(tmp_path):
    import json

    folder = tmp_path / "TinyStories-MRL"
    layout = {"steps-2": ("train", "validation"), "steps-6": ("train", "validation", "supervised")}
    for subset, splits in layout.items():
        (folder / subset).mkdir(parents=True)
        for split in splits:
            rows = _mrl_rows(3, int(subset[-1]), f"{subset}/{split}")
            (folder / subset / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dd = load_rxt_dataset(str(folder), "multi-turn", subset="steps-6")  # train + validation: split-named folder
    assert set(dd) == {"train", "validation", "supervised"}
    assert dd["supervised"][0]["query"] == "steps-6/supervised story 0?"
    assert [len(t) for t in dd["supervised"]["interactions"]] == [6, 6, 6]
    only = tmp_path / "only-supervised"
    only.mkdir()
    (only / "supervised.jsonl").write_text(json.dumps(_mrl_rows(1, 2, "x")[0]))
    assert set(load_rxt_dataset(str(only), "multi-turn")) == {"train"}  # no split name known: one train split
    assert set(load_rxt_dataset(str(only), "multi-turn", split_names=["supervised"])) == {"supervised"}
    assert load_rxt_dataset(str(folder), "multi-turn", subset="steps-2", split="validation")[1]["answer"] == "Once 1."
    with pytest.raises(ValueError, match=r"subset='steps-9'.*sub-folders: \['steps-2', 'steps-6'\]"):
        load_rxt_dataset(str(folder), "multi-turn", subset="steps-9")
    with pytest.raises(ValueError, match="subset='steps-2' needs a Hub data set or a local folder"):
        load_rxt_dataset("synthetic", "multi-turn", subset="steps-2")


def test_hub_source_passes_the_subset_as_config_name(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        rows = _mrl_rows(2, 2, "hub")
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dd = load_rxt_dataset("ReactiveAI/TinyStories-MRL", "multi-turn", subset="steps-2")
    assert calls == [("ReactiveAI/TinyStories-MRL", "steps-2", None, {})]
    assert dd["train"][0]["interactions"][1] == {"query": "Then 0.1?", "answer": "Next 1."}


def test_missing_column_and_bad_mapping(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text('[{"body": "One story."}, {"body": "Another story."}]')
    with pytest.raises(ValueError) as err:
        load_rxt_dataset(str(path), "pretraining")
    assert "'text'" in str(err.value) and "body" in str(err.value)
    ds = load_rxt_dataset(str(path), "pretraining", split="train",
                          column_mapping={"body": "text"})
    assert ds["text"] == ["One story.", "Another story."]
    with pytest.raises(ValueError, match="'content'"):
        load_rxt_dataset(str(path), "pretraining", column_mapping={"content": "text"})
    with pytest.raises(ValueError, match="'answer'"):
        load_rxt_dataset(str(path), "multi-turn", column_mapping={"body": "query"})
    with pytest.raises(ValueError, match="source"):
        load_rxt_dataset(str(tmp_path / "nope.jsonl"), "pretraining")


# ---------------------------------------------------------------------------------- tokenizing


def test_tokenize_interaction_template(data_tokenizer):
    tok = data_tokenizer
    q, a = "Where did I put the brass lantern?", "You put the brass lantern in the old mill."
    q_ids, a_ids = enc(tok, q), enc(tok, a)
    out = tokenize_interaction(tok, q, a, max_length=128)
    assert out["input_ids"] == [BOS, Q, *q_ids, A, *a_ids, EOS]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    prefix = 3 + len(q_ids)
    assert out["query_length"] == prefix
    assert out["labels_answer_only"] == [-100] * prefix + [*a_ids, EOS]
    padded = tokenize_interaction(tok, q, a, max_length=64, padding=True)
    n = len(out["input_ids"])
    assert len(padded["input_ids"]) == 64
    assert padded["input_ids"][n:] == [PAD] * (64 - n)
    assert padded["attention_mask"] == [1] * n + [0] * (64 - n)
    assert padded["labels_answer_only"] == out["labels_answer_only"] + [-100] * (64 - n)


def test_tokenize_interaction_truncation(data_tokenizer):
    tok = data_tokenizer
    q, a = "Where did I put the brass lantern?", "You put the brass lantern in the old mill."
    q_ids, a_ids = enc(tok, q), enc(tok, a)
    # answer is truncated first
    m = 4 + len(q_ids) + 2
    out = tokenize_interaction(tok, q, a, max_length=m)
    assert out["input_ids"] == [BOS, Q, *q_ids, A, *a_ids[:2], EOS]
    # then the query; [A] and [EOS] always kept
    out = tokenize_interaction(tok, q, a, max_length=6)
    assert out["input_ids"] == [BOS, Q, *q_ids[:2], A, EOS]
    assert out["labels_answer_only"] == [-100] * 5 + [EOS]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_interaction(tok, q, a, max_length=3)


# ---------------------------------------------------------------------------------- collators


def test_interaction_collator(data_tokenizer):
    tok = data_tokenizer
    examples = [
        {"query": "What is 3 plus 4?", "answer": "3 plus 4 is 7.", "recall_distance": 0},
        {"query": "Where does my friend Talia live?", "answer": "Talia lives in Greywater.",
         "recall_distance": 2},
    ]
    singles = [tokenize_interaction(tok, e["query"], e["answer"], 64) for e in examples]
    batch = InteractionCollator(tok, max_length=64, recall_weight=3.0)(examples)
    t = max(len(s["input_ids"]) for s in singles)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, t)
    assert batch["loss_weights"].shape == (2, t)
    for i, s in enumerate(singles):
        n = len(s["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == s["input_ids"]
        assert batch["input_ids"][i, n:].eq(PAD).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
        assert batch["labels"][i].tolist() == s["labels_answer_only"] + [-100] * (t - n)
        assert batch["query_length"][i] == s["query_length"]
    # x3 exactly on the answer tokens of the recall example
    answer = batch["labels"][1] != -100
    assert batch["loss_weights"][1][answer].eq(3.0).all()
    assert batch["loss_weights"][1][~answer].eq(1.0).all()
    assert batch["loss_weights"][0].eq(1.0).all()
    # full-sequence loss: every non-pad token after the first
    full = InteractionCollator(tok, max_length=64, answer_only_loss=False)(examples)
    assert "loss_weights" not in full
    expected = torch.where(full["attention_mask"].bool(), full["input_ids"], -100)
    expected[:, 0] = -100
    assert torch.equal(full["labels"], expected)
    # pre-tokenized examples give the same batch
    again = InteractionCollator(tok, max_length=64)(singles)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(again["labels"], batch["labels"])


def test_text_collator(data_tokenizer):
    tok = data_tokenizer
    texts = ["Talia lives in Greywater.", "A spider has 8 legs. " * 20]
    batch = TextCollator(tok, max_length=16)([{"text": x} for x in texts])
    assert batch["input_ids"].shape == (2, 16)
    ids0 = enc(tok, texts[0])
    n = len(ids0) + 2
    assert batch["input_ids"][0, :n].tolist() == [BOS, *ids0, EOS]
    assert batch["input_ids"][0, n:].eq(PAD).all()
    assert batch["labels"][0].tolist() == [-100, *ids0, EOS] + [-100] * (16 - n)
    long_ids = enc(tok, texts[1])
    assert batch["input_ids"][1].tolist() == [BOS, *long_ids[:14], EOS]  # truncated, EOS kept
    assert batch["attention_mask"][1].eq(1).all()


def test_conversation_collator_ragged(data_tokenizer):
    tok = data_tokenizer
    rows = build_synthetic_dataset("multi-turn", num_conversations=40, num_turns=(2, 6),
                                   seed=0)["train"]
    rows = sorted(rows.to_list(), key=lambda r: len(r["interactions"]))
    batch_rows = [rows[0], rows[-1], rows[len(rows) // 2]]
    n_turns = [1 + len(r["interactions"]) for r in batch_rows]
    assert n_turns[0] < n_turns[1]
    out = ConversationCollator(tok, max_length=64, recall_weight=3.0)(batch_rows)
    b, n, t = out["input_ids"].shape
    assert (b, n) == (3, max(n_turns))
    for key in ("attention_mask", "labels", "loss_weights"):
        assert out[key].shape == (b, n, t)
    for key in ("turn_mask", "recall_distance", "query_length"):
        assert out[key].shape == (b, n)
    for i, row in enumerate(batch_rows):
        m = n_turns[i]
        assert out["turn_mask"][i].tolist() == [1] * m + [0] * (n - m)
        assert out["recall_distance"][i].tolist() == [0, *row["recall_distance"]] + [0] * (n - m)
        assert out["answer_keywords"][i] == [[], *row["answer_keywords"]] + [[]] * (n - m)
        turns = [{"query": row["query"], "answer": row["answer"]}, *row["interactions"]]
        for k, turn in enumerate(turns):
            s = tokenize_interaction(tok, turn["query"], turn["answer"], 64)
            L = len(s["input_ids"])
            assert out["input_ids"][i, k, :L].tolist() == s["input_ids"]
            assert out["input_ids"][i, k, L:].eq(PAD).all()
            assert out["attention_mask"][i, k].tolist() == [1] * L + [0] * (t - L)
            assert out["labels"][i, k].tolist() == s["labels_answer_only"] + [-100] * (t - L)
            weight = 3.0 if out["recall_distance"][i, k] > 0 else 1.0
            answer = out["labels"][i, k] != -100
            assert out["loss_weights"][i, k][answer].eq(weight).all()
            assert out["loss_weights"][i, k][~answer].eq(1.0).all()
        # missing turns: all padding, no labels
        assert out["input_ids"][i, m:].eq(PAD).all()
        assert out["attention_mask"][i, m:].eq(0).all()
        assert out["labels"][i, m:].eq(-100).all()
    assert out["conversation_id"] == [r["conversation_id"] for r in batch_rows]
    assert out["recall_distance"].max() > 0


def test_conversation_collator_generator_rows_and_max_turns(data_tokenizer):
    tok = data_tokenizer
    conv = generate_conversations(2, num_turns=6, seed=5)
    out = ConversationCollator(tok, max_length=48, max_turns=4)(conv)
    assert out["input_ids"].shape[:2] == (2, 4)
    assert out["turn_mask"].eq(1).all()
    assert out["recall_distance"][0].tolist() == [
        t["recall_distance"] for t in conv[0]["interactions"][:4]]
    assert "loss_weights" not in out
    with pytest.raises(ValueError, match="follow-up"):
        ConversationCollator(tok)([{"query": "Hi.", "answer": "Hello.", "interactions": [],
                                    "recall_distance": [1]}])
