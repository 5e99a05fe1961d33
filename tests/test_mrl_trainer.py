"""MRL (stage 5): IMPO loss, group advantages, curriculum, STM resets, gradients through memory, a tiny run, resume,
and public TRL / transformers API only."""

import ast
import contextlib
import inspect
import io
import json
import math
import os
import re
import textwrap

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.format_rxt import encode_texts, frame_interaction, special_token_ids
from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
from rxt_hf.trainers import mrl_trainer
from rxt_hf.trainers.mrl_critic import MemoryAwareCritic, critic_advantages, explained_variance
from rxt_hf.trainers.mrl_trainer import (
    MRLConfig,
    MRLCurriculum,
    MRLTrainer,
    group_advantages,
    impo_loss,
    rewarded_turns,
)
from rxt_hf.trainers.synthetic_data import build_synthetic_dataset


@pytest.fixture(scope="module")
def mrl_data():
    return build_synthetic_dataset("multi-turn", num_conversations=24, num_turns=4, max_recall_distance=3,
                                   seed=0)["train"]


@pytest.fixture(scope="module")
def mrl_tokenizer(mrl_data):
    texts = [r["query"] + " " + r["answer"] for r in mrl_data]
    texts += [t["query"] + " " + t["answer"] for r in mrl_data for t in r["interactions"]]
    return build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=64)


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer)))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, curriculum_steps=[1, 3], use_cpu=True, disable_tqdm=True,
                save_strategy="no", learning_rate=1e-3, seed=0)
    base.update(kw)
    return MRLConfig(**base)


def _trainer(tmp_path, data, tokenizer, **kw):
    return MRLTrainer(_model(tokenizer), args=_args(tmp_path, **kw), train_dataset=data, processing_class=tokenizer)


def _quiet_train(trainer, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.train(**kw)


# --- pure pieces ---------------------------------------------------------------------------------------


def test_impo_loss_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    old = torch.tensor([[-1.3, -1.9, -0.5], [-0.1, -1.2, 0.0]])
    ref = torch.tensor([[-1.1, -2.2, -0.4], [-0.2, -1.0, 0.0]])
    adv = torch.tensor([1.5, -0.7])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stm_mse = torch.tensor(0.25)
    eps, beta, mem = 0.2, 0.1, 0.5
    loss, stats = impo_loss(logp, old, adv, mask, epsilon_low=eps, epsilon_high=eps, ref_per_token_logps=ref,
                            kl_coef=beta, stm_mse=stm_mse, memory_reg_coef=mem, loss_type="grpo")
    # by hand, token by token
    rows = []
    kls, clipped, count = [], 0, 0
    for i in range(2):
        terms = []
        for j in range(3):
            if not mask[i, j]:
                continue
            r = math.exp(logp[i, j] - old[i, j])
            a = float(adv[i])
            rc = min(max(r, 1 - eps), 1 + eps)
            d = float(ref[i, j] - logp[i, j])
            kl = math.exp(d) - d - 1
            kls.append(kl)
            terms.append(-min(r * a, rc * a) + beta * kl)
            clipped += int((r < 1 - eps and a < 0) or (r > 1 + eps and a > 0))
            count += 1
        rows.append(sum(terms) / len(terms))
    expected = sum(rows) / 2 + mem * 0.25
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(kls) / count, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(clipped / count)
    assert clipped > 0  # the example does exercise the clip (ratio exp(0.3) > 1.2 with A > 0)
    assert stats["memory_loss"].item() == pytest.approx(0.25)
    # token-level aggregation
    loss_tok, _ = impo_loss(logp, old, adv, mask, epsilon_low=eps, epsilon_high=eps, loss_type="dapo")
    per = [-min(math.exp(logp[i, j] - old[i, j]) * adv[i],
                min(max(math.exp(logp[i, j] - old[i, j]), 1 - eps), 1 + eps) * adv[i])
           for i in range(2) for j in range(3) if mask[i, j]]
    assert loss_tok.item() == pytest.approx(float(sum(per) / len(per)), rel=1e-6)


def test_group_advantages_are_normalised_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 4.0, float("nan"), 2.0])
    adv = group_advantages(rewards, 3)
    for g in range(3):
        r = rewards[3 * g: 3 * g + 3]
        valid = r[~torch.isnan(r)]
        mean, std = valid.mean(), valid.std()  # unbiased, like TRL's nanstd
        std = 0.0 if torch.isnan(std) else std
        for k in range(3):
            if torch.isnan(r[k]):
                assert adv[3 * g + k] == 0
            else:
                assert adv[3 * g + k].item() == pytest.approx(((r[k] - mean) / (std + 1e-4)).item(), abs=1e-5)
    assert torch.allclose(adv[3:6], torch.zeros(3))
    assert torch.allclose(group_advantages(rewards[:3], 3, "none"), torch.tensor([-1.0, 0.0, 1.0]))


