"""MRL reward functions: TRL's reward-function call, value ranges, combined weights and logged components."""

import logging
import math
import types
from collections import defaultdict

import pytest
import sacrebleu
import torch
from torch import nn

from rxt_hf.trainers.rewards import (
    CombinedReward,
    embedding_similarity_reward,
    keyword_recall_reward,
    length_reward,
    make_bleu_reward,
    make_length_reward,
    memory_bleu_reward,
    reference_bleu_reward,
)

logging.getLogger("sacrebleu").setLevel(logging.ERROR)


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def sacre(cand, refs) -> float:
    return sacrebleu.sentence_bleu(words(cand), [words(r) for r in refs], tokenize="none").score / 100


def grpo_batch():
    """Four completions as GRPOTrainer hands them over: texts, id lists and per-row dataset columns."""
    completion_ids = [[5, 6, 7, 8, 9], [5, 6, 1, 2], [], [20, 21, 22]]
    reference_ids = [[5, 6, 7, 8, 9], [5, 6, 7, 8], [5, 6], [20, 21, 22, 23, 24, 25]]
    memory_ids = [[[5, 6, 7], [8, 9]], [5, 6, 1, 2, 3], None, [[30, 31]]]
    inputs = [
        {"prompt": f"q{i}", "reference_ids": r, "memory_ids": m, "answer": words(r)}
        for i, (r, m) in enumerate(zip(reference_ids, memory_ids))
    ]
    prompts = [x["prompt"] for x in inputs]
    completions = [words(c) for c in completion_ids]
    return inputs, prompts, completions, completion_ids


def call_like_grpo(reward_funcs, inputs, prompts, completions, completion_ids):
    """Run TRL 1.16's own ``GRPOTrainer._calculate_rewards`` on a minimal stand-in trainer."""
    from trl import GRPOTrainer
    from trl.trainer.utils import get_callable_name

    pending_metrics, pending_extra = defaultdict(list), defaultdict(list)
    fake = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=types.SimpleNamespace(report_to=[]),
        reward_funcs=reward_funcs,
        reward_processing_classes=[None] * len(reward_funcs),
        reward_func_names=[get_callable_name(f) for f in reward_funcs],
        state=types.SimpleNamespace(global_step=0),
        _log_completion_extra=lambda column, values: pending_extra[column].extend(values),
        _log_metric=lambda name, value: pending_metrics[name].append(value),
        environments=None,
    )
    rewards = GRPOTrainer._calculate_rewards(fake, inputs, prompts, completions, completion_ids)
    return rewards, fake.reward_func_names, pending_metrics


def test_rewards_run_inside_trl_calculate_rewards():
    inputs, prompts, completions, completion_ids = grpo_batch()
    emb = nn.Embedding(40, 8)
    funcs = [reference_bleu_reward, memory_bleu_reward, embedding_similarity_reward(emb), length_reward]
    combined = CombinedReward(
        weights={"bleu": 1.0, "memory": 0.5, "cos": 0.25, "len": 0.1},
        functions={"bleu": funcs[0], "memory": funcs[1], "cos": funcs[2], "len": funcs[3]},
    )
    rewards, names, metrics = call_like_grpo(funcs + [combined], inputs, prompts, completions, completion_ids)
    assert names == ["reference_bleu", "memory_bleu", "embedding_similarity", "length", "combined_reward"]
    assert rewards.shape == (4, 5)
    bleu, memory, cos, length, total = rewards.T
    assert bleu[0] == pytest.approx(1.0)  # perfect completion
    assert torch.all((bleu >= 0) & (bleu <= 1))
    assert math.isnan(memory[2])  # no remembered interaction for that row -> None -> NaN
    assert torch.all((memory[[0, 1, 3]] >= 0) & (memory[[0, 1, 3]] <= 1))
    assert torch.all((cos >= -1 - 1e-6) & (cos <= 1 + 1e-6)) and cos[0] == pytest.approx(1.0)
    assert length.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.5])
    expected = [
        sum(w * v for w, v in zip([1.0, 0.5, 0.25, 0.1], row) if not math.isnan(v)) for row in rewards[:, :4].tolist()
    ]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)
    assert set(metrics) == {f"rewards/{k}/mean" for k in ("bleu", "memory", "cos", "len")}


def test_bleu_rewards_agree_with_sacrebleu():
    _, prompts, completions, completion_ids = grpo_batch()
    inputs, *_ = grpo_batch()
    refs = [x["reference_ids"] for x in inputs]
    got = reference_bleu_reward(prompts, completions, completion_ids=completion_ids, reference_ids=refs)
    want = [sacre(c, [r]) for c, r in zip(completion_ids, refs)]
    assert got == pytest.approx(want, abs=1e-4)
    mems = [x["memory_ids"] for x in inputs]
    got = memory_bleu_reward(prompts, completions, completion_ids=completion_ids, memory_ids=mems)
    for i, (c, m) in enumerate(zip(completion_ids, mems)):
        if m is None:
            assert got[i] is None
            continue
        m = m if isinstance(m[0], list) else [m]  # several remembered interactions = several references
        assert got[i] == pytest.approx(sacre(c, m), abs=1e-4)


def test_text_fallback_and_conversational_completions():
    prompts = ["q", "q"]
    completions = [[{"role": "assistant", "content": "Ann lives in Paris"}], [{"role": "assistant", "content": "Bob"}]]
    got = reference_bleu_reward(prompts, completions, answer=["Ann lives in Paris", "Bob lives in Oslo"])
    assert got[0] == pytest.approx(1.0)
    assert 0.0 <= got[1] < 1.0
    lengths = length_reward(prompts, completions, answer=["Ann lives in Paris", "Bob lives in Oslo"])
    assert lengths == pytest.approx([1.0, 0.25])
    # only reference ids but no completion ids: falls back to a text column if present, else fails clearly
    with pytest.raises(KeyError):
        reference_bleu_reward(prompts, ["a", "b"], reference_ids=[[1], [2]])
    with pytest.raises(KeyError):
        memory_bleu_reward(prompts, ["a", "b"], completion_ids=[[1], [2]])


