"""TensorBLEU against sacrebleu on token sequences rendered as words (``f"w{id}"``, ``tokenize="none"``)."""

import logging
import math
import random

import pytest
import sacrebleu
import torch
from sacrebleu.metrics import BLEU

import rxt_hf.trainers.tensorbleu as tensorbleu
from rxt_hf.modeling_rxt.format_rxt import pad_rows
from rxt_hf.trainers.tensorbleu import (
    SMOOTHING_METHODS,
    TensorBLEU,
    bleu_statistics,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
)

logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # "recommended to enable effective_order" noise

TOL = 1e-4
SMOOTHINGS = sorted(SMOOTHING_METHODS)


def words(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def sacre_sentence(cand, refs, smoothing, smooth_value=None, effective_order=True, max_order=4) -> float:
    metric = BLEU(
        tokenize="none",
        smooth_method=smoothing,
        smooth_value=smooth_value,
        effective_order=effective_order,
        max_ngram_order=max_order,
    )
    return metric.sentence_score(words(cand), [words(r) for r in refs]).score / 100.0


def random_batch(rng: random.Random, batch: int, max_refs: int = 1, max_len: int = 14, vocab=None):
    """Candidates and per-row reference lists; small vocabularies give repeated n-grams and partial matches."""
    cands, refs = [], []
    for _ in range(batch):
        v = vocab or rng.choice([2, 3, 6, 40])
        n_refs = rng.randint(1, max_refs)
        ref_rows = [[rng.randrange(v) for _ in range(rng.randrange(0, max_len))] for _ in range(n_refs)]
        if rng.random() < 0.3:  # candidate derived from a reference: many higher-order matches
            base = list(rng.choice(ref_rows))
            cand = [t if rng.random() < 0.8 else rng.randrange(v) for t in base][: rng.randrange(0, len(base) + 2)]
        else:
            cand = [rng.randrange(v) for _ in range(rng.randrange(0, max_len))]
        cands.append(cand)
        refs.append(ref_rows)
    return cands, refs


def assert_matches_sacrebleu(cands, refs, **kw):
    smoothing = kw.get("smoothing", "none")
    got = tensor_sentence_bleu(cands, refs, dtype=torch.float64, **kw).tolist()
    want = [
        sacre_sentence(
            c,
            r,
            smoothing,
            kw.get("smooth_value"),
            kw.get("effective_order", True),
            kw.get("max_order", 4),
        )
        for c, r in zip(cands, refs)
    ]
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= TOL, f"row {i}: tensorbleu {g} vs sacrebleu {w}; cand={cands[i]} refs={refs[i]}"


@pytest.mark.parametrize("effective_order", [True, False])
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_random_batches_match_sacrebleu(smoothing, effective_order):
    rng = random.Random(hash((smoothing, effective_order)) % 1000)
    for _ in range(12):
        cands, refs = random_batch(rng, batch=16, max_refs=1)
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing, effective_order=effective_order)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_multiple_references_match_sacrebleu(smoothing):
    rng = random.Random(7)
    for _ in range(10):
        cands, refs = random_batch(rng, batch=12, max_refs=4)  # rows have 1..4 references
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing)


@pytest.mark.parametrize("smoothing,value", [("floor", 0.3), ("floor", 0.0), ("add-k", 2.0), ("add-k", 0.5)])
def test_smooth_values_match_sacrebleu(smoothing, value):
    rng = random.Random(3)
    for _ in range(6):
        cands, refs = random_batch(rng, batch=12, max_refs=2)
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing, smooth_value=value)