def test_curriculum_schedule_and_strategies(tmp_path):
    args = MRLConfig(output_dir=str(tmp_path), max_steps=100, curriculum_steps=[2, 4, 8, 12, 16], use_cpu=True)
    cur = MRLCurriculum(args)
    assert [cur.num_steps(s) for s in (0, 19, 20, 39, 40, 60, 99)] == [2, 2, 4, 4, 8, 12, 16]
    assert [cur.strategy(s) for s in (0, 20, 40, 60, 80)] == [
        "cumulative", "long-range", "cumulative", "long-range", "cumulative"]
    args = MRLConfig(output_dir=str(tmp_path), max_steps=10, curriculum_steps=[2, 6], curriculum_starts=[0, 0.7],
                     curriculum_strategies=["long-range", "cumulative"], own_answers_from_stage=1, use_cpu=True)
    cur = MRLCurriculum(args)
    assert [cur.num_steps(s) for s in (0, 6, 7, 9)] == [2, 2, 6, 6]
    assert cur.strategy(0) == "long-range" and cur.strategy(7) == "cumulative"
    assert not cur.own_answers(6) and cur.own_answers(7)
    # which turns an episode rewards
    distances = [0, 0, 1, 3, 0, 2]
    assert rewarded_turns(distances, "cumulative") == [1, 2, 3, 4, 5]
    assert rewarded_turns(distances, "long-range", 2) == [3, 5]
    assert rewarded_turns(distances, "long-range", 3) == [3]
    assert rewarded_turns([0, 0, 1], "long-range", 2) == [2]  # fallback: the last turn


def test_bad_config_values_fail_before_training(tmp_path):
    for bad in (dict(beta=0.1), dict(curriculum_steps=[]), dict(curriculum_steps=[2, 0]),
                dict(curriculum_starts=[0.5, 0.7]), dict(curriculum_strategies=["cumulative", "random"]),
                dict(stm_reset_probability=1.5), dict(kl_reference="ref"), dict(freeze_schedule={"head": 0}),
                dict(memory_reg_coef=-1.0), dict(loss_type="cispo"), dict(reward_functions=["recall"]),
                dict(reward_functions=[]), dict(advantage_estimator="gae"), dict(critic_learning_rate=0.0),
                dict(critic_epochs=0), dict(supervised_coef=-0.5),
                dict(supervised_turns="recall")):
        with pytest.raises(ValueError):
            MRLConfig(output_dir=str(tmp_path), curriculum_steps=bad.pop("curriculum_steps", [2, 4]), use_cpu=True,
                      **bad)


# --- trainer --------------------------------------------------------------------------------------------


def _batch(trainer, data, step=0):
    trainer.state.global_step = step
    rows = [data[i] for i in (0, 0, 1, 1)]
    return trainer.rollout(rows)


