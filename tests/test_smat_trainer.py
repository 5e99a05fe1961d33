"""Stage 4 (SMAT): loss decrease, gradual unfreezing, turn curriculum, gradients through the STM, missing turns."""

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.trainers.data import ConversationCollator
from rxt_hf.trainers.smat_trainer import SMATConfig, SMATTrainer, TurnCurriculum, resolve_schedule_step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
PLACES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def conversation(i, turns=3, tag=""):
    name, place = NAMES[i % len(NAMES)], PLACES[(i * 5 + len(tag)) % len(PLACES)]
    follow = [{"query": f"{name} has a red cat.", "answer": "Nice."}] * (turns - 2)
    follow.append({"query": f"Where does {name} live?", "answer": f"{name} lives in {place}."})
    return {
        "query": f"{name} lives in {place}.",
        "answer": "Noted.",
        "interactions": follow,
        "recall_distance": [0] * (turns - 2) + [turns - 1],
        "conversation_id": f"{tag}{turns}-{i}",
    }


def dataset(n, turns=3, tag=""):
    from datasets import Dataset

    return Dataset.from_list([conversation(i, turns, tag) for i in range(n)])


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))


def make_trainer(tokenizer, tmp_path, train, model=None, **overrides):
    options = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, warmup_steps=1,
        logging_steps=1, report_to="none", disable_tqdm=True, max_length=48,
    )
    options.update(overrides)
    collator = ConversationCollator(tokenizer, max_length=48, recall_weight=3.0)
    return SMATTrainer(model or tiny_model(tokenizer), SMATConfig(**options), train_dataset=train,
                       processing_class=tokenizer, data_collator=collator)


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(params, saved):
    return all(torch.equal(p.detach(), s) for p, s in zip(params, saved))


