"""RxRLHF (stage 6): memory-aware DPO loss by hand, STM isolation, frozen reference, LoRA, data validation,
embedded preference data, public TRL / transformers API only, resume, the online (reward-model) variant and the
recipe path."""

import ast
import contextlib
import inspect
import io
import json
import math
import re
import textwrap

import pytest
import torch
import yaml
from datasets import Dataset

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, special_token_ids
from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer
from rxt_hf.trainers.preference_data import (
    build_preference_dataset,
    load_preference_dataset,
    preference_to_multi_turn,
    validate_preference_rows,
)
from rxt_hf.trainers.rxrlhf_trainer import (
    PreferenceCollator,
    RxRLHFConfig,
    RxRLHFTrainer,
    decoder_lora_config,
    evaluate_preferences,
    preference_loss,
    score_conversations,
)

MAX_LEN = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pref_data():
    return build_preference_dataset(num_conversations=40, num_turns=3, max_recall_distance=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer(pref_data):
    texts = [t[k] for r in pref_data["train"] for t in r["interactions"] for k in ("query", "chosen", "rejected")]
    return build_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=MAX_LEN)


def _model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer), **special_token_ids(tokenizer), **overrides)
    return RxTForCausalLM(config)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=MAX_LEN,
                use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    base.update(kw)
    return RxRLHFConfig(**base)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


CONVERSATIONS = [  # hand-built: two conversations of different lengths
    {"interactions": [
        {"query": "I put the brass lantern in the old mill.", "chosen": "Okay, I will remember that.",
         "rejected": "I will not remember that."},
        {"query": "What is 3 plus 4?", "chosen": "3 plus 4 is 7.", "rejected": "3 plus 4 is 9."},
        {"query": "Where did I put the brass lantern?", "chosen": "You put the brass lantern in the old mill.",
         "rejected": "You put the brass lantern in the dusty barn."},
    ], "conversation_id": "a"},
    {"interactions": [
        {"query": "My sister is called Talia.", "chosen": "Noted, I will remember it.",
         "rejected": "I do not care about that."},
        {"query": "What is my sister called?", "chosen": "Your sister is called Talia.",
         "rejected": "You never told me that."},
    ], "conversation_id": "b"},
]


def _framed(tokenizer, query, answer):
    """``[BOS][Q] query [A] answer [EOS]`` built by hand, and the index where the answer starts."""
    ids = special_token_ids(tokenizer)
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    prefix = [ids["bos_token_id"], ids["query_token_id"], *q, ids["answer_token_id"]]
    return prefix + a + [ids["eos_token_id"]], len(prefix)