def test_stm_reset_probability(tmp_path, mrl_data, mrl_tokenizer):
    never = _trainer(tmp_path / "a", mrl_data, mrl_tokenizer, stm_reset_probability=0.0, kl_coef=0.0)
    batch = _batch(never, mrl_data)
    fresh = never.model.init_memory(4)
    assert torch.allclose(batch["initial_stm"], fresh)
    always = _trainer(tmp_path / "b", mrl_data, mrl_tokenizer, stm_reset_probability=1.0, stm_reset_std=0.5,
                      kl_coef=0.0)
    batch = _batch(always, mrl_data)
    stm = batch["initial_stm"]
    assert not torch.allclose(stm, always.model.init_memory(4))
    assert stm.std().item() == pytest.approx(0.5, rel=0.2)
    assert torch.equal(stm[0], stm[1]) and torch.equal(stm[2], stm[3])  # one draw per conversation group
    assert not torch.equal(stm[0], stm[2])


def test_episode_layout_and_group_advantages(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.05)
    batch = _batch(trainer, mrl_data, step=1)  # stage 1: 3 follow-ups, "long-range" by default
    assert trainer.curriculum.strategy(1) == "long-range"
    R, N, _ = batch["seq_ids"].shape
    assert (R, N) == (4, 4)
    scored = batch["scored"]
    assert not scored[:, 0].any()  # the first interaction only goes into memory
    assert torch.equal(scored[0], scored[1]) and torch.equal(scored[2], scored[3])
    for r in range(R):
        for t in range(N):
            if scored[r, t]:
                assert batch["completion_mask"][r, t].sum() > 0
    # the advantages of each (conversation, turn) group of G=2 rollouts sum to ~0
    adv = batch["advantages"]
    assert torch.allclose(adv[0] + adv[1], torch.zeros(N), atol=1e-4)
    assert "ref_per_token_logps" in batch


def test_rewards_get_the_key_words_of_the_fact_asked_for(tmp_path, mrl_data, mrl_tokenizer):
    seen = []

    def spy(prompts, completions, answer_keywords, turn, **kwargs):
        seen.extend(zip(prompts, answer_keywords, turn))
        return [0.0] * len(completions)

    trainer = MRLTrainer(_model(mrl_tokenizer), reward_funcs=[spy], args=_args(tmp_path, kl_coef=0.0),
                         train_dataset=mrl_data, processing_class=mrl_tokenizer)
    _batch(trainer, mrl_data, step=1)
    expected = {}
    for row in (mrl_data[0], mrl_data[1]):
        for t, (turn, kws) in enumerate(zip(row["interactions"], row["answer_keywords"]), start=1):
            expected[turn["query"], t] = kws
    assert seen and all(list(kws) == list(expected[query, t]) for query, kws, t in seen)
    assert any(kws for _, kws, _ in seen)  # the long-range turns ask for facts


def test_reward_functions_by_name(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.0, reward_functions=["keyword_recall", "length"],
                       reward_weights=[1.0, 0.2])
    assert trainer.reward_func_names == ["keyword_recall_reward", "length"]
    _batch(trainer, mrl_data, step=1)
    assert math.isfinite(trainer.step_metrics["train"]["rewards/keyword_recall_reward/mean"][-1])


def _loss_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    trainer.state.global_step = 0
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    parts = trainer.component_parameters()
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
            for name, params in parts.items()}


def test_policy_gradient_reaches_memory_attention_and_encoder(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.0, memory_reg_coef=0.0,
                       curriculum_steps=[3], freeze_schedule={"memory_attention": 0, "encoder": 0, "decoder": 0})
    batch = _batch(trainer, mrl_data)
    # make sure the policy term is non-zero: replace the advantages by fixed non-zero values
    batch["advantages"] = torch.where(batch["scored"], torch.tensor(1.0), torch.tensor(0.0))
    batch["old_per_token_logps"] = trainer.replay(trainer.model, batch)[0].detach() + 0.05
    trainer.apply_freeze(0)
    grads = _loss_grads(trainer, batch)
    assert grads["memory_attention"] and grads["encoder"] and grads["decoder"]
    # encoder frozen: the policy loss still reaches memory attention, the encoder gets no gradient
    trainer.freeze_steps = {"memory_attention": 0, "encoder": None, "decoder": 0, "embedding": None}
    trainer.apply_freeze(0)
    grads = _loss_grads(trainer, batch)
    assert grads["memory_attention"] and not grads["encoder"] and not grads["embedding"]