# --- loss --------------------------------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(tiny_tokenizer, tmp_path):
    train = dataset(4)
    trainer = make_trainer(tiny_tokenizer, tmp_path, train, max_steps=30)
    batch = trainer.data_collator([train[i] for i in range(4)])
    model = trainer.rxt_model
    model.eval()
    with torch.no_grad():
        first, metrics, _ = trainer.model(batch)  # the stage module's forward: (loss, metrics, tokens)
    assert {"loss_turn_0", "loss_turn_2", "recall_accuracy", "trainable_parameters", "num_turns"} <= set(metrics)
    assert metrics["num_turns"] == 3
    assert metrics["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    trainer.train()
    model.eval()
    with torch.no_grad():
        last, _, _ = trainer.model(batch)
    assert float(last) < 0.7 * float(first), (float(first), float(last))


def test_loss_weights_of_one_change_nothing(tiny_tokenizer, tmp_path):
    train = dataset(4)
    trainer = make_trainer(tiny_tokenizer, tmp_path, train)
    batch = ConversationCollator(tiny_tokenizer, max_length=48)([train[i] for i in range(4)])
    ones = dict(batch, loss_weights=torch.ones(batch["input_ids"].shape))
    triple = dict(batch, loss_weights=torch.where(batch["recall_distance"][..., None] > 0, 3.0, 1.0).expand_as(
        batch["input_ids"]))
    with torch.no_grad():
        base, metrics, _ = trainer.model(batch)
        weighted_ones, _, _ = trainer.model(ones)
        weighted, heavy, _ = trainer.model(triple)
    torch.testing.assert_close(base, weighted_ones)
    # only the recall turn (turn 2) is weighted, and weighting a single turn uniformly does not change its mean
    torch.testing.assert_close(base, weighted)
    assert heavy["loss_turn_2"] == pytest.approx(metrics["loss_turn_2"], rel=1e-5)


# --- gradual unfreezing -------------------------------------------------------------------------------------


def test_unfreeze_schedule_switches_the_right_parameters(tiny_tokenizer, tmp_path):
    schedule = {"decoder": 0, "memory_cross_attention": 1, "memory_attention": 2, "encoder": 0.5, "embedding": None}
    trainer = make_trainer(tiny_tokenizer, tmp_path, dataset(4), max_steps=6, freeze_schedule=schedule)
    model = trainer.rxt_model
    parts = trainer.component_parameters()
    assert trainer.freeze_steps == {
        "decoder": 0, "memory_cross_attention": 1, "memory_attention": 2, "encoder": 3, "embedding": None
    }
    assert any(p is model.model.decoder.layers[0].memory_cross_attn.q_proj.weight for p in parts["memory_cross_attention"])
    # every parameter belongs to exactly one component; the LM head goes with the decoder
    ids = [id(p) for params in parts.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert any(p is model.lm_head.weight for p in parts["decoder"])
    reading = "memory_cross_attention"
    expected = {0: {"decoder"}, 1: {"decoder", reading}, 2: {"decoder", reading, "memory_attention"},
                3: {"decoder", reading, "memory_attention", "encoder"},
                5: {"decoder", reading, "memory_attention", "encoder"}}
    for step, active in expected.items():
        trainer.on_step_begin(step)
        for name, params in parts.items():
            assert all(p.requires_grad == (name in active) for p in params), (step, name)


def test_frozen_components_do_not_change_until_unfrozen(tiny_tokenizer, tmp_path):
    seen = {}

    class Recording(SMATTrainer):
        def on_step_begin(self, step):
            super().on_step_begin(step)
            parts = self.component_parameters()
            seen[step] = {n: snapshot(ps) for n, ps in parts.items()}

    collator = ConversationCollator(tiny_tokenizer, max_length=48)
    # no warmup: transformers' warmup starts at learning rate 0, so step 0 would change nothing
    args = SMATConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                      warmup_steps=0, report_to="none", disable_tqdm=True, max_length=48,
                      freeze_schedule={"decoder": 0, "memory_attention": 2, "encoder": None, "embedding": None})
    trainer = Recording(tiny_model(tiny_tokenizer), args, train_dataset=dataset(4), data_collator=collator)
    initial = {n: snapshot(ps) for n, ps in trainer.component_parameters().items()}
    trainer.train()
    final = trainer.component_parameters()
    assert same(final["encoder"], initial["encoder"]) and same(final["embedding"], initial["embedding"])
    assert same(seen[2]["memory_attention"], initial["memory_attention"])  # frozen during steps 0 and 1
    assert not same(final["memory_attention"], seen[2]["memory_attention"])  # trained in steps 2 and 3
    assert not same(seen[1]["decoder"], initial["decoder"])  # trained from step 0


def test_bad_schedules_are_rejected(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown component 'lm_head'"):
        SMATConfig(output_dir=str(tmp_path), freeze_schedule={"lm_head": 0})
    with pytest.raises(ValueError, match="fraction"):
        SMATConfig(output_dir=str(tmp_path), freeze_schedule={"decoder": 1.5})
    with pytest.raises(ValueError, match="start at step 0"):
        make_trainer(tiny_tokenizer, tmp_path, dataset(4), turn_curriculum=[(0.5, 2)])
    with pytest.raises(ValueError, match="num_turns=4"):
        make_trainer(tiny_tokenizer, tmp_path, {2: dataset(4, 2)}, turn_curriculum=[(0, 2), (2, 4)])
    assert resolve_schedule_step(0.6, 10) == 6 and resolve_schedule_step(3, 10) == 3


# --- turn curriculum -----------------------------------------------------------------------------------------


def test_curriculum_picks_the_dataset_and_turn_count_per_step(tiny_tokenizer):
    sets = {2: dataset(8, 2, tag="a"), 3: dataset(12, 3, tag="b")}
    collator = ConversationCollator(tiny_tokenizer, max_length=48)
    phases = [(0.0, 2), (0.5, 3)]
    cur = TurnCurriculum(sets, phases, max_steps=10, batch_size=4, collator=collator, seed=1)
    assert [cur.num_turns(s) for s in range(10)] == [2] * 5 + [3] * 5
    for step in range(10):
        turns, indices = cur.example_indices(step)
        batch = cur.batch(step)
        assert batch["input_ids"].shape[1] == turns == cur.num_turns(step)
        assert all(cid.startswith(("a2-" if turns == 2 else "b3-")) for cid in batch["conversation_id"])
    # phase 1 starts at its own batch 0; epochs of 2 (8 / 4) batches use fresh permutations covering all rows
    assert cur.position(5) == (3, 0)
    assert sorted(cur.example_indices(0)[1] + cur.example_indices(1)[1]) == list(range(8))
    # deterministic: a fresh object (a resumed run) gives the same batches
    again = TurnCurriculum(sets, phases, max_steps=10, batch_size=4, collator=collator, seed=1)
    assert all(again.example_indices(s) == cur.example_indices(s) for s in range(10))
    # two processes read disjoint halves of the same global batch
    shards = [TurnCurriculum(sets, phases, 10, 2, collator, seed=1, num_processes=2, process_index=i) for i in (0, 1)]
    a, b = (set(sh.example_indices(7)[1]) for sh in shards)
    assert not a & b and len(a | b) == 4
    # one data set: conversations are cut to the phase's turn count
    single = TurnCurriculum(sets[3], [(0, 2), (3, 3)], max_steps=6, batch_size=4, collator=collator)
    assert single.batch(0)["input_ids"].shape[1] == 2 and single.batch(3)["input_ids"].shape[1] == 3


def test_trainer_follows_the_curriculum(tiny_tokenizer, tmp_path):
    shapes = []

    class Recording(SMATTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            shapes.append((self.state.global_step, inputs["input_ids"].shape[1], inputs["conversation_id"][0][:2]))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    collator = ConversationCollator(tiny_tokenizer, max_length=48)
    args = SMATConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, report_to="none", disable_tqdm=True, max_length=48,
                      turn_curriculum=[(0.0, 2), (0.5, 3)])
    sets = {2: dataset(4, 2, tag="a"), 3: dataset(4, 3, tag="b")}
    trainer = Recording(tiny_model(tiny_tokenizer), args, train_dataset=sets, data_collator=collator)
    trainer.train()
    assert [s[:2] for s in shapes] == [(0, 2), (0, 2), (1, 2), (1, 2), (2, 3), (2, 3), (3, 3), (3, 3)]
    assert [s[2] for s in shapes] == ["a2"] * 4 + ["b3"] * 4
    # the train loader's item step x accumulation + micro is micro-batch (step, micro) of the curriculum, whatever
    # was read before it (a resumed run skips the first global_step x accumulation items)
    got = list(trainer.get_train_dataloader())
    assert len(got) == 8
    expected = [trainer.curriculum.batch(3, m)["conversation_id"] for m in (0, 1)]
    assert [b["conversation_id"] for b in got[6:8]] == expected


# --- gradients through the memory, missing turns ---------------------------------------------------------------


def _grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss, _, _ = trainer.model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.rxt_model.named_parameters()}


def test_gradient_reaches_memory_attention_and_encoder_through_the_stm(tiny_tokenizer, tmp_path):
    train = dataset(4, 2)
    trainer = make_trainer(tiny_tokenizer, tmp_path, train)
    batch = trainer.data_collator([train[i] for i in range(4)])

    def nonzero(grads, prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    _, grads = _grads(trainer, batch)
    assert nonzero(grads, "model.encoder.layers.") and nonzero(grads, "model.memory_attention.layers.")
    # with a single turn no STM written by the model is ever read: the encoder gets no gradient at all
    one_turn = {k: (v[:, :1] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in batch.items()}
    _, grads = _grads(trainer, one_turn)
    assert not nonzero(grads, "model.encoder.") and not nonzero(grads, "model.memory_attention.layers.")
    # truncated back-propagation still trains the memory, with a different gradient
    full = dataset(4, 3)
    batch3 = trainer.data_collator([full[i] for i in range(4)])
    _, g_full = _grads(trainer, batch3)
    trainer.args.backprop_turns = 1
    _, g_cut = _grads(trainer, batch3)
    trainer.args.backprop_turns = None
    assert nonzero(g_cut, "model.encoder.layers.")
    name = "model.encoder.layers.0.self_attn.q_proj.weight"
    name = name if name in g_full else next(n for n in g_full if n.startswith("model.encoder.layers.0."))
    assert not torch.allclose(g_full[name], g_cut[name])


def test_rows_with_missing_turns_do_not_contribute(tiny_tokenizer, tmp_path):
    train = dataset(4, 4)
    trainer = make_trainer(tiny_tokenizer, tmp_path, train)
    batch = trainer.data_collator([train[i] for i in range(4)])
    batch["turn_mask"][1, 2] = 0  # row 1 has no turn 2 (its turn 3 must read the memory after turn 1)
    garbage = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    g = torch.Generator().manual_seed(0)
    garbage["input_ids"][1, 2] = torch.randint(5, len(tiny_tokenizer), garbage["input_ids"][1, 2].shape, generator=g)
    garbage["attention_mask"][1, 2] = 1
    garbage["labels"][1, 2] = garbage["input_ids"][1, 2]
    loss_a, grads_a = _grads(trainer, batch)
    loss_b, grads_b = _grads(trainer, garbage)
    torch.testing.assert_close(loss_a, loss_b)
    for name, grad in grads_a.items():
        if grad is not None:
            torch.testing.assert_close(grad, grads_b[name], msg=name)
    # and the missing turn really is skipped rather than ignored by accident: marking it present changes the loss
    garbage["turn_mask"][1, 2] = 1
    with torch.no_grad():
        loss_c, _, _ = trainer.model(garbage)
    assert not torch.allclose(loss_a, loss_c)


def test_resume_reaches_the_same_weights(tiny_tokenizer, tmp_path):
    sets = {2: dataset(4, 2, tag="a"), 3: dataset(8, 3, tag="b")}
    options = dict(max_steps=4, per_device_train_batch_size=2, save_steps=2, turn_curriculum=[(0, 2), (0.25, 3)],
                   freeze_schedule={"decoder": 0, "memory_attention": 1, "encoder": 3, "embedding": 0})
    full = make_trainer(tiny_tokenizer, tmp_path / "a", sets, **options)
    full.train()
    resumed = make_trainer(tiny_tokenizer, tmp_path / "b", sets, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.rxt_model.named_parameters(), resumed.rxt_model.parameters()):
        torch.testing.assert_close(a, b, msg=name)
