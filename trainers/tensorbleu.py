"""TensorBLEU: per-sentence and corpus BLEU on token-id tensors, vectorised over the batch.

BLEU (Papineni et al., 2002) of a candidate against one or more references is

    BLEU = BP * exp( sum_n w_n * log p_n / sum_n w_n )

with the modified n-gram precision ``p_n = clipped matches of order n / candidate n-grams of order n``
(a candidate n-gram is matched at most as many times as it occurs in the reference that contains it
most often) and the brevity penalty ``BP = exp(1 - r / c)`` when the candidate length ``c`` is below
the reference length ``r`` (the reference length closest to ``c``, the shorter one on ties), 1 otherwise.

This module computes it for a whole batch without a Python loop over rows, on whatever device the
inputs live on (CPU or CUDA):

1. **n-gram extraction**: the n-grams of order ``n`` are the sliding windows of the sequences
   (``Tensor.unfold``); positions past a sequence's length (its padding) are not counted.
2. **batch-specific compact dictionary**: every n-gram of every row, candidates and references
   together, is mapped to a dense id, its rank among the distinct n-grams of the batch. The dictionary key
   includes the row index, so an id names a (row, n-gram) pair and its size is bounded by the number of
   n-grams actually present in the batch, never by ``vocab_size ** n`` (nor by ``batch * vocab``).
   Two equivalent builders are provided:

   - ``dictionary="rows"``: ``torch.unique(dim=0)`` over the rows ``[row, t_1, ..., t_n]``;
   - ``dictionary="packed"`` (default): the same dictionary built order by order from 1-D keys: the id
     of a unigram is the rank of ``row * V + t``, the id of an n-gram the rank of
     ``id(its (n-1)-gram prefix) * V + t_n``. The keys are exact (no hashing, no collisions) and the ranks
     come from one 1-D sort per order, about 100x faster on CPU than ``unique(dim=0)``.

   The row is the major part of every key, so the ids of a row form one contiguous range.
3. **counting**: one ``bincount`` for the candidates, one *offset* ``bincount`` for the references
   (reference ``r`` uses ids ``r * U + id``), so the counts of every reference come out of one call;
   the clip count is the maximum over references, and a row's clipped matches (the sum of
   ``min(candidate, clip)`` over its id range) are a difference of one running sum at the range bounds.
4. **score**: precisions, smoothing, effective order, brevity penalty and the weighted geometric mean
   are element-wise tensor operations.

Every rule follows sacrebleu's ``BLEU`` (v2.x) so that ``tensor_sentence_bleu`` equals
``sacrebleu.sentence_bleu(..., tokenize="none").score / 100`` on the same token sequences rendered
as words, for each of sacrebleu's smoothing methods:

- ``"none"``: no smoothing (an order without matches makes the score 0);
- ``"floor"``: an order without matches gets precision ``smooth_value / total`` (default 0.1);
- ``"add-k"``: ``smooth_value`` (default 1) is added to matches and totals of orders ``n >= 2``;
- ``"exp"``: the ``k``-th order without matches gets precision ``1 / (2**k * total)`` (NIST / mteval).

With ``effective_order=True`` (sacrebleu's sentence-level default) orders for which the candidate has no
n-gram at all (it is shorter than ``n``) are left out of the geometric mean instead of zeroing it.
Scores are in ``[0, 1]`` (sacrebleu reports ``100 *`` that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

__all__ = [
    "SMOOTHING_METHODS",
    "BLEUStatistics",
    "TensorBLEU",
    "bleu_from_statistics",
    "bleu_statistics",
    "pad_sequences",
    "tensor_corpus_bleu",
    "tensor_sentence_bleu",
]

SMOOTHING_METHODS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}
"""Smoothing methods (sacrebleu's ``smooth_method`` names) and their default ``smooth_value``."""

_LOG_ZERO = -9999999999.0  # log(0) as sacrebleu floors it: exp(anything this small) is exactly 0.

TokenSeq = Union[torch.Tensor, Sequence[int]]
Candidates = Union[torch.Tensor, Sequence[TokenSeq]]
References = Union[torch.Tensor, Sequence[Union[TokenSeq, Sequence[TokenSeq], torch.Tensor]]]


class BLEUStatistics(NamedTuple):
    """Sufficient statistics of BLEU for each row of a batch (all ``float64``, on the inputs' device)."""

    matches: torch.Tensor
    """``[B, max_order]`` clipped n-gram matches per order."""
    totals: torch.Tensor
    """``[B, max_order]`` candidate n-grams per order."""
    candidate_length: torch.Tensor
    """``[B]`` candidate lengths."""
    reference_length: torch.Tensor
    """``[B]`` the reference length closest to the candidate length (the shorter one on ties)."""


# --------------------------------------------------------------------------------------------------
# Input normalisation (not the hot path: only lists are converted, tensors pass through)
# --------------------------------------------------------------------------------------------------


def pad_sequences(
    sequences: Sequence[TokenSeq], pad_value: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length token sequences into ``([N, T_max] long tensor, [N] lengths)``."""
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    if device is not None:
        out, lengths = out.to(device), lengths.to(device)
    return out, lengths


def _is_token_sequence(x) -> bool:
    """A single sequence of token ids (1-D tensor or flat list of ints), as opposed to a list of them."""
    if isinstance(x, torch.Tensor):
        return x.dim() <= 1
    if len(x) == 0:
        return True
    first = x[0]
    return not (isinstance(first, torch.Tensor) and first.dim() >= 1) and not isinstance(first, (list, tuple))


def _prefix_lengths(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Length of the non-pad prefix of every sequence along the last dim (the index of the first pad)."""
    width = tokens.shape[-1]
    is_pad = tokens == pad_token_id
    if width == 0:
        return torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    first = is_pad.to(torch.uint8).argmax(dim=-1)
    return torch.where(is_pad.any(dim=-1), first, torch.full_like(first, width))


def _candidates_tensor(
    candidates: Candidates, pad_token_id: int | None, lengths: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(candidates, torch.Tensor):
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be [B, T], got shape {tuple(candidates.shape)}")
        tokens = candidates.long()
        full = torch.full(tokens.shape[:1], tokens.shape[1], dtype=torch.long, device=tokens.device)
    else:
        tokens, full = pad_sequences(candidates, 0 if pad_token_id is None else pad_token_id, device)
    if lengths is not None:
        full = torch.as_tensor(lengths, dtype=torch.long, device=tokens.device)
    elif pad_token_id is not None:
        full = torch.minimum(full, _prefix_lengths(tokens, pad_token_id))
    return tokens, full


def _references_tensor(
    references: References, batch: int, pad_token_id: int | None, lengths: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [B, R, T], lengths [B, R], present [B, R])``; ``present`` is False for missing references."""
    if isinstance(references, torch.Tensor):
        if references.dim() == 2:
            tokens = references.long().unsqueeze(1)
        elif references.dim() == 3:
            tokens = references.long()
        else:
            raise ValueError(f"references must be [B, T] or [B, R, T], got shape {tuple(references.shape)}")
        full = torch.full(tokens.shape[:2], tokens.shape[2], dtype=torch.long, device=tokens.device)
        present = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    else:
        if len(references) != batch:
            raise ValueError(f"got {len(references)} reference entries for {batch} candidates")
        per_row: list[list[TokenSeq]] = []
        for entry in references:
            if _is_token_sequence(entry):
                per_row.append([entry])
            elif isinstance(entry, torch.Tensor):  # [R, T]
                per_row.append(list(entry))
            else:
                per_row.append(list(entry))
        n_refs = max((len(r) for r in per_row), default=1) or 1
        flat = [seq for refs in per_row for seq in refs]
        padded, flat_len = pad_sequences(flat, 0 if pad_token_id is None else pad_token_id)
        width = padded.shape[1]
        tokens = torch.zeros(batch, n_refs, width, dtype=torch.long)
        full = torch.zeros(batch, n_refs, dtype=torch.long)
        present = torch.zeros(batch, n_refs, dtype=torch.bool)
        k = 0
        for b, refs in enumerate(per_row):
            for r in range(len(refs)):
                tokens[b, r] = padded[k]
                full[b, r] = flat_len[k]
                present[b, r] = True
                k += 1
        tokens, full, present = tokens.to(device), full.to(device), present.to(device)
    if tokens.shape[0] != batch:
        raise ValueError(f"references have batch size {tokens.shape[0]}, candidates {batch}")
    if lengths is not None:
        full = torch.as_tensor(lengths, dtype=torch.long, device=tokens.device).reshape(tokens.shape[:2])
    elif pad_token_id is not None:
        full = torch.minimum(full, _prefix_lengths(tokens, pad_token_id))
    return tokens, full, present


# --------------------------------------------------------------------------------------------------
# n-gram dictionary and counting
# --------------------------------------------------------------------------------------------------


def _windows(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., T] -> [..., max(T - n + 1, 0), n]`` sliding windows (n-grams) along the last dim."""
    width = tokens.shape[-1]
    if width < n:
        return tokens.new_zeros(*tokens.shape[:-1], 0, n)
    return tokens.unfold(-1, n, 1)


def _valid(lengths: torch.Tensor, positions: int, n: int) -> torch.Tensor:
    """``[..., positions]`` True where the n-gram starting there lies inside the sequence."""
    starts = torch.arange(positions, device=lengths.device)
    return starts + n <= lengths.unsqueeze(-1)


def _ids_rows(cand: torch.Tensor, refs: torch.Tensor, max_order: int):
    """Per order: ``(n, candidate ids [B, Pc], reference ids [B, R, Pr], size, row_start [B + 1])``.

    The dictionary is ``torch.unique(dim=0)`` over ``[row, t_1, ..., t_n]`` for all n-grams in the batch. Its
    rows are sorted with the row index first, so the ids of row ``b`` are ``row_start[b] <= id < row_start[b + 1]``.
    """
    batch, n_refs = refs.shape[0], refs.shape[1]
    device = cand.device
    row_c = torch.arange(batch, device=device)
    for n in range(1, max_order + 1):
        wc = _windows(cand, n)  # [B, Pc, n]
        wr = _windows(refs, n)  # [B, R, Pr, n]
        pc, pr = wc.shape[1], wr.shape[2]
        rows_c = torch.cat([row_c.view(batch, 1, 1).expand(batch, pc, 1), wc], dim=-1).reshape(-1, n + 1)
        rows_r = torch.cat(
            [row_c.view(batch, 1, 1, 1).expand(batch, n_refs, pr, 1), wr], dim=-1
        ).reshape(-1, n + 1)
        uniq, inverse = torch.unique(torch.cat([rows_c, rows_r]), dim=0, return_inverse=True)
        per_row = torch.bincount(uniq[:, 0], minlength=batch)
        row_start = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
        ids_c = inverse[: batch * pc].view(batch, pc)
        ids_r = inverse[batch * pc :].view(batch, n_refs, pr)
        yield n, ids_c, ids_r, uniq.shape[0], row_start


def _ids_packed(cand: torch.Tensor, refs: torch.Tensor, max_order: int, vocab: int):
    """Same dictionary as :func:`_ids_rows` (same order of the ids), built order by order from exact 1-D keys.

    order 1: key = row * V + t; order n: key = id(prefix (n-1)-gram) * V + t_n; ids are the ranks of the keys.
    The ranks come from one sort (no ``torch.unique``: its inverse costs more than the sort) and are bounded by
    the number of keys, which is used as the dictionary size (no host sync for the number of distinct keys).
    Every row contributes the same number of keys and the row is the major part of every key, so in sorted
    order row ``b`` occupies positions ``[b * W, (b + 1) * W)`` and its ids start at the rank found at ``b * W``.
    """
    batch, n_refs = refs.shape[0], refs.shape[1]
    device = cand.device
    pc0, pr0 = cand.shape[1], refs.shape[2]
    # Keys are exact integers below (number of positions + batch) * vocab; int32 sorts ~2x faster than int64.
    bound = (batch * (pc0 + n_refs * pr0) + batch + 1) * (vocab + 1)
    key_dtype = torch.int32 if bound < 2**31 else torch.long
    cand, refs = cand.to(key_dtype), refs.to(key_dtype)
    rows = torch.arange(batch, device=device, dtype=key_dtype)
    key_c = rows.view(batch, 1) * vocab + cand
    key_r = rows.view(batch, 1, 1) * vocab + refs
    prev_c = prev_r = None
    for n in range(1, max_order + 1):
        pc, pr = max(pc0 - n + 1, 0), max(pr0 - n + 1, 0)
        if n > 1:  # extend the (n-1)-gram starting at i by the token at i + n - 1
            key_c = prev_c[:, :pc] * vocab + cand[:, n - 1 : n - 1 + pc]
            key_r = prev_r[:, :, :pr] * vocab + refs[:, :, n - 1 : n - 1 + pr]
        keys = torch.cat([key_c.reshape(-1), key_r.reshape(-1)])
        size, width = keys.numel(), pc + n_refs * pr
        if size == 0:
            ids = keys
            row_start = torch.zeros(batch + 1, dtype=torch.long, device=device)
        else:
            ordered, perm = torch.sort(keys)
            new = torch.empty(size, dtype=torch.bool, device=device)
            new[0] = False
            torch.ne(ordered[1:], ordered[:-1], out=new[1:])
            rank = new.cumsum(0, dtype=key_dtype)  # id of each sorted key: 0 .. distinct - 1
            ids = torch.empty_like(rank).scatter_(0, perm, rank)
            row_start = torch.cat([rank[::width].long(), torch.full((1,), size, dtype=torch.long, device=device)])
        ids_c = ids[: batch * pc].view(batch, pc)
        ids_r = ids[batch * pc :].view(batch, n_refs, pr)
        yield n, ids_c, ids_r, size, row_start
        prev_c, prev_r = ids_c, ids_r


def bleu_statistics(
    candidates: Candidates,
    references: References,
    max_order: int = 4,
    pad_token_id: int | None = None,
    candidate_lengths: torch.Tensor | Sequence[int] | None = None,
    reference_lengths: torch.Tensor | Sequence[Sequence[int]] | None = None,
    vocab_size: int | None = None,
    dictionary: str = "packed",
) -> BLEUStatistics:
    """Clipped n-gram matches, n-gram totals and lengths of every row, vectorised over the batch.

    Args:
        candidates: ``[B, Tc]`` token ids, or a list of ``B`` sequences of ids.
        references: ``[B, Tr]`` (one reference per row), ``[B, R, Tr]`` (``R`` per row), or a list of ``B``
            entries, each one sequence of ids or a list of sequences (rows may have different numbers).
        max_order: highest n-gram order.
        pad_token_id: if given, a sequence ends at its first occurrence of this id (its non-pad prefix).
        candidate_lengths / reference_lengths: explicit lengths (``[B]`` / ``[B, R]``), overriding padding.
        vocab_size: ids are in ``[0, vocab_size)`` (``dictionary="packed"``); if None it is read from the batch
            (one host sync), and negative ids or a key range beyond int64 fall back to ``"rows"``.
        dictionary: ``"packed"`` (1-D keys, fast) or ``"rows"`` (``torch.unique(dim=0)``); same result.
    """
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    if dictionary not in ("packed", "rows"):
        raise ValueError(f"dictionary must be 'packed' or 'rows', got {dictionary!r}")
    device = candidates.device if isinstance(candidates, torch.Tensor) else None
    if device is None and isinstance(references, torch.Tensor):
        device = references.device
    cand, cand_len = _candidates_tensor(candidates, pad_token_id, candidate_lengths, device)
    refs, ref_len, present = _references_tensor(
        references, cand.shape[0], pad_token_id, reference_lengths, cand.device
    )
    batch, n_refs = refs.shape[0], refs.shape[1]
    ref_len = torch.where(present, ref_len, torch.zeros_like(ref_len))

    # Without padding (checked on CPU only, where it costs no device sync) every window is an n-gram.
    full = cand.device.type == "cpu" and bool((cand_len == cand.shape[1]).all() & (ref_len == refs.shape[2]).all())
    if not full:  # tokens past a sequence's end are ignored; zero them so the packed keys stay in range
        cand = torch.where(torch.arange(cand.shape[1], device=cand.device) < cand_len.unsqueeze(-1), cand, 0)
        refs = torch.where(torch.arange(refs.shape[2], device=refs.device) < ref_len.unsqueeze(-1), refs, 0)

    matches = torch.zeros(batch, max_order, dtype=torch.float64, device=cand.device)
    if dictionary == "rows":
        orders = _ids_rows(cand, refs, max_order)
    else:
        low = 0
        if vocab_size is None:  # one host sync for the id range (padding is already zeroed)
            both = torch.cat([cand.reshape(-1), refs.reshape(-1), cand.new_zeros(1)])
            low, high = (int(v) for v in torch.stack(torch.aminmax(both)).tolist())
            vocab_size = high + 1
        vocab_size = max(int(vocab_size), 1)
        positions = batch * (cand.shape[1] + n_refs * refs.shape[2]) + batch + 1
        if low >= 0 and positions * (vocab_size + 1) < 2**62:
            orders = _ids_packed(cand, refs, max_order, vocab_size)
        else:  # keys would overflow int64: same dictionary via unique(dim=0)
            orders = _ids_rows(cand, refs, max_order)
    ref_offsets = torch.arange(n_refs, device=cand.device).view(1, n_refs, 1)
    for n, ids_c, ids_r, size, row_start in orders:
        if full:
            flat_c, flat_r = ids_c.reshape(-1), ids_r if n_refs == 1 else ids_r + ref_offsets * (size + 1)
        else:  # n-grams past a sequence's end go to a dump bin (id `size`, one per reference), never counted
            flat_c = torch.where(_valid(cand_len, ids_c.shape[1], n), ids_c, size).reshape(-1)
            flat_r = torch.where(_valid(ref_len, ids_r.shape[2], n), ids_r, size) + ref_offsets * (size + 1)
        count_c = torch.bincount(flat_c, minlength=size + 1)[:size]  # integer counts per id
        count_r = torch.bincount(flat_r.reshape(-1), minlength=n_refs * (size + 1)).view(n_refs, size + 1)
        clip = count_r[0, :size] if n_refs == 1 else count_r[:, :size].amax(dim=0)
        # ids are grouped by row: a row's clipped matches are a difference of the running sum at its bounds
        running = torch.zeros(size + 1, dtype=torch.long, device=cand.device)
        torch.cumsum(torch.minimum(count_c, clip), 0, out=running[1:])
        matches[:, n - 1] = (running[row_start[1:]] - running[row_start[:-1]]).to(matches.dtype)

    orders_t = torch.arange(1, max_order + 1, device=cand.device)
    totals = (cand_len.unsqueeze(-1) - orders_t + 1).clamp(min=0).to(torch.float64)

    # Closest reference length (sacrebleu: smallest |c - r|, the shorter reference on ties); missing refs excluded.
    diff = (cand_len.unsqueeze(-1) - ref_len).abs()
    big = int(refs.shape[2]) + int(cand.shape[1]) + 1
    rank = diff * (big + 1) + ref_len
    rank = torch.where(present, rank, torch.full_like(rank, torch.iinfo(torch.long).max))
    closest = ref_len.gather(1, rank.argmin(dim=1, keepdim=True)).squeeze(1)
    return BLEUStatistics(matches, totals, cand_len.to(torch.float64), closest.to(torch.float64))


# --------------------------------------------------------------------------------------------------
# Score
# --------------------------------------------------------------------------------------------------


def _check_smoothing(smoothing: str, smooth_value: float | None) -> float:
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing must be one of {sorted(SMOOTHING_METHODS)}, got {smoothing!r}")
    if smooth_value is None:
        smooth_value = SMOOTHING_METHODS[smoothing]
    return 0.0 if smooth_value is None else float(smooth_value)


def _weights_tensor(weights, max_order: int, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(max_order, dtype=torch.float64, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64, device=device).reshape(-1)
    if w.numel() != max_order:
        raise ValueError(f"weights must have max_order={max_order} entries, got {w.numel()}")
    return w


def bleu_from_statistics(
    stats: BLEUStatistics,
    weights: Sequence[float] | torch.Tensor | None = None,
    smoothing: str = "none",
    smooth_value: float | None = None,
    effective_order: bool = True,
) -> torch.Tensor:
    """BLEU in ``[0, 1]`` from (per-row or summed) statistics; works on any leading batch shape.

    ``weights`` (one per order, default uniform) weight the log precisions; the mean is normalised by the sum
    of the weights of the orders taken into account (so uniform weights give sacrebleu's plain mean, and with
    ``effective_order`` the weights of the orders left out are dropped).
    """
    smooth_value = _check_smoothing(smoothing, smooth_value)
    matches, totals = stats.matches.to(torch.float64), stats.totals.to(torch.float64)
    max_order = matches.shape[-1]
    w = _weights_tensor(weights, max_order, matches.device)
    c_len, r_len = stats.candidate_length.to(torch.float64), stats.reference_length.to(torch.float64)

    any_match = (matches > 0).any(dim=-1)  # sacrebleu returns 0 before smoothing when nothing matches
    if smoothing == "add-k":
        add = torch.full((max_order,), smooth_value, dtype=torch.float64, device=matches.device)
        add[0] = 0.0
        matches, totals = matches + add, totals + add
    # Orders from the first one without candidate n-grams on are left out (sacrebleu's loop `break`).
    active = torch.cumprod((totals > 0).to(torch.float64), dim=-1) > 0
    safe_totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    precision = torch.where(matches > 0, matches / safe_totals, torch.zeros_like(matches))
    no_match = active & (matches <= 0)
    if smoothing == "exp":
        k = torch.cumsum(no_match.to(torch.float64), dim=-1)
        precision = torch.where(no_match, 1.0 / (torch.pow(2.0, k) * safe_totals), precision)
    elif smoothing == "floor":
        precision = torch.where(no_match, smooth_value / safe_totals, precision)
    precision = torch.where(active, precision, torch.zeros_like(precision))
    log_p = torch.where(precision > 0, torch.log(precision.clamp(min=1e-300)), torch.full_like(precision, _LOG_ZERO))

    used = active if effective_order else torch.ones_like(active)
    used_w = torch.where(used, w.expand_as(precision), torch.zeros_like(precision))
    norm = used_w.sum(dim=-1)
    log_mean = (used_w * log_p).sum(dim=-1) / torch.where(norm > 0, norm, torch.ones_like(norm))

    safe_c = torch.where(c_len > 0, c_len, torch.ones_like(c_len))
    bp = torch.where(
        c_len < r_len,
        torch.where(c_len > 0, torch.exp(1.0 - r_len / safe_c), torch.zeros_like(c_len)),
        torch.ones_like(c_len),
    )
    score = bp * torch.exp(log_mean)
    return torch.where(any_match & (norm > 0), score, torch.zeros_like(score))


def tensor_sentence_bleu(
    candidates: Candidates,
    references: References,
    max_order: int = 4,
    weights: Sequence[float] | torch.Tensor | None = None,
    smoothing: str = "none",
    smooth_value: float | None = None,
    pad_token_id: int | None = None,
    effective_order: bool = True,
    candidate_lengths: torch.Tensor | Sequence[int] | None = None,
    reference_lengths: torch.Tensor | Sequence[Sequence[int]] | None = None,
    vocab_size: int | None = None,
    dictionary: str = "packed",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sentence BLEU in ``[0, 1]`` of each candidate row against its reference(s): a ``[B]`` tensor.

    Equal to ``sacrebleu.sentence_bleu(hyp, refs, smooth_method=smoothing, smooth_value=smooth_value,
    tokenize="none", use_effective_order=effective_order).score / 100`` with every id rendered as a word.
    See :func:`bleu_statistics` for the input formats and :func:`bleu_from_statistics` for ``weights``.
    """
    _check_smoothing(smoothing, smooth_value)
    stats = bleu_statistics(
        candidates,
        references,
        max_order=max_order,
        pad_token_id=pad_token_id,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        vocab_size=vocab_size,
        dictionary=dictionary,
    )
    score = bleu_from_statistics(stats, weights, smoothing, smooth_value, effective_order)
    return score.to(dtype)


def tensor_corpus_bleu(
    candidates: Candidates,
    references: References,
    max_order: int = 4,
    weights: Sequence[float] | torch.Tensor | None = None,
    smoothing: str = "none",
    smooth_value: float | None = None,
    pad_token_id: int | None = None,
    effective_order: bool = False,
    candidate_lengths: torch.Tensor | Sequence[int] | None = None,
    reference_lengths: torch.Tensor | Sequence[Sequence[int]] | None = None,
    vocab_size: int | None = None,
    dictionary: str = "packed",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Corpus BLEU in ``[0, 1]`` (a 0-d tensor): statistics summed over the rows, then one score.

    Equal to ``sacrebleu.corpus_bleu(hyps, refs, smooth_method=smoothing, tokenize="none").score / 100``
    (whose default is ``use_effective_order=False``, as here).
    """
    _check_smoothing(smoothing, smooth_value)
    stats = bleu_statistics(
        candidates,
        references,
        max_order=max_order,
        pad_token_id=pad_token_id,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        vocab_size=vocab_size,
        dictionary=dictionary,
    )
    summed = BLEUStatistics(*(t.sum(dim=0) for t in stats))
    return bleu_from_statistics(summed, weights, smoothing, smooth_value, effective_order).to(dtype)


class TensorBLEU:
    """A configured BLEU callable: ``TensorBLEU(smoothing="exp")(candidates, references) -> [B]``.

    ``corpus=True`` makes it return the corpus score instead. Keyword arguments of the call override the
    configuration.
    """

    def __init__(
        self,
        max_order: int = 4,
        weights: Sequence[float] | None = None,
        smoothing: str = "none",
        smooth_value: float | None = None,
        pad_token_id: int | None = None,
        effective_order: bool | None = None,
        corpus: bool = False,
        dictionary: str = "packed",
    ):
        _check_smoothing(smoothing, smooth_value)
        if weights is not None:
            _weights_tensor(weights, max_order, "cpu")
        self.corpus = corpus
        self.config = dict(
            max_order=max_order,
            weights=weights,
            smoothing=smoothing,
            smooth_value=smooth_value,
            pad_token_id=pad_token_id,
            effective_order=(not corpus) if effective_order is None else effective_order,
            dictionary=dictionary,
        )

    def __call__(self, candidates: Candidates, references: References, **overrides) -> torch.Tensor:
        fn = tensor_corpus_bleu if self.corpus else tensor_sentence_bleu
        return fn(candidates, references, **{**self.config, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"TensorBLEU({args}, corpus={self.corpus})"
