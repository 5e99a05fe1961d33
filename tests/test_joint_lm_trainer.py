"""Stage 1-2 JointLMTrainer and the MLM head / masking."""

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.tokenization_rxt import special_token_ids
from rxt_hf.trainers.data import InteractionCollator
from rxt_hf.trainers.joint_lm_trainer import JointLMConfig, JointLMTrainer
from rxt_hf.trainers.mlm_head import RxTMLMHead, mask_tokens


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(tok):
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tok), **special_token_ids(tok)))


def test_mask_tokens_never_masks_special_or_padding():
    ids = torch.tensor([[0, 5, 20, 21, 22, 23, 6, 30, 31, 1, 2, 2]] * 64)
    mask = (ids != 2).long()
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask, 4, 100, [0, 1, 2, 3, 4, 5, 6, 7], probability=0.5, generator=generator)
    special = torch.isin(ids, torch.tensor([0, 1, 2, 5, 6]))
    assert (labels[special] == -100).all() and (masked[special] == ids[special]).all()
    selected = labels != -100
    assert selected.float().mean() > 0.2
    assert (labels[selected] == ids[selected]).all()
    changed = masked[selected]
    fraction_mask = (changed == 4).float().mean()
    assert 0.7 < fraction_mask < 0.9
    assert ((masked >= 8) | (masked == 4) | special).all()  # random replacements are never special tokens
    again, _ = mask_tokens(ids, mask, 4, 100, range(8), probability=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


def test_mlm_head_shapes_and_roundtrip(tmp_path):
    config = RxTConfig.from_preset("rxt-tiny")
    head = RxTMLMHead(config)
    assert head(torch.randn(2, 5, config.hidden_size)).shape == (2, 5, config.vocab_size)
    head.save(str(tmp_path))
    loaded = RxTMLMHead.from_directory(str(tmp_path), config)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))


def test_joint_lm_loss_falls_on_fixed_batch(tmp_path, tiny_tokenizer):
    from conftest import tiny_corpus

    data = [{"text": t} for t in tiny_corpus(8)]
    args = JointLMConfig(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=1,
        logging_steps=1, report_to="none", disable_tqdm=True, max_length=48,
    )
    trainer = JointLMTrainer(_model(tiny_tokenizer), args, train_dataset=data, processing_class=tiny_tokenizer)
    trainer.train()
    import json

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if not r.get("final")]
    assert len(losses) == 30
    assert losses[-1] < 0.7 * losses[0], losses
    assert records[-2]["mlm_loss"] < records[0]["mlm_loss"]
    assert records[-2]["decoder_loss"] < records[0]["decoder_loss"]


def test_sft_mode_ignores_prefix_tokens(tmp_path, tiny_tokenizer):
    examples = [{"query": "Where does Ann live?", "answer": "Ann lives in Paris."}] * 4
    args = JointLMConfig(output_dir=str(tmp_path), mode="sft", max_steps=1, per_device_train_batch_size=4,
                         report_to="none", disable_tqdm=True, max_length=48, mlm_probability=0.0)
    trainer = JointLMTrainer(_model(tiny_tokenizer), args, train_dataset=examples, processing_class=tiny_tokenizer)
    assert trainer.stage_name == "joint-sft"
    assert isinstance(trainer.data_collator, InteractionCollator) and trainer.data_collator.answer_only_loss
    batch = trainer.data_collator(examples)
    trainer.seed_generator(0, 0)
    _, reference, _ = trainer.model(batch)  # the stage module's forward: (loss, metrics, tokens)

    # changing the labels on prefix positions (-100 there) is irrelevant; changing the prefix *tokens'*
    # labels to real ids would change the loss, so the loss only sees answer tokens
    answer = batch["labels"] != -100
    query_length = int(batch["query_length"][0])
    assert not answer[:, :query_length].any() and answer[:, query_length:].any()
    full = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100))
    trainer.seed_generator(0, 0)
    _, with_prefix, _ = trainer.model(full)
    assert with_prefix["decoder_loss"] != pytest.approx(reference["decoder_loss"])

    # the answer-only decoder loss equals a CE computed by hand on answer positions
    model = trainer.rxt_model
    with torch.no_grad():
        encoded = model.model.encode(batch["input_ids"], batch["attention_mask"])  # no masking (p=0)
        hidden = model.model.decode(encoded.layer_states, input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"],
                                    memory_attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden)[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert reference["decoder_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_slot_dropout_and_noise_change_memory(tmp_path, tiny_tokenizer):
    examples = [{"text": "Ann has a red kite."}] * 4
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                disable_tqdm=True, max_length=48)
    plain = JointLMTrainer(_model(tiny_tokenizer), JointLMConfig(**base), train_dataset=examples,
                           processing_class=tiny_tokenizer)
    noisy = JointLMTrainer(_model(tiny_tokenizer), JointLMConfig(**base, memory_noise_std=1.0, memory_slot_dropout=0.5),
                           train_dataset=examples, processing_class=tiny_tokenizer)
    batch = plain.data_collator(examples)
    plain.seed_generator(0, 0)
    noisy.seed_generator(0, 0)
    assert plain.model(batch)[1]["decoder_loss"] != pytest.approx(noisy.model(batch)[1]["decoder_loss"])