@pytest.mark.parametrize("max_order", [1, 2, 3, 5, 6, 8])
def test_other_max_orders_match_sacrebleu(max_order):
    rng = random.Random(max_order)
    for smoothing in SMOOTHINGS:
        cands, refs = random_batch(rng, batch=16, max_refs=2)
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing, max_order=max_order)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_edge_cases_match_sacrebleu(smoothing):
    cases = [
        ([], [[1, 2, 3]]),  # empty candidate
        ([1, 2, 3], [[]]),  # empty reference
        ([], [[]]),  # both empty
        ([5], [[5]]),  # single token, identical
        ([5, 6], [[5, 6, 7]]),  # shorter than the max order
        ([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5]]),  # identical
        ([1, 2, 3, 4, 5], [[6, 7, 8, 9]]),  # no overlap at all
        ([1, 1, 1, 1, 1, 1], [[1, 1]]),  # clipping of repeated unigrams
        ([1, 2, 1, 2, 1, 2], [[1, 2, 1, 2], [2, 1, 2]]),  # clipping by the max over references
        ([1, 2, 3, 4], [[4, 3, 2, 1]]),  # unigram matches only
        ([7, 8, 9], [[7, 8, 9, 1, 2, 3, 4, 5]]),  # brevity penalty
        ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9]]),  # closest-length tie -> shorter
        ([1, 2, 3, 4, 5, 6], [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5]]),  # tie at distance 1 -> shorter
    ]
    cands = [c for c, _ in cases]
    refs = [r for _, r in cases]
    for effective_order in (True, False):
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing, effective_order=effective_order)
        for c, r in cases:  # each alone too (the batch width changes which windows exist)
            assert_matches_sacrebleu([c], [r], smoothing=smoothing, effective_order=effective_order)


def test_whole_batch_shorter_than_max_order():
    cands = [[1], [2, 3], []]
    refs = [[[1]], [[2, 3]], [[4]]]
    for smoothing in SMOOTHINGS:
        assert_matches_sacrebleu(cands, refs, smoothing=smoothing)


def test_identical_scores_one_and_no_overlap_zero():
    x = torch.randint(0, 100, (5, 12))
    assert torch.allclose(tensor_sentence_bleu(x, x), torch.ones(5))
    assert torch.equal(tensor_sentence_bleu(x, x + 100), torch.zeros(5))


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_corpus_bleu_matches_sacrebleu(smoothing):
    rng = random.Random(11)
    for n_refs in (1, 3):
        cands, refs = random_batch(rng, batch=40, max_refs=1, max_len=20)
        extra = [[[rng.randrange(6) for _ in range(rng.randrange(1, 20))] for _ in range(n_refs - 1)] for _ in refs]
        refs = [[r[0]] + e for r, e in zip(refs, extra)]
        got = tensor_corpus_bleu(cands, refs, smoothing=smoothing, dtype=torch.float64).item()
        streams = [[words(r[k]) for r in refs] for k in range(n_refs)]
        want = sacrebleu.corpus_bleu([words(c) for c in cands], streams, smooth_method=smoothing, tokenize="none")
        assert abs(got - want.score / 100) <= TOL
        got_eff = tensor_corpus_bleu(cands, refs, smoothing=smoothing, effective_order=True).item()
        want_eff = sacrebleu.corpus_bleu(
            [words(c) for c in cands], streams, smooth_method=smoothing, tokenize="none", use_effective_order=True
        )
        assert abs(got_eff - want_eff.score / 100) <= TOL


def test_padding_is_ignored():
    pad = 0
    rng = random.Random(5)
    cands, refs = random_batch(rng, batch=10, max_refs=1, vocab=5)
    cands = [[t + 1 for t in c] for c in cands]  # ids 1..5, 0 is padding
    refs = [[[t + 1 for t in r] for r in rs] for rs in refs]
    cand_t, _ = pad_rows(cands, pad)
    ref_t, _ = pad_rows([r[0] for r in refs], pad)
    extra = torch.full((10, 3), pad)  # more padding than needed
    padded = tensor_sentence_bleu(
        torch.cat([cand_t, extra], 1), torch.cat([ref_t, extra], 1), pad_token_id=pad, smoothing="exp"
    )
    unpadded = tensor_sentence_bleu(cands, [r[0] for r in refs], smoothing="exp")
    assert torch.allclose(padded, unpadded, atol=1e-6)
    assert_matches_sacrebleu(cands, refs, smoothing="exp")
    # lengths come from the non-pad prefix: anything after the first pad is ignored
    c = torch.tensor([[1, 2, 3, 0, 1, 2, 3, 4]])
    r = torch.tensor([[1, 2, 3, 0, 9, 9, 9, 9]])
    assert tensor_sentence_bleu(c, r, pad_token_id=0).item() == pytest.approx(1.0)
    stats = bleu_statistics(c, r, pad_token_id=0)
    assert stats.candidate_length.tolist() == [3.0] and stats.reference_length.tolist() == [3.0]
    # explicit lengths override padding
    assert tensor_sentence_bleu(c, r, candidate_lengths=[2], reference_lengths=[[2]]).item() == pytest.approx(1.0)