@torch.no_grad()
def _hand_scores(model, tokenizer, conversation):
    """Per turn (logp chosen, logp rejected, chosen tokens), one conversation alone, one sequence at a time."""
    stm = model.init_memory(1)
    out = []
    for turn in conversation["interactions"]:
        values = []
        for key in ("chosen", "rejected"):
            seq, start = _framed(tokenizer, turn["query"], turn[key])
            logits = model(input_ids=torch.tensor([seq]), stm_state=stm, use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            values.append(sum(float(logp[i - 1, seq[i]]) for i in range(start, len(seq))))
        chosen_seq, start = _framed(tokenizer, turn["query"], turn["chosen"])
        out.append((values[0], values[1], len(chosen_seq) - start))
        stm = model.update_memory(stm, torch.tensor([chosen_seq]))
    return out


# --- loss ------------------------------------------------------------------------------------------------


def test_preference_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.5, -2.0]), torch.tensor([-4.0, -5.0, -6.5])
    rc, rr = torch.tensor([-3.5, -5.0, -2.5]), torch.tensor([-3.8, -5.2, -6.0])
    nc, nr = torch.tensor([4.0, 6.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])
    beta, eps = 0.5, 0.1

    def logsig(x):
        return -math.log1p(math.exp(-x))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    pairs = list(zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist()))
    dpo = sum(-(1 - eps) * logsig(beta * ((a - c) - (b - d))) - eps * logsig(-beta * ((a - c) - (b - d)))
              for a, b, c, d, _, _ in pairs) / 3
    apo = sum(1 - sig(beta * (a - c)) + sig(beta * (b - d)) for a, b, c, d, _, _ in pairs) / 3
    ipo = sum(((a - c) / n - (b - d) / m - 1 / (2 * beta)) ** 2 for a, b, c, d, n, m in pairs) / 3
    sft = -sum(pc.tolist()) / sum(nc.tolist())
    kw = dict(beta=beta, label_smoothing=eps, chosen_lengths=nc, rejected_lengths=nr)
    for types, weights, expected in ((["sigmoid"], None, dpo), (["apo_zero"], None, apo), (["ipo"], None, ipo),
                                     (["sigmoid", "sft"], [1.0, 0.3], dpo + 0.3 * sft)):
        loss, stats = preference_loss(pc, pr, rc, rr, loss_types=types, loss_weights=weights, **kw)
        assert loss.item() == pytest.approx(expected, rel=1e-6), types
    assert torch.allclose(stats["margins"], beta * ((pc - rc) - (pr - rr)))
    # no label smoothing: the plain DPO loss; identical policy and reference: log 2 per pair
    loss, _ = preference_loss(pc, pr, pc, pr, beta=beta)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_trainer_loss_on_hand_built_batch_matches_hand_computation(tmp_path, tokenizer):
    model = _model(tokenizer, decoder_feed_forward="dense")  # no MoE aux loss in the hand computation
    args = _args(tmp_path, beta=0.5, label_smoothing=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    trainer = RxRLHFTrainer(model, args=args, train_dataset=Dataset.from_list(CONVERSATIONS),
                            processing_class=tokenizer)
    with torch.no_grad():  # move the policy away from the (frozen copy) reference
        gen = torch.Generator().manual_seed(1)
        for p in trainer.model.model.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["pair_input_ids"].shape[:3] == (2, 3, 2)
    loss = trainer.compute_loss(trainer.model, batch)

    beta, eps = 0.5, 0.1
    dpo_terms, chosen_sum, chosen_tokens = [], 0.0, 0
    for conversation in CONVERSATIONS:
        policy = _hand_scores(trainer.model, tokenizer, conversation)
        ref = _hand_scores(trainer.ref_model, tokenizer, conversation)
        for (pc, pr, n), (rc, rr, _) in zip(policy, ref):
            d = beta * ((pc - rc) - (pr - rr))
            dpo_terms.append((1 - eps) * math.log1p(math.exp(-d)) + eps * math.log1p(math.exp(d)))
            chosen_sum += pc
            chosen_tokens += n
    assert len(dpo_terms) == 5  # 3 + 2 turns: the padded third turn of the second conversation is no pair
    expected = sum(dpo_terms) / len(dpo_terms) + 0.3 * (-chosen_sum / chosen_tokens)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert abs(sum(dpo_terms) / 5 - math.log(2)) > 1e-3  # the margins are really non-zero


# --- memory isolation ---------------------------------------------------------------------------------------


def test_stm_used_for_scoring_holds_only_the_chosen_history(tmp_path, tokenizer):
    model = _model(tokenizer)
    trainer = RxRLHFTrainer(model, args=_args(tmp_path), train_dataset=Dataset.from_list(CONVERSATIONS),
                            processing_class=tokenizer)
    framed = {}  # token tuple -> (conversation, turn, "chosen" / "rejected")
    for c, conversation in enumerate(CONVERSATIONS):
        for t, turn in enumerate(conversation["interactions"]):
            for key in ("chosen", "rejected"):
                framed[tuple(_framed(tokenizer, turn["query"], turn[key])[0])] = (c, t, key)

    # expected STM of turn k: a fresh STM updated with the chosen interactions of turns < k, each conversation alone
    def expected_stm(net, c, k):
        backbone = net.model  # not the spied wrapper
        stm = backbone.init_memory(1)
        with torch.no_grad():
            for turn in CONVERSATIONS[c]["interactions"][:k]:
                seq = _framed(tokenizer, turn["query"], turn["chosen"])[0]
                stm = backbone.update_memory(stm, torch.tensor([seq]))
        return stm[0]

    def spy(net, log):
        update, forward = net.update_memory, net.forward

        def spy_update(stm, ids, mask=None):
            log.append(("update", [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)]))
            return update(stm, ids, mask)

        def spy_forward(*a, **kw):
            rows = [tuple(r[m.bool()].tolist()) for r, m in zip(kw["input_ids"], kw["attention_mask"])]
            log.append(("forward", rows, kw["stm_state"].detach().clone()))
            return forward(*a, **kw)

        net.update_memory, net.forward = spy_update, spy_forward

    policy_log, ref_log = [], []
    spy(trainer.model, policy_log)
    spy(trainer.ref_model, ref_log)
    batch = trainer.data_collator(list(trainer.train_dataset))
    trainer.compute_loss(trainer.model, batch)

    for net, log in ((trainer.model, policy_log), (trainer.ref_model, ref_log)):
        written: dict[int, int] = {0: 0, 1: 0}  # conversation -> turns written into its memory so far
        forwards = 0
        for entry in log:
            if entry[0] == "update":
                for seq in entry[1]:
                    c, t, key = framed[seq]
                    assert key == "chosen", "a rejected answer was written into memory"
                    assert t == written[c], "memory written out of turn order"
                    written[c] += 1
                continue
            _, rows, stm = entry
            forwards += 1
            for i, seq in enumerate(rows):
                c, k, _ = framed[seq]
                assert written[c] == k, f"turn {k} scored with {written[c]} turns in memory"
                assert torch.allclose(stm[i], expected_stm(net, c, k), atol=1e-5)
        assert forwards == 3  # one batched forward per turn: chosen and rejected read the same STM
        assert written == {0: 2, 1: 1}  # the last turn of each conversation is never written
    # memory writing frozen (default): the reference reads exactly the policy's STM
    policy_stms = [e[2] for e in policy_log if e[0] == "forward"]
    ref_stms = [e[2] for e in ref_log if e[0] == "forward"]
    assert all(torch.equal(a, b) for a, b in zip(policy_stms, ref_stms))


