"""Stage 3 (self-supervised memory attention): schedule, labels, slot pooling, freezing, loss decrease."""

import json
from pathlib import Path

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.trainers.data import ConversationCollator
from rxt_hf.trainers.memory_attention_trainer import (
    MemoryAttentionConfig,
    MemoryAttentionTrainer,
    memory_attention_labels,
    new_data_weight_schedule,
    pool_encoded_to_slots,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine run much faster single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conversations(n=4):
    names, places = ["Ann", "Bob", "Cleo", "Dan"], ["Paris", "Oslo", "Rome", "Lima"]
    rows = []
    for i in range(n):
        name, place = names[i % 4], places[(i + 1) % 4]
        rows.append({
            "query": f"{name} lives in {place}.",
            "answer": "Noted.",
            "interactions": [
                {"query": f"{name} has a red cat.", "answer": "Nice."},
                {"query": f"Where does {name} live?", "answer": f"{name} lives in {place}."},
            ],
            "recall_distance": [0, 2],
        })
    return rows


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))


# --- schedule and labels -------------------------------------------------------------------------------


def test_schedule_without_jitter_follows_the_seed():
    weights = [new_data_weight_schedule(k, weight_jitter=0.0) for k in range(12)]
    assert weights[0] == pytest.approx(0.9)
    for k in range(1, 10):
        assert weights[k] == pytest.approx(0.5 - 0.05 * (k - 1))  # 0.5, 0.45, ..., 0.1
    assert weights[11] == pytest.approx(0.05)  # clamped at min_new_data_weight
    assert new_data_weight_schedule(40, weight_jitter=0.0) == pytest.approx(0.05)


def test_schedule_jitter_stays_in_bounds_and_is_seeded():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [new_data_weight_schedule(k % 6, g) for k in range(300)]

    first, again, other = draws(1), draws(1), draws(2)
    assert first == again and first != other
    for k, w in enumerate(first):
        base = 0.9 if k % 6 == 0 else 0.5 - 0.05 * (k % 6 - 1)
        assert max(0.05, base - 0.15) - 1e-9 <= w <= min(1.0, base + 0.15) + 1e-9
    spread = [w for k, w in enumerate(first) if k % 6 == 2]
    assert max(spread) - min(spread) > 0.15  # the jitter really varies (range 0.3 wide)


def test_labels_are_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    stm = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    enc = torch.randn(2, 3, 4, 5, generator=g)
    label = memory_attention_labels(stm, enc, 0.3)
    torch.testing.assert_close(label, 0.3 * enc + 0.7 * stm.detach())
    assert not label.requires_grad
    per_row = memory_attention_labels(stm, enc, torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(per_row[1], 0.1 * enc[1] + 0.9 * stm[1].detach())
    with pytest.raises(ValueError, match="same shape"):
        memory_attention_labels(stm, enc[:, :, :2], 0.5)


def test_pooling_is_one_to_one_when_lengths_match():
    enc = torch.randn(2, 3, 6, 4)  # [B, L, T, D]
    torch.testing.assert_close(pool_encoded_to_slots(enc, None, 6), enc)
    # right padding: 6 valid positions out of 9 -> still exactly one position per slot
    padded = torch.cat([enc, torch.randn(2, 3, 3, 4)], dim=2)
    mask = torch.tensor([[1] * 6 + [0] * 3] * 2)
    torch.testing.assert_close(pool_encoded_to_slots(padded, mask, 6), enc)
    # left padding works the same way
    left = torch.cat([torch.randn(2, 3, 3, 4), enc], dim=2)
    torch.testing.assert_close(pool_encoded_to_slots(left, mask.flip(-1), 6), enc)


def test_pooling_chunks_when_longer_and_repeats_when_shorter():
    enc = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 2, 8, 1)  # positions 0..7
    chunks = pool_encoded_to_slots(enc, torch.ones(1, 8), 4)
    torch.testing.assert_close(chunks[0, 0, :, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])  # 3 valid positions, 6 slots
    repeated = pool_encoded_to_slots(enc, mask, 6)
    torch.testing.assert_close(repeated[0, 1, :, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))
    empty = pool_encoded_to_slots(enc, torch.zeros(1, 8), 4)
    assert torch.count_nonzero(empty) == 0


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="weight_jitter"):
        MemoryAttentionConfig(output_dir=str(tmp_path), weight_jitter=-0.1)
    with pytest.raises(ValueError, match="first_step_new_data_weight"):
        MemoryAttentionConfig(output_dir=str(tmp_path), first_step_new_data_weight=1.5)


# --- training ------------------------------------------------------------------------------------------


def test_trains_only_memory_attention_and_loss_falls(tiny_tokenizer, tmp_path):
    rows = conversations(4)
    collator = ConversationCollator(tiny_tokenizer, max_length=48)
    model = tiny_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MemoryAttentionConfig(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3, warmup_steps=1,
        logging_steps=1, report_to="none", disable_tqdm=True, max_length=48,
        weight_jitter=0.0, input_noise_std=0.0, label_noise_std=0.0,
    )
    from datasets import Dataset

    trainer = MemoryAttentionTrainer(model, args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tiny_tokenizer, data_collator=collator)
    assert all(p.requires_grad == n.startswith("model.memory_attention.") for n, p in model.named_parameters())
    batch = collator(rows)
    model.eval()
    with torch.no_grad():
        first, metrics, tokens = trainer.model(batch)  # the stage module's forward: (loss, metrics, tokens)
    assert tokens == int(batch["attention_mask"].sum())
    assert {"cosine", "stm_norm", "cosine_turn_0", "cosine_turn_2"} <= set(metrics)
    assert metrics["new_data_weight_turn_0"] == pytest.approx(0.9)
    trainer.train()
    model.eval()
    with torch.no_grad():
        last, _, _ = trainer.model(batch)
    assert float(last) < float(first) - 0.1, (float(first), float(last))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("model.memory_attention.") for n in changed)
    assert any(".layers.0." in n for n in changed)
    logged = [json.loads(line) for line in Path(tmp_path, "log.jsonl").read_text().splitlines()]
    assert any("cosine" in record for record in logged)