def _reference_nll(model, tokenizer, rows, taught):
    """Sum and count of the reference-answer token NLLs, each conversation's STM written turn by turn from its
    reference interactions; ``taught[i][t]``: whether turn t of conversation i counts."""
    ids = special_token_ids(tokenizer)
    nll, tokens = 0.0, 0
    for i, row in enumerate(rows):
        stm = model.init_memory(1)
        for t, turn in enumerate([{"query": row["query"], "answer": row["answer"]}, *row["interactions"]][:4]):
            q, a = encode_texts(tokenizer, [turn["query"], turn["answer"]])
            framed = frame_interaction(ids, q, a, max_length=64, truncate=True)
            full, labels = framed.input_ids, framed.labels
            x = torch.tensor([full])
            if taught[i][t]:
                logits = model(input_ids=x, stm_state=stm).logits[0, :-1]
                target = torch.tensor(labels[1:])
                nll += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
                tokens += int((target != -100).sum())
            stm = model.update_memory(stm, x, torch.ones_like(x))
    return nll, tokens


def test_supervised_term_is_the_reference_answer_cross_entropy(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.0, memory_reg_coef=0.0, supervised_coef=0.5,
                       curriculum_steps=[3], freeze_schedule={"memory_attention": 0})
    batch = _batch(trainer, mrl_data)
    model = trainer.model.eval()
    rows = [mrl_data[0], mrl_data[1]]  # batch rows 0-1 and 2-3 are their G=2 rollouts
    with torch.no_grad():
        _, _, _, supervised = trainer.replay(model, batch, supervised=True)
        nll, tokens = _reference_nll(model, mrl_tokenizer, rows, [[True] * 4] * 2)
    assert supervised.item() == pytest.approx(nll / tokens, rel=1e-4)
    # with zero advantages the loss is the supervised term alone, and it trains memory attention
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    trainer.apply_freeze(0)
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(0.5 * supervised.item(), rel=1e-4)
    loss.backward()
    memory_attention = trainer.component_parameters()["memory_attention"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in memory_attention)
    # only the rewarded turns
    trainer.args.supervised_turns = "rewarded"
    with torch.no_grad():
        _, _, _, rewarded = trainer.replay(model.eval(), batch, supervised=True)
        nll, tokens = _reference_nll(model, mrl_tokenizer, rows, batch["scored"][[0, 2]].tolist())
    assert tokens > 0 and rewarded.item() == pytest.approx(nll / tokens, rel=1e-4)
    # off by default: no reference tensors, no term
    plain = _trainer(tmp_path / "plain", mrl_data, mrl_tokenizer, kl_coef=0.0, curriculum_steps=[3])
    assert "ref_ids" not in _batch(plain, mrl_data)


def test_freeze_schedule_memory_first(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, max_steps=8, kl_coef=0.0)
    assert trainer.trainable_components(0) == ["memory_attention"]
    assert set(trainer.trainable_components(2)) == {"decoder", "memory_cross_attention", "memory_attention", "encoder"}