def test_gradients_reach_the_memory_system_when_it_trains(tmp_path, tokenizer):
    args = _args(tmp_path, trainable_components=["decoder", "memory_cross_attention", "memory_attention", "encoder"])
    trainer = RxRLHFTrainer(_model(tokenizer), args=args, train_dataset=Dataset.from_list(CONVERSATIONS),
                            processing_class=tokenizer)
    assert not any(p.requires_grad for p in trainer.model.model.embed_tokens.parameters())
    batch = trainer.data_collator(list(trainer.train_dataset))
    trainer.compute_loss(trainer.model, batch).backward()
    for part in (trainer.model.model.memory_attention, trainer.model.model.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_turn_scores_depend_only_on_the_chosen_history(tokenizer):
    model = _model(tokenizer).eval()
    collator = PreferenceCollator(tokenizer, max_length=MAX_LEN)

    def scores(conversation):
        with torch.no_grad():
            return score_conversations(model, collator([conversation]))

    base = scores(CONVERSATIONS[0])
    changed = json.loads(json.dumps(CONVERSATIONS[0]))
    changed["interactions"][0]["rejected"] = "Why would I remember that?"  # an earlier rejected answer
    changed["interactions"][1]["rejected"] = "Ask someone else."
    changed["interactions"][2]["chosen"] = "You put it in the old mill."  # the scored turn's other answer
    other = scores(changed)
    assert torch.equal(other.chosen_logps[0, :2], base.chosen_logps[0, :2])
    assert torch.equal(other.rejected_logps[0, 2], base.rejected_logps[0, 2])  # same STM, same rejected answer
    changed = json.loads(json.dumps(CONVERSATIONS[0]))
    changed["interactions"][1]["chosen"] = "It is 7."  # an earlier chosen answer: it is in the memory
    other = scores(changed)
    assert torch.equal(other.chosen_logps[0, 0], base.chosen_logps[0, 0])
    assert not torch.allclose(other.chosen_logps[0, 2], base.chosen_logps[0, 2])


# --- reference, training, LoRA ------------------------------------------------------------------------------


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_reference_is_frozen_and_only_the_decoder_trains(tmp_path, tokenizer, pref_data):
    model = _model(tokenizer)
    trainer = RxRLHFTrainer(model, args=_args(tmp_path, learning_rate=1e-2), train_dataset=pref_data["train"],
                            processing_class=tokenizer)
    ref = trainer.ref_model
    assert ref is not trainer.model and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    ref_before, policy_before = _snapshot(ref), _snapshot(trainer.model)
    _quiet(trainer.train)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert _changed(ref_before, ref) == []
    changed = _changed(policy_before, trainer.model)
    assert any(k.startswith("model.decoder.") for k in changed)
    # the memory writing (encoder, memory attention, shared embedding) is not trained by default
    assert not [k for k in changed if k.startswith(("model.encoder.", "model.memory_attention.", "model.embed"))]
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logps/accuracies"):
        assert key in logs[0] and math.isfinite(logs[-1][key])


def test_lora_trains_only_adapters_and_saves_a_merged_model(tmp_path, tokenizer, pref_data):
    model = _model(tokenizer)
    trainer = RxRLHFTrainer(model, args=_args(tmp_path, lora_r=4, learning_rate=1e-2),
                            train_dataset=pref_data["train"], processing_class=tokenizer)
    peft_model = trainer.model
    assert trainer.ref_model is None  # the reference is the model with its adapters disabled
    adapters = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
    assert all(".decoder.layers." in n and (".self_attn." in n or ".memory_cross_attn." in n) for n in adapters)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _quiet(trainer.train)
    changed = [n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all("lora_" in n for n in changed)
    # adapters disabled = the starting model: the evaluation's margins compare against it
    result = trainer.evaluate_preferences(list(pref_data["test"]) + list(pref_data["validation"]), batch_size=1)
    assert result["num_pairs"] > 0 and result["mean_margin"] != 0.0
    folder = trainer.save_rxt_model(str(tmp_path / "merged"))
    reloaded = RxTForCausalLM.from_pretrained(folder).eval()
    batch = PreferenceCollator(tokenizer, MAX_LEN)(list(pref_data["test"])[:2])
    with torch.no_grad():
        merged = score_conversations(reloaded, batch).chosen_logps
        live = score_conversations(peft_model.eval(), batch).chosen_logps
    assert torch.allclose(merged, live, atol=1e-4)
    history = json.loads((tmp_path / "merged" / "rxt_training_history.json").read_text())
    assert history[-1]["stage"] == "rxrlhf" and history[-1]["config"]["lora_r"] == 4
    assert "rxrlhf" in (tmp_path / "merged" / "README.md").read_text()


def test_evaluate_preferences_against_itself_and_trained(tmp_path, tokenizer, pref_data):
    model = _model(tokenizer).eval()
    same = evaluate_preferences(model, model, pref_data["test"], tokenizer, batch_size=2)
    assert same["preference_accuracy"] == 0.0 and same["mean_margin"] == 0.0  # no margin against itself
    assert same["num_pairs"] == sum(len(r["interactions"]) for r in pref_data["test"])
    assert 0.0 <= same["logp_accuracy"] <= 1.0
    assert set(same["by_rejection_type"]) <= {"contradicts", "ignores", "unhelpful", "incorrect"}
    counts = sum(v["count"] for v in same["by_rejection_type"].values())
    assert counts == same["num_pairs"]


def test_a_given_peft_model_is_its_own_reference_through_a_ref_adapter(tmp_path, tokenizer):
    from peft import get_peft_model

    peft_model = get_peft_model(_model(tokenizer), decoder_lora_config(r=4))
    with torch.no_grad():  # trained-looking adapters: the reference is this model, not the base model
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    trainer = RxRLHFTrainer(peft_model, args=_args(tmp_path), train_dataset=Dataset.from_list(CONVERSATIONS),
                            processing_class=tokenizer)
    assert trainer.ref_model is None and "ref" in peft_model.peft_config
    batch = trainer.data_collator(list(trainer.train_dataset))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        policy = score_conversations(peft_model.eval(), batch)
        with peft_model.disable_adapter():
            base = score_conversations(peft_model, batch)
    assert torch.allclose(ref_chosen, policy.chosen_logps) and torch.allclose(ref_rejected, policy.rejected_logps)
    assert not torch.allclose(ref_chosen, base.chosen_logps)


# --- public API only, resume --------------------------------------------------------------------------------


def _library_private_names(*classes) -> set[str]:
    """`_`-prefixed (not dunder) names the TRL / transformers classes among `classes`' MROs define or set on self."""
    library = {c for klass in classes for c in klass.__mro__ if c.__module__.split(".")[0] in ("transformers", "trl")}
    private = {name for c in library for name in vars(c) if name.startswith("_") and not name.endswith("__")}
    for c in library:
        private |= set(re.findall(r"self\.(_[A-Za-z]\w*)", inspect.getsource(c)))
    return private


def test_rxrlhf_trainers_use_no_private_trl_or_transformers_member():
    """RxRLHFTrainer and RxRLHFOnlineTrainer (walking their MROs: every class of this project) override no
    `_`-prefixed method or attribute that TRL or transformers define, their source touches no `obj._x` at all, and
    their modules import no private name from TRL / transformers / accelerate."""
    from transformers import Trainer
    from trl import DPOConfig, DPOTrainer, GRPOTrainer

    from rxt_hf.trainers import rxrlhf_online, rxrlhf_trainer
    from rxt_hf.trainers.rxrlhf_online import RxRLHFOnlineTrainer

    assert issubclass(RxRLHFConfig, DPOConfig) and issubclass(RxRLHFTrainer, Trainer)
    assert not issubclass(RxRLHFTrainer, DPOTrainer) and not issubclass(RxRLHFOnlineTrainer, GRPOTrainer)
    private = _library_private_names(RxRLHFTrainer, RxRLHFOnlineTrainer, DPOTrainer, GRPOTrainer)
    assert {"_prepare_dataset", "_set_signature_columns_if_needed", "_compute_loss", "_metrics", "_prepare_inputs",
            "_save_checkpoint", "_tag_names", "_remove_unused_columns"} <= private  # the walk does find them
    for trainer_class in (RxRLHFTrainer, RxRLHFOnlineTrainer):
        ours = [c for c in trainer_class.__mro__ if c.__module__.startswith("rxt_hf.")]
        assert trainer_class in ours and len(ours) >= 2  # the class and the stage mixin (and MRLTrainer)
        for klass in ours:
            own = {name for name in vars(klass) if not (name.startswith("__") and name.endswith("__"))}
            assert not own & private, (klass.__name__, sorted(own & private))
        tree = ast.parse(textwrap.dedent(inspect.getsource(trainer_class)))
        accessed = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert "accelerator" in accessed or trainer_class is RxRLHFOnlineTrainer  # the walk sees attribute access
        assert not [a for a in accessed if a.startswith("_") and not a.endswith("__")], trainer_class.__name__
    for module in (rxrlhf_trainer, rxrlhf_online):
        tree = ast.parse(inspect.getsource(module))
        accessed = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not [a for a in accessed if a.startswith("_") and not a.endswith("__")], module.__name__
        for name, value in vars(module).items():
            origin = getattr(value, "__module__", None) or getattr(value, "__name__", "")
            if origin.split(".")[0] in ("trl", "transformers", "accelerate"):
                assert not name.startswith("_") and not getattr(value, "__name__", "x").startswith("_"), name


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(tmp_path, tokenizer, pref_data):
    def trainer_for(save_strategy):
        args = _args(tmp_path, max_steps=4, save_strategy=save_strategy, save_steps=2, learning_rate=1e-2)
        return RxRLHFTrainer(_model(tokenizer), args=args, train_dataset=pref_data["train"],
                             processing_class=tokenizer)

    whole = trainer_for("steps")
    _quiet(whole.train)
    checkpoint = tmp_path / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    resumed = trainer_for("no")
    _quiet(resumed.train, resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (whole, resumed)]
    assert losses[0] == losses[1]  # the resumed state holds the first two records, then the same two steps


# --- data -----------------------------------------------------------------------------------------------------


def test_embedded_preference_data(pref_data):
    ids = {split: set(pref_data[split]["conversation_id"]) for split in pref_data}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    validate_preference_rows(pref_data)
    kinds = set()
    for row in pref_data["train"]:
        for turn, kind, keywords, distance in zip(row["interactions"], row["rejection_type"],
                                                  row["answer_keywords"], row["recall_distance"]):
            kinds.add(kind)
            assert turn["chosen"] != turn["rejected"]
            if distance > 0:  # recall: the chosen answer states the remembered fact, the rejected one does not
                words = " ".join(keywords)
                assert words in turn["chosen"] and words not in turn["rejected"]
                assert kind in ("contradicts", "ignores", "unhelpful")
    assert {"contradicts", "ignores", "unhelpful"} <= kinds
    again = build_preference_dataset(num_conversations=40, num_turns=3, max_recall_distance=2, seed=0)
    assert again["train"][0] == pref_data["train"][0]  # deterministic
    multi = preference_to_multi_turn(pref_data["test"])
    assert multi[0]["answer"] == pref_data["test"][0]["interactions"][0]["chosen"]


BAD_ROWS = [
    ([{"query": "q", "chosen": "a"}], "row 1 (conversation_id 'c1'), turn 0: 'rejected' is missing"),
    ([{"query": "q", "chosen": "a", "rejected": "b"}, {"query": "q2", "rejected": "b"}],
     "row 1 (conversation_id 'c1'), turn 1: 'chosen' is missing"),
    ([{"query": "  ", "chosen": "a", "rejected": "b"}], "row 1 (conversation_id 'c1'), turn 0: 'query' is empty"),
    ([], "row 1 (conversation_id 'c1'): 'interactions' is empty"),
    ([{"query": "q", "chosen": "same", "rejected": "same"}], "turn 0: 'chosen' and 'rejected' are the same"),
]


@pytest.mark.parametrize("turns, message", BAD_ROWS)
def test_bad_rows_fail_with_the_row_named(tmp_path, tokenizer, turns, message):
    good = {"interactions": [{"query": "q", "chosen": "a", "rejected": "b"}], "conversation_id": "c0"}
    rows = [good, {"interactions": turns, "conversation_id": "c1"}]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_preference_rows(rows)
    with pytest.raises(ValueError, match="train_dataset row 1"):  # the same check when the trainer prepares data
        RxRLHFTrainer(_model(tokenizer), args=_args(tmp_path), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)


def test_local_preference_files_are_loaded_and_validated(tmp_path):
    rows = [{"interactions": [{"query": "q", "chosen": "a", "rejected": "b"}]},
            {"interactions": [{"query": "q", "chosen": "a", "rejected": ""}]}]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    assert len(load_preference_dataset(str(path), split="train")) == 1
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"row 1, turn 0: 'rejected' is empty"):
        load_preference_dataset(str(path))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"turns": rows[0]["interactions"]}) + "\n")
    assert load_preference_dataset(str(renamed), column_mapping={"turns": "interactions"})["train"].num_rows == 1
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"interactions": [{"query": "q", "answer": "a"}]}) + "\n")
    with pytest.raises(ValueError, match="missing \\['chosen', 'rejected'\\]"):
        load_preference_dataset(str(wrong))