def test_ignore_ids_and_smoothing_options():
    eos = 99
    bleu = make_bleu_reward(ignore_ids=[eos], smoothing="none", name="bleu_plain")
    assert bleu.__name__ == "bleu_plain"
    assert bleu(["q"], ["x"], completion_ids=[[1, 2, 3, 4, eos]], reference_ids=[[1, 2, 3, 4]]) == [pytest.approx(1.0)]
    # without smoothing a short partial answer scores 0; exp smoothing grades it
    assert bleu(["q"], ["x"], completion_ids=[[1, 2, 7, 8]], reference_ids=[[1, 2, 3, 4]]) == [0.0]
    assert 0 < reference_bleu_reward(["q"], ["x"], completion_ids=[[1, 2, 7, 8]], reference_ids=[[1, 2, 3, 4]])[0] < 1
    with pytest.raises(ValueError):
        make_bleu_reward(smoothing="laplace")
    tolerant = make_length_reward(tolerance=2)
    assert tolerant(["q"], ["x"], completion_ids=[[1, 2]], reference_ids=[[1, 2, 3, 4]]) == [1.0]
    assert tolerant(["q"], ["x"], completion_ids=[[1] * 10], reference_ids=[[1, 2, 3, 4]]) == [0.0]


def test_embedding_similarity_reward():
    emb = nn.Embedding(10, 6)
    sim = embedding_similarity_reward(emb)
    out = sim(
        ["q"] * 3, ["a"] * 3, completion_ids=[[1, 2, 3], [3, 2, 1], []], reference_ids=[[1, 2, 3], [1, 2, 3], [4]]
    )
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(1.0)  # mean embedding ignores order
    assert out[2] == 0.0  # empty completion
    with torch.no_grad():  # follows the embedding as it trains
        emb.weight[4:].zero_()
        emb.weight[4, 0] = 1.0
        emb.weight[5, 0] = -1.0
    assert sim(["q"], ["a"], completion_ids=[[5]], reference_ids=[[4]]) == [pytest.approx(-1.0)]
    scaled = embedding_similarity_reward(emb.weight, rescale=True, name="cos01")
    assert scaled.__name__ == "cos01"
    assert scaled(["q"], ["a"], completion_ids=[[5]], reference_ids=[[4]]) == [pytest.approx(0.0, abs=1e-6)]
    with pytest.raises(KeyError):
        sim(["q"], ["a"], answer=["a"])


def test_combined_reward_weights_components_and_validation():
    def always(value):
        def fn(prompts, completions, **kwargs):
            return [value] * len(completions)

        return fn

    def half_missing(prompts, completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    combined = CombinedReward(
        {"a": 2.0, "b": -1.0, "c": 0.5}, {"a": always(0.5), "b": always(0.25), "c": half_missing}
    )
    out = combined(["p"] * 4, ["x"] * 4, completion_ids=[[1]] * 4)
    assert out == pytest.approx([2 * 0.5 - 0.25 + 0.5, 2 * 0.5 - 0.25] * 2)
    assert combined.last_components["a"] == [0.5] * 4
    assert combined.last_components["c"] == [1.0, None, 1.0, None]
    assert combined.last_total == out
    summary = combined.summary()
    assert summary["a"] == {"mean": 0.5, "std": 0.0} and summary["c"]["mean"] == 1.0
    logged = {}
    combined(["p"], ["x"], log_metric=lambda k, v: logged.__setitem__(k, v))
    assert logged == {"rewards/a/mean": 0.5, "rewards/b/mean": 0.25, "rewards/c/mean": 1.0}
    everything_missing = CombinedReward(
        {"c": 1.0}, {"c": lambda prompts, completions, **kw: [None] * len(completions)}
    )
    assert everything_missing(["p"], ["x"]) == [None]
    with pytest.raises(ValueError):
        CombinedReward({"a": 1.0, "zzz": 1.0}, {"a": always(1.0)})
    with pytest.raises(ValueError):
        CombinedReward({"a": 1.0}, {"a": always(1.0), "b": always(1.0)})
    with pytest.raises(ValueError):
        CombinedReward({"a": float("nan")}, {"a": always(1.0)})
    with pytest.raises(TypeError):
        CombinedReward({"a": 1.0}, {"a": 3})
    bad = CombinedReward({"a": 1.0}, {"a": lambda prompts, completions, **kw: [1.0]})
    with pytest.raises(ValueError):
        bad(["p", "p"], ["x", "y"])


def test_keyword_recall_reward_counts_whole_key_words():
    completions = ["You painted your bicycle crimson.", "It was crimson red", "a bicycle", "hello", "anything"]
    keywords = [["bicycle", "crimson"], ["crimson"], ["bicycle", "Crimson"], ["crimson"], []]
    assert keyword_recall_reward(None, completions, answer_keywords=keywords) == [1.0, 1.0, 0.5, 0.0, None]
    assert keyword_recall_reward(None, ["crimsonish"], answer_keywords=[["crimson"]]) == [0.0]  # whole words only
    assert keyword_recall_reward(None, [[{"role": "assistant", "content": "Old Mill"}]],
                                 answer_keywords=[["old mill"]]) == [1.0]
    with pytest.raises(KeyError, match="answer_keywords"):
        keyword_recall_reward(None, ["x"])
    with pytest.raises(ValueError, match="2 answer_keywords lists for 1 completions"):
        keyword_recall_reward(None, ["x"], answer_keywords=[[], []])