def test_tiny_run_logs_metrics_saves_and_resumes(tmp_path, mrl_data, mrl_tokenizer):
    out = tmp_path / "run"
    trainer = _trainer(out, mrl_data, mrl_tokenizer, max_steps=3, save_strategy="steps", save_steps=2,
                       stm_reset_probability=0.5, curriculum_steps=[1, 2, 3], own_answers_from_stage=2,
                       freeze_schedule={"memory_attention": 0, "decoder": 1, "encoder": 1})
    before = {k: v.clone() for k, v in trainer.model.model.memory_attention.state_dict().items()}
    _quiet_train(trainer)
    logs = [rec for rec in trainer.state.log_history if "loss" in rec]
    assert len(logs) == 3
    for rec in logs:
        for key in ("rewards/reference_bleu/mean", "rewards/reference_bleu/std", "rewards/length/mean",
                    "reward", "reward_std", "kl", "stm_change", "clip_fraction", "answer_length", "policy_loss",
                    "memory_loss", "curriculum/steps"):
            assert key in rec, key
        assert math.isfinite(rec["loss"])
    assert [rec["curriculum/steps"] for rec in logs] == [1, 2, 3]
    after = trainer.model.model.memory_attention.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = out / "checkpoint-2"
    assert ckpt.is_dir()
    # resume from the step-2 checkpoint: training continues at step 2 and ends at 3
    resumed = _trainer(out, mrl_data, mrl_tokenizer, max_steps=3, save_strategy="no", stm_reset_probability=0.5,
                       curriculum_steps=[1, 2, 3], own_answers_from_stage=2,
                       freeze_schedule={"memory_attention": 0, "decoder": 1, "encoder": 1})
    _quiet_train(resumed, resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3
    new_logs = [rec for rec in resumed.state.log_history if "loss" in rec]
    assert new_logs[-1]["step"] == 3 and new_logs[-1]["curriculum/steps"] == 3
    # the final model saves and reloads
    resumed.save_model(str(out / "final"))
    reloaded = RxTForCausalLM.from_pretrained(str(out / "final"))
    assert isinstance(reloaded, RxTForCausalLM)
    assert os.path.isfile(out / "final" / "config.json")
    json.loads((out / "final" / "config.json").read_text())


# --- memory-aware critic ----------------------------------------------------------------------------------


def test_critic_advantages_and_explained_variance():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    values = torch.tensor([0.5, 0.5, 1.0, 1.0])
    raw = critic_advantages(rewards, values, scale_rewards="none")
    assert torch.allclose(raw, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # a group with equal rewards keeps reward - V (no division by its zero std)
    scaled = critic_advantages(rewards, values, scale_rewards="group")
    assert torch.allclose(scaled, raw / (rewards.std() + 1e-4))
    with_nan = critic_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2), scale_rewards="none")
    assert with_nan.tolist() == [1.0, 0.0]
    assert explained_variance(rewards, rewards) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), rewards.mean().item()), rewards) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        critic_advantages(rewards, values[:2])