@pytest.mark.parametrize("bad", [dict(loss_type=["hinge"]), dict(label_smoothing=0.5), dict(beta=0.0),
                                 dict(precompute_ref_log_probs=True), dict(trainable_components=["head"]),
                                 dict(trainable_components=[]), dict(lora_r=0), dict(max_length=4),
                                 dict(remove_unused_columns=True)])
def test_bad_config_values_fail(tmp_path, bad):
    with pytest.raises(ValueError, match="RxRLHFConfig"):
        _args(tmp_path, **bad)


# --- online variant --------------------------------------------------------------------------------------------


def test_online_variant_with_a_reward_model(tmp_path, tokenizer, pref_data):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rxt_hf.trainers.rxrlhf_online import RewardModelReward, RxRLHFOnlineConfig, RxRLHFOnlineTrainer

    seen = []
    judge = RewardModelReward(lambda texts: seen.extend(texts) or [1.0] * len(texts), name="judge")
    assert judge(prompts=["Where is it?"], completions=["In the mill."], memory=["I put it in the mill. Okay."]) == [1.0]
    assert seen[0].startswith("I put it in the mill.") and seen[0].endswith("In the mill.")
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    args = RxRLHFOnlineConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                              num_generations=2, max_completion_length=4, curriculum_steps=[2], use_cpu=True,
                              disable_tqdm=True, save_strategy="no", seed=0)
    with pytest.raises(ValueError, match="needs reward_model"):
        RxRLHFOnlineTrainer(_model(tokenizer), args=args, train_dataset=pref_data["train"],
                            processing_class=tokenizer)
    trainer = RxRLHFOnlineTrainer(_model(tokenizer), args=args, train_dataset=pref_data["train"],
                                  processing_class=tokenizer, reward_model=reward_model, reward_tokenizer=tokenizer,
                                  reward_funcs=[judge])
    assert trainer.trainable_components(0) == ["decoder", "memory_cross_attention"]
    assert "answer" in trainer.train_dataset.column_names  # preference rows became multi-turn rows
    _quiet(trainer.train)
    log = trainer.state.log_history[0]
    assert "rewards/reward_model/mean" in log and "rewards/judge/mean" in log
    assert math.isfinite(log["rewards/reward_model/mean"]) and log["rewards/judge/mean"] == 1.0