def test_batch_equals_per_row_and_input_formats():
    rng = random.Random(9)
    cands, refs = random_batch(rng, batch=20, max_refs=3)
    for smoothing in SMOOTHINGS:
        batch = tensor_sentence_bleu(cands, refs, smoothing=smoothing, dtype=torch.float64)
        rows = torch.cat(
            [tensor_sentence_bleu([c], [r], smoothing=smoothing, dtype=torch.float64) for c, r in zip(cands, refs)]
        )
        assert torch.allclose(batch, rows, atol=1e-12)
        rows_dict = tensor_sentence_bleu(cands, refs, smoothing=smoothing, dictionary="rows", dtype=torch.float64)
        assert torch.allclose(batch, rows_dict, atol=1e-12)
    # [B, R, T] tensor references (all rows with R references), padding by explicit pad id
    x = torch.randint(1, 6, (6, 10))
    r3 = torch.randint(1, 6, (6, 2, 9))
    listed = [[r3[b, 0], r3[b, 1]] for b in range(6)]
    from_tensor = tensor_sentence_bleu(x, r3, smoothing="exp")
    assert torch.allclose(from_tensor, tensor_sentence_bleu(x, listed, smoothing="exp"))
    assert torch.allclose(from_tensor, tensor_sentence_bleu(list(x), list(r3), smoothing="exp"))


def test_weights():
    rng = random.Random(13)
    cands, refs = random_batch(rng, batch=30, max_refs=2, max_len=16)
    uniform = tensor_sentence_bleu(cands, refs, smoothing="exp", weights=[0.25] * 4)
    assert torch.allclose(uniform, tensor_sentence_bleu(cands, refs, smoothing="exp"), atol=1e-6)
    w = [0.4, 0.3, 0.2, 0.1]
    got = tensor_sentence_bleu(cands, refs, smoothing="exp", weights=w, dtype=torch.float64).tolist()
    metric = BLEU(tokenize="none", smooth_method="exp", effective_order=True)
    for g, c, r in zip(got, cands, refs):
        s = metric.sentence_score(words(c), [words(x) for x in r])
        if s.score == 0:
            assert g == 0
            continue
        used = [n for n in range(4) if s.totals[n] > 0]
        log_mean = sum(w[n] * math.log(s.precisions[n] / 100) for n in used) / sum(w[n] for n in used)
        assert abs(g - s.bp * math.exp(log_mean)) <= TOL
    # a zero weight removes an order: BLEU-2 weights equal max_order=2
    two = tensor_sentence_bleu(cands, refs, smoothing="floor", weights=[1, 1, 0, 0], effective_order=False)
    long_enough = [i for i, c in enumerate(cands) if len(c) >= 4]
    ref2 = tensor_sentence_bleu(cands, refs, smoothing="floor", max_order=2, effective_order=False)
    assert torch.allclose(two[long_enough], ref2[long_enough], atol=1e-6)


def test_callable_and_bad_arguments():
    x = torch.randint(0, 50, (4, 9))
    y = torch.randint(0, 50, (4, 9))
    bleu = TensorBLEU(smoothing="add-k")
    assert torch.allclose(bleu(x, y), tensor_sentence_bleu(x, y, smoothing="add-k"))
    corpus = TensorBLEU(smoothing="exp", corpus=True)
    assert corpus(x, y).dim() == 0
    with pytest.raises(ValueError):
        tensor_sentence_bleu(x, y, smoothing="laplace")
    with pytest.raises(ValueError):
        tensor_sentence_bleu(x, y, weights=[1.0, 1.0])
    with pytest.raises(ValueError):
        tensor_sentence_bleu(x, y[:3])
    with pytest.raises(ValueError):
        TensorBLEU(max_order=0)(x, y)