def test_critic_reads_the_memory_and_copies_no_weights(mrl_tokenizer):
    policy = _model(mrl_tokenizer)
    critic = MemoryAwareCritic(policy)
    torch.nn.init.normal_(critic.value_head.weight, std=1.0)
    ids = torch.randint(5, len(mrl_tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    stm = policy.init_memory(2)
    other = stm + torch.randn_like(stm)
    values = critic(ids, mask, stm)
    assert values.shape == (2,)
    assert not torch.allclose(values, critic(ids, mask, other))  # V depends on the STM
    # own parameters: training the critic leaves the policy untouched
    assert all(p.data_ptr() != q.data_ptr() for p in critic.parameters() for q in policy.parameters())


def test_critic_advantage_run_fits_the_critic_and_checkpoints_it(tmp_path, mrl_data, mrl_tokenizer):
    out = tmp_path / "critic"
    kw = dict(max_steps=3, save_strategy="steps", save_steps=2, advantage_estimator="critic",
              critic_learning_rate=1e-2, critic_epochs=2, curriculum_steps=[1, 3], kl_coef=0.0)
    trainer = _trainer(out, mrl_data, mrl_tokenizer, **kw)
    head_before = trainer.critic.value_head.bias.detach().clone()
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = _batch(trainer, mrl_data, step=1)
    # the advantages are reward - V, not centred per group: V started at 0, so they carry the rewards' sign
    assert not torch.equal(trainer.critic.value_head.bias.detach(), head_before)  # fitted on this round
    assert batch["advantages"][batch["scored"]].ge(0).all()
    assert all(torch.equal(policy_before[k], v) for k, v in trainer.model.state_dict().items())
    _quiet_train(trainer)
    logs = [rec for rec in trainer.state.log_history if "loss" in rec]
    assert all(k in logs[-1] for k in ("critic/loss", "critic/value_mean", "critic/explained_variance"))
    ckpt = out / "checkpoint-2"
    assert (ckpt / "critic.pt").is_file()
    saved = torch.load(ckpt / "critic.pt", weights_only=True)["critic"]
    resumed = _trainer(out, mrl_data, mrl_tokenizer, **{**kw, "save_strategy": "no"})
    assert resumed.load_critic(str(ckpt))
    assert all(torch.equal(saved[k], v) for k, v in resumed.critic.state_dict().items())
    _quiet_train(resumed, resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3


def test_shared_memory_update_matches_per_row_updates(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.0)
    batch = _batch(trainer, mrl_data, step=1)
    assert batch["memory_group"].tolist() == [0, 0, 1, 1]  # reference answers in memory: one STM per conversation
    model = trainer.model
    shared_lp, _, shared_mse, _ = trainer.replay(model, batch)
    alone_lp, _, alone_mse, _ = trainer.replay(model, {**batch, "memory_group": None})
    assert torch.allclose(shared_lp, alone_lp, atol=1e-5) and torch.allclose(shared_mse, alone_mse, atol=1e-6)
    # after TRL's shuffling the groups are found by id, not by position
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = {k: v[perm] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    assert torch.allclose(trainer.replay(model, shuffled)[0], shared_lp[perm], atol=1e-5)
    # own answers in memory: every rollout keeps its own STM
    own = _trainer(tmp_path / "own", mrl_data, mrl_tokenizer, kl_coef=0.0, own_answers_from_stage=0)
    assert _batch(own, mrl_data, step=1)["memory_group"].tolist() == [0, 1, 2, 3]


def test_lora_run_trains_only_adapters(tmp_path, mrl_data, mrl_tokenizer):
    from rxt_hf.trainers.rxrlhf_trainer import decoder_lora_config

    model = _model(mrl_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MRLTrainer(model, args=_args(tmp_path, max_steps=3, kl_coef=0.05, learning_rate=1e-2),
                         train_dataset=mrl_data, processing_class=mrl_tokenizer, peft_config=decoder_lora_config(r=4))
    _quiet_train(trainer)
    kls = [rec["kl"] for rec in trainer.state.log_history if "loss" in rec]
    assert kls[0] == 0.0 and kls[-1] > 0  # the "previous" snapshot (a copy with adapters) follows the policy
    trained = trainer.accelerator.unwrap_model(trainer.model)
    named = dict(trained.named_parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in named.items())
    lora_moved = any(not torch.allclose(p, torch.zeros_like(p)) for n, p in named.items() if "lora_B" in n)
    assert lora_moved  # lora_B starts at zero
    base = trained.get_base_model().state_dict()
    for key, value in before.items():
        peft_key = next((k for k in base if k.replace(".base_layer", "") == key), None)
        assert peft_key is not None and torch.equal(base[peft_key], value), key


# --- public API only, data order, resume, evaluation ---------------------------------------------------------


def test_mrl_trainer_uses_no_private_trl_or_transformers_member():
    """MRLTrainer overrides no `_`-prefixed method of TRL or transformers, its methods touch no `self._x` those
    libraries define (nor any `obj._x` at all), and the module imports no private name from them."""
    from transformers import Trainer
    from trl import GRPOConfig, GRPOTrainer

    assert issubclass(MRLConfig, GRPOConfig) and issubclass(MRLTrainer, Trainer)
    library = {c for c in (*MRLTrainer.__mro__, *GRPOTrainer.__mro__)
               if c.__module__.split(".")[0] in ("transformers", "trl")}
    assert Trainer in library and GRPOTrainer in library
    private = {name for c in library for name in vars(c) if name.startswith("_") and not name.endswith("__")}
    for c in library:  # private attributes the libraries set on the trainer (self._x = ...) or read
        private |= set(re.findall(r"self\.(_[A-Za-z]\w*)", inspect.getsource(c)))
    assert {"_prepare_inputs", "_generate_and_score_completions", "_compute_loss", "_metrics",
            "_get_train_sampler", "_save_checkpoint"} <= private  # the walk does find them
    own = {name for name in vars(MRLTrainer) if not (name.startswith("__") and name.endswith("__"))}
    assert not own & private, sorted(own & private)
    assert not [name for name in own if name.startswith("_")]
    tree = ast.parse(textwrap.dedent(inspect.getsource(MRLTrainer)))
    accessed = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    underscored = {name for name in accessed if name.startswith("_") and not name.endswith("__")}
    assert not underscored, sorted(underscored)  # no self._x, super()._x, self.accelerator._x, ...
    assert {"rollout_buffer", "step_metrics", "accelerator"} <= accessed  # the walk does see attribute access
    for name, value in vars(mrl_trainer).items():
        origin = getattr(value, "__module__", None) or ""
        if origin.split(".")[0] in ("trl", "transformers", "accelerate"):
            assert not name.startswith("_") and not getattr(value, "__name__", "x").startswith("_"), name


def test_data_order_is_grpo_repeat_sampling(tmp_path, mrl_data, mrl_tokenizer):
    trainer = _trainer(tmp_path, mrl_data, mrl_tokenizer, kl_coef=0.0, gradient_accumulation_steps=2,
                       num_iterations=2)
    assert trainer.args.steps_per_generation == 2
    loader = trainer.get_train_dataloader()
    batches = [b for _, b in zip(range(4), loader)]
    assert all(len(b) == 8 for b in batches)  # per_device_train_batch_size x steps_per_generation rows
    ids = [[row["conversation_id"] for row in b] for b in batches]
    assert all(b[0::2] == b[1::2] for b in ids)  # each conversation twice in a row (num_generations=2)
    assert ids[0] == ids[1] == ids[2] == ids[3]  # one generation batch for num_iterations x steps_per_generation


def _final_weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(tmp_path, mrl_data, mrl_tokenizer):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, curriculum_steps=[1, 2], kl_reference="initial",
              gradient_accumulation_steps=2, freeze_schedule={"memory_attention": 0, "decoder": 2})
    whole = _trainer(tmp_path / "whole", mrl_data, mrl_tokenizer, **kw)
    _quiet_train(whole)
    ckpt = tmp_path / "whole" / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(ckpt))
    resumed = _trainer(tmp_path / "whole", mrl_data, mrl_tokenizer, **{**kw, "save_strategy": "no"})
    _quiet_train(resumed, resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    expected, got = _final_weights(whole), _final_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (whole, resumed)]
    assert losses[0] == losses[1]


def test_evaluate_rolls_out_and_logs_eval_metrics(tmp_path, mrl_data, mrl_tokenizer):
    trainer = MRLTrainer(_model(mrl_tokenizer), args=_args(tmp_path, kl_coef=0.0, per_device_eval_batch_size=4),
                         train_dataset=mrl_data, eval_dataset=mrl_data.select(range(4)),
                         processing_class=mrl_tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_reward"])
    assert "eval_rewards/reference_bleu/mean" in metrics and "eval_stm_change" in metrics
    assert not trainer.step_metrics["eval"]  # flushed into the record


def test_reward_functions_must_be_callables(tmp_path, mrl_data, mrl_tokenizer):
    with pytest.raises(TypeError, match="RewardModelReward"):
        MRLTrainer(_model(mrl_tokenizer), reward_funcs=["some/reward-model"], args=_args(tmp_path, kl_coef=0.0),
                   train_dataset=mrl_data, processing_class=mrl_tokenizer)
    with pytest.raises(ValueError, match="reward_weights"):
        MRLTrainer(_model(mrl_tokenizer), args=_args(tmp_path, kl_coef=0.0, reward_weights=[1.0]),
                   train_dataset=mrl_data, processing_class=mrl_tokenizer)