# --- recipe ---------------------------------------------------------------------------------------------------


def test_shipped_recipe_is_valid():
    from rxt_hf.recipes.recipe import load_recipe

    recipe = load_recipe("recipes/rxrlhf.yaml")
    assert [s.trainer for s in recipe.stages] == ["rxrlhf"] and recipe.stages[0].data_kind == "preference"


def test_recipe_runs_the_rxrlhf_stage_from_a_saved_model(tmp_path, tokenizer):
    from rxt_hf.recipes.cli import main

    source = tmp_path / "smat"
    model = _model(tokenizer)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (source / "rxt_training_history.json").write_text(json.dumps([{"stage": "smat", "run_id": "x", "steps": 1}]))
    recipe = {
        "name": "tiny-rxrlhf", "seed": 0,
        "data": {"source": "synthetic", "num_conversations": 40, "num_turns": 3, "max_recall_distance": 2},
        "tokenizer": {"path": str(source)}, "model": {"from_pretrained": str(source)},
        "stages": [{"name": "rxrlhf", "trainer": "rxrlhf",
                    "config": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48,
                               "save_strategy": "no", "lora_r": 4, "disable_tqdm": True}}],
        "evaluation": {"num_conversations": 4, "num_turns": 3, "max_new_tokens": 4, "batch_size": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    _quiet(main, ["train", str(path), "--output", str(out), "--stages", "rxrlhf"])
    report = json.loads((out / "01-rxrlhf" / "preference_evaluation.json").read_text())
    assert report["before"]["preference_accuracy"] == 0.0  # the starting model has no margin over itself
    assert report["after"]["num_pairs"] == report["before"]["num_pairs"] > 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert "preference_accuracy_after_rxrlhf" in evaluation and "recall_accuracy" in evaluation
    history = json.loads((out / "final" / "rxt_training_history.json").read_text())
    assert [e["stage"] for e in history] == ["smat", "rxrlhf"]
    card = (out / "final" / "README.md").read_text()
    assert "rxrlhf" in card and "preference_accuracy_after_rxrlhf" in card
    assert isinstance(RxTForCausalLM.from_pretrained(out / "final"), RxTForCausalLM)