def test_large_ids_use_exact_keys():
    """Ids near a 50k vocabulary: int32 keys, int64 keys (large vocab_size) and the unique(dim=0) fallback agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(49_000, 50_257, (64, 96), generator=g)
    y = torch.where(torch.rand(64, 96, generator=g) < 0.5, x, torch.randint(49_000, 50_257, (64, 96), generator=g))
    a = tensor_sentence_bleu(x, y, smoothing="exp", dtype=torch.float64)  # int32 keys
    b = tensor_sentence_bleu(x, y, smoothing="exp", dictionary="rows", dtype=torch.float64)
    c = tensor_sentence_bleu(x, y, smoothing="exp", vocab_size=2**40, dtype=torch.float64)  # int64 keys
    d = tensor_sentence_bleu(x, y, smoothing="exp", vocab_size=2**60, dtype=torch.float64)  # falls back to rows
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, c, atol=1e-12) and torch.allclose(a, d, atol=1e-12)
    assert_matches_sacrebleu(x[:8].tolist(), [[r] for r in y[:8].tolist()], smoothing="exp")


@pytest.mark.parametrize("wide", [False, True])
def test_packed_statistics_equal_rows(monkeypatch, wide):
    """The packed keys (1 to 5 sort levels, token-pair or unigram first level) count exactly what unique(dim=0)
    counts, with padding, explicit lengths, several references and empty sequences; `wide` makes every key and
    group index int64 from small bounds on, so the int64 paths run on small inputs too."""
    if wide:
        monkeypatch.setattr(tensorbleu, "_key_dtype", lambda bound: torch.int32 if bound <= 2**10 else torch.long)
    rng = random.Random(23)
    g = torch.Generator().manual_seed(23)
    for _ in range(80):
        batch, n_refs = rng.choice([1, 3, 16]), rng.choice([1, 1, 3])
        tc, tr = rng.choice([0, 1, 3, 7, 20]), rng.choice([0, 2, 5, 20])
        vocab = rng.choice([2, 5, 300, 70_000])  # 70k: the token-pair keys would not fit int32
        cand = torch.randint(0, vocab, (batch, tc), generator=g)
        refs = torch.randint(0, vocab, (batch, n_refs, tr), generator=g)
        shared = min(tc, tr)  # references copy most of the candidate: long matches
        copy = torch.rand(batch, shared, generator=g) < 0.8
        refs[:, 0, :shared] = torch.where(copy, cand[:, :shared], refs[:, 0, :shared])
        kw = dict(max_order=rng.choice([1, 2, 3, 4, 4, 5, 8, 9]))
        if rng.random() < 0.5:
            kw["candidate_lengths"] = torch.randint(0, tc + 1, (batch,), generator=g)
            kw["reference_lengths"] = torch.randint(0, tr + 1, (batch, n_refs), generator=g)
        packed = bleu_statistics(cand, refs, **kw)
        rows = bleu_statistics(cand, refs, dictionary="rows", **kw)
        for name, a, b in zip(packed._fields, packed, rows):
            assert torch.equal(a, b), (name, kw, a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    rng = random.Random(17)
    cands, refs = random_batch(rng, batch=32, max_refs=1)
    c, _ = pad_rows(cands, 0)
    r, _ = pad_rows([x[0] for x in refs], 0)
    cl = torch.tensor([len(x) for x in cands])
    rl = torch.tensor([[len(x[0])] for x in refs])
    for smoothing in SMOOTHINGS:
        cpu = tensor_sentence_bleu(c, r, smoothing=smoothing, candidate_lengths=cl, reference_lengths=rl)
        gpu = tensor_sentence_bleu(
            c.cuda(), r.cuda(), smoothing=smoothing, candidate_lengths=cl.cuda(), reference_lengths=rl.cuda()
        )
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-6)
