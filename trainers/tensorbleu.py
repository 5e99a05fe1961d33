"""TensorBLEU: per-sentence and corpus BLEU on token-id tensors, vectorised over the batch.

BLEU (Papineni et al., 2002) of a candidate against one or more references is

    BLEU = BP * exp( sum_n w_n * log p_n / sum_n w_n )

with the modified n-gram precision ``p_n = clipped matches of order n / candidate n-grams of order n``
(a candidate n-gram is matched at most as many times as it occurs in the reference that contains it
most often) and the brevity penalty ``BP = exp(1 - r / c)`` when the candidate length ``c`` is below
the reference length ``r`` (the reference length closest to ``c``, the shorter one on ties), 1 otherwise.

This module computes it for a whole batch without a Python loop over rows, on whatever device the
inputs live on (CPU or CUDA):

1. **n-gram extraction**: the n-grams of order ``n`` are the windows of ``n`` tokens starting at each
   position; n-grams running past a sequence's length (into its padding) are not counted.
2. **batch-specific compact dictionary**: every n-gram of every row, candidates and references
   together, is mapped to a dense id, its rank among the distinct n-grams of the batch. The dictionary key
   includes the row index, so an id names a (row, n-gram) pair and its size is bounded by the number of
   n-grams actually present in the batch, never by ``vocab_size ** n`` (nor by ``batch * vocab``).
   Two equivalent builders are provided:

   - ``dictionary="rows"``: ``torch.unique(dim=0)`` over the rows ``[row, t_1, ..., t_n]``, once per order;
   - ``dictionary="packed"`` (default): exact 1-D integer keys (no hashing, no collisions) sorted by
     *prefix doubling*, so BLEU-4 takes two int32 sorts for its four orders (three for vocabularies too large
     for a token pair in int32, which first sort unigrams alone): one of ``(row, t_p, t_{p+1})``
     (equal keys are equal bigrams, equal major parts equal unigrams) and one of ``(id of the bigram at p,
     id of the bigram at p + 2)`` (4-grams; with the token at ``p + 2``, trigrams). Sorted keys are
     lexicographic, so the n-grams of every order are runs of the sorted keys and their ids a running count
     of run starts (no ``torch.unique``, whose inverse costs more than the sort).

   The row is the major part of every key, so the ids of a row form one contiguous range.
3. **counting**: a row's clipped matches are the sum of ``min(candidate count, clip)`` over its id range
   (the clip count is the maximum over references), a difference of one running sum at the range bounds.
   ``"packed"`` counts in sorted order and uses ``min(c, clip) = c - max(c - clip, 0)``: with one reference,
   ``c - clip`` of every id comes from one signed histogram (``+1`` per candidate n-gram, ``-1`` per reference
   n-gram), and the ``c`` of a row sum to its number of candidate n-grams. ``"rows"`` uses one ``bincount`` for
   the candidates and one *offset* ``bincount`` for the references (reference ``r`` uses ids ``r * U + id``).
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

from rxt_hf.modeling_rxt.format_rxt import pad_rows

__all__ = [
    "SMOOTHING_METHODS",
    "BLEUStatistics",
    "TensorBLEU",
    "bleu_from_statistics",
    "bleu_statistics",
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
        tokens, mask = pad_rows(candidates, 0 if pad_token_id is None else pad_token_id, device=device)
        full = mask.sum(-1)
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
        padded, flat_mask = pad_rows(flat, 0 if pad_token_id is None else pad_token_id)
        flat_len = flat_mask.sum(-1)
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


def _matches_rows(cand, refs, cand_len, ref_len, full: bool, max_order: int) -> torch.Tensor:
    """``[B, max_order]`` clipped matches from the ``unique(dim=0)`` dictionary (position-domain counting).

    One ``bincount`` for the candidates, one *offset* ``bincount`` for the references (reference ``r`` uses ids
    ``r * (U + 1) + id``); the clip count is the maximum over references, and a row's clipped matches (the sum
    of ``min(candidate, clip)`` over its id range) are a difference of one running sum at the range bounds.
    """
    batch, n_refs = refs.shape[0], refs.shape[1]
    matches = torch.zeros(batch, max_order, dtype=torch.long, device=cand.device)
    ref_offsets = torch.arange(n_refs, device=cand.device).view(1, n_refs, 1)
    for n, ids_c, ids_r, size, row_start in _ids_rows(cand, refs, max_order):
        if full:
            flat_c, flat_r = ids_c.reshape(-1), ids_r + ref_offsets * (size + 1)
        else:  # n-grams past a sequence's end go to a dump bin (id `size`, one per reference), never counted
            flat_c = torch.where(_valid(cand_len, ids_c.shape[1], n), ids_c, size).reshape(-1)
            flat_r = torch.where(_valid(ref_len, ids_r.shape[2], n), ids_r, size) + ref_offsets * (size + 1)
        count_c = torch.bincount(flat_c, minlength=size + 1)[:size]  # integer counts per id
        count_r = torch.bincount(flat_r.reshape(-1), minlength=n_refs * (size + 1)).view(n_refs, size + 1)
        clip = count_r[0, :size]
        for r in range(1, n_refs):
            clip = torch.maximum(clip, count_r[r, :size])
        running = torch.zeros(size + 1, dtype=torch.long, device=cand.device)
        torch.cumsum(torch.minimum(count_c, clip), 0, out=running[1:])
        matches[:, n - 1] = running[row_start[1:]] - running[row_start[:-1]]
    return matches


def _bits(bound: int) -> int:
    """Number of bits that hold every integer in ``[0, bound)``."""
    return max(int(bound) - 1, 0).bit_length()


def _key_dtype(bound: int) -> torch.dtype | None:
    """Smallest integer dtype whose non-negative range holds ``[0, bound)`` (None: not even int64)."""
    return torch.int32 if bound <= 2**31 else torch.long if bound <= 2**63 else None


def _packed_plan(max_order: int, batch: int, alphabet: int):
    """Sort levels ``(k, j)`` (level ``(k, j)`` counts orders ``k+1 .. k+j``; ``k == 0`` keys on tokens), the
    number of extra positions ``ext`` each level sorts past the sequence width, and whether the first level keys
    on token pairs. None when the first level's keys would overflow int64."""
    if _key_dtype(batch * alphabet) is None:
        return None
    pair = max_order >= 2 and batch * alphabet << _bits(alphabet) <= 2**31
    levels = [(0, 2 if pair else 1)]
    k = levels[0][1]
    while k < max_order:  # prefix doubling: the next level appends a j-gram (j <= k) to the k-grams
        j = min(k, max_order - k)
        levels.append((k, j))
        k += j
    ext = [0] * len(levels)  # a level reads ids at p + k (its k) from earlier levels: they rank k more positions
    for i in range(len(levels) - 2, -1, -1):
        ext[i] = ext[i + 1] + levels[i + 1][0]
    return levels, ext, pair


def _symbols(tokens: torch.Tensor, lengths: torch.Tensor, full: bool, pad: int, reach: int, dtype) -> torch.Tensor:
    """Token ids as key symbols, ``pad`` past each sequence's end and on ``reach`` extra positions."""
    width = tokens.shape[-1]
    out = torch.full((*tokens.shape[:-1], width + reach), pad, dtype=dtype, device=tokens.device)
    out[..., :width] = tokens
    if not full:
        out[..., :width].masked_fill_(torch.arange(width, device=tokens.device) >= lengths.unsqueeze(-1), pad)
    return out


def _matches_packed(cand, refs, cand_len, ref_len, full: bool, max_order: int, vocab: int) -> torch.Tensor | None:
    """``[B, max_order]`` clipped matches from exact 1-D integer keys, sorted by prefix doubling.

    Token ids are symbols of an alphabet of ``A = V + 2``: the ids, then ``V`` for every position past a
    candidate's end and ``V + 1`` past a reference's end, so an n-gram running past a sequence's end never
    equals an n-gram of the other side and is never matched (no masks). Every position ``p`` of every sequence
    (plus a few past the width, all padding, that later levels read) gets per sort level one exact key:

    - first level: ``(row * A + s_p) << bits(A) | s_{p+1}`` for orders 1 and 2 (the pair only when the key
      fits int32; otherwise ``row * A + s_p`` alone, order 1);
    - level ``(k, j)`` (orders ``k+1 .. k+j``, ``j <= k``): ``id_k(p) << bits(W) | id_j(p + k) - first``, where
      ``id_k`` is the group index of the k-gram in an earlier level's sorted keys (row major, so it is exact and
      lexicographic) and ``id_j(p + k) - first`` the j-gram's group index relative to its row's first one
      (``< W``, the sorted positions per row), so keys stay small (int32 for typical batches).

    The sorted keys of a level are lexicographic, so every order it covers forms runs: order ``k+j`` runs
    change with the key, lower orders with its major part (``>> bits``) or with the code of the shorter n-gram
    at ``p + k`` (gathered through the sort permutation); group indices are running counts of run starts.
    Per group, ``c - clip`` (candidate count minus the most of one reference) comes from one signed histogram
    (one histogram of ``(source, group)`` with several references); every row occupies the same number ``W`` of
    sorted positions and its candidate positions count ``c`` once each, so its clipped matches are its
    candidate positions minus a difference of the running sum of ``max(c - clip, 0)`` at the groups of the
    rows' last positions. None if the first keys would overflow int64.
    """
    batch, n_refs, tc, tr = cand.shape[0], refs.shape[1], cand.shape[1], refs.shape[2]
    device = cand.device
    alphabet = vocab + 2
    plan = _packed_plan(max_order, batch, alphabet)
    if plan is None:
        return None
    levels, ext, pair = plan
    matches = torch.zeros(batch, max_order, dtype=torch.long, device=device)
    if batch == 0 or tc == 0:
        return matches
    sym_bits = _bits(alphabet)
    sym_dtype = _key_dtype(batch * alphabet << (sym_bits if pair else 0))
    reach = ext[0] + int(pair)  # symbols are read up to p + reach
    sym_c = _symbols(cand, cand_len, full, vocab, reach, sym_dtype)  # [B, Tc + reach]
    sym_r = _symbols(refs, ref_len, full, vocab + 1, reach, sym_dtype)  # [B, R, Tr + reach]

    # Per order m, codes by position: (candidate [B, *], reference [B, R, *], first [B] or None, bound of the
    # code relative to its row's first, bound of the code). Equal codes in one row are equal m-grams.
    codes = {1: (sym_c, sym_r, None, alphabet, alphabet)}
    # orders whose ids later levels read (order 1 reads the symbols unless the first level sorted unigrams)
    needed = {k for k, _ in levels[1:]} | {m for _, j in levels[1:] for m in range(2 if pair else 1, j + 1)}

    for (k, j), e in zip(levels, ext):
        wc, wr = tc + e, tr + e
        width = wc + n_refs * wr  # sorted positions per row
        size = batch * width
        if k == 0:
            orders, shift = ([1, 2], sym_bits) if j == 2 else ([1], 0)
            key_dtype = _key_dtype(batch * alphabet << shift)
        else:
            orders = list(range(k + 1, k + j + 1))
            major_c, major_r, _, _, major_bound = codes[k]
            minor_c, minor_r, first, minor_bound, _ = codes[j]
            shift = _bits(minor_bound)
            key_dtype = _key_dtype((major_bound << shift) + minor_bound)  # before subtracting first
        keys = torch.empty(size, dtype=key_dtype, device=device)
        key_c, key_r = keys[: batch * wc].view(batch, wc), keys[batch * wc :].view(batch, n_refs, wr)
        if k == 0:  # (row * A + s_p) << shift | s_{p+1}, i.e. s_{p+1} + s_p * 2**shift + row * A * 2**shift
            if j == 2:
                torch.add(sym_c[:, 1 : 1 + wc], sym_c[:, :wc], alpha=1 << shift, out=key_c)
                torch.add(sym_r[:, :, 1 : 1 + wr], sym_r[:, :, :wr], alpha=1 << shift, out=key_r)
            else:
                key_c.copy_(sym_c[:, :wc])
                key_r.copy_(sym_r[:, :, :wr])
            rows = torch.arange(0, (batch * alphabet) << shift, alphabet << shift, device=device, dtype=key_dtype)
            key_c += rows.view(batch, 1)
            key_r += rows.view(batch, 1, 1)
        else:  # id_k(p) << shift | code_j(p + k) - first, with code_j(p + k) - first < 2**shift
            torch.add(minor_c[:, k : k + wc], major_c[:, :wc].to(key_dtype), alpha=1 << shift, out=key_c)
            torch.add(minor_r[:, :, k : k + wr], major_r[:, :, :wr].to(key_dtype), alpha=1 << shift, out=key_r)
            if first is not None:
                key_c -= first.view(batch, 1)
                key_r -= first.view(batch, 1, 1)
        del key_c, key_r
        ordered, perm = torch.sort(keys)
        del keys

        # True where a new n-gram starts in the sorted keys, per order of the level: [len(orders), size]
        flags = torch.empty(len(orders), size, dtype=torch.bool, device=device)
        flags[:, 0] = False
        torch.ne(ordered[1:], ordered[:-1], out=flags[-1, 1:])
        if len(orders) > 1:  # the key's major part: order 1 (first level) or the k-gram
            major = ordered.bitwise_right_shift_(shift)
            torch.ne(major[1:], major[:-1], out=flags[0, 1:])
            flags[1:-1] = flags[0]
            for i, m in enumerate(orders[:-1] if k else []):  # the (m - k)-gram at p + k refines the k-gram
                xc, xr = codes[m - k][:2]
                x = torch.cat([xc[:, k : k + wc].reshape(-1), xr[:, :, k : k + wr].reshape(-1)])
                x = x.index_select(0, perm)  # its code, in sorted order
                flags[i, 1:] |= x[1:] != x[:-1]
                del x
            del major
        del ordered
        # group index of every sorted position (its n-gram's rank), per order of the level
        group_dtype = _key_dtype((n_refs + 1) * size)
        group = flags.cumsum(1, dtype=group_dtype)
        del flags
        last = group[:, width - 1 :: width].long()  # [len(orders), B] group of each row's last sorted position
        for i, m in enumerate(orders):
            if m in needed:  # ids back to positions for the next levels
                at = torch.empty_like(group[i]).scatter_(0, perm, group[i])
                first = group[i, ::width].clone()
                at_c, at_r = at[: batch * wc].view(batch, wc), at[batch * wc :].view(batch, n_refs, wr)
                codes[m] = (at_c, at_r, first, width, size)

        # A group's clipped matches are min(c, clip) = c - max(c - clip, 0), with c its candidate n-grams and
        # clip the most of one reference; the c of a row's groups sum to its wc candidate positions.
        if n_refs == 1:  # c - clip from one signed histogram: +1 per candidate, -1 per reference position
            sign = torch.sub(1, (perm >= batch * wc).to(group_dtype), alpha=2)
            excess = torch.zeros(len(orders), size, dtype=group_dtype, device=device)
            for i in range(len(orders)):
                excess[i].index_add_(0, group[i], sign)
        else:  # histogram of (source, group): source 0 candidate, 1 + r reference r
            source = torch.arange(1, n_refs + 1, device=device, dtype=group_dtype).repeat_interleave(wr)
            source = torch.cat([torch.zeros(batch * wc, dtype=group_dtype, device=device), source.repeat(batch)])
            source = source.index_select(0, perm)
            counts = torch.zeros(len(orders), n_refs + 1, size, dtype=group_dtype, device=device)
            ones = torch.ones(1, dtype=group_dtype, device=device).expand(size)
            for i in range(len(orders)):
                counts[i].view(-1).index_add_(0, torch.add(group[i], source, alpha=size), ones)
            clip = counts[:, 1]
            for r in range(2, n_refs + 1):
                torch.maximum(clip, counts[:, r], out=clip)
            excess = counts[:, 0] - clip
            del source, counts, clip
        del group, perm
        running = excess.clamp_(min=0).cumsum_(1)  # running unmatched candidate n-grams over the groups
        per_row = running.gather(1, last)  # [len(orders), B]
        unmatched = torch.diff(per_row, dim=1, prepend=per_row.new_zeros(len(orders), 1))
        matches[:, orders[0] - 1 : orders[-1]] = (wc - unmatched).T
        del excess, running
    return matches


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
    n_refs = refs.shape[1]
    # Tensors without pad id or lengths are all full length; otherwise checked on CPU only (no device sync).
    as_given = isinstance(candidates, torch.Tensor) and isinstance(references, torch.Tensor)
    full = as_given and pad_token_id is None and candidate_lengths is None and reference_lengths is None
    if not as_given:  # missing references (rows with fewer of them) have length 0
        ref_len = torch.where(present, ref_len, 0)
    if not full and cand.device.type == "cpu":
        full = bool((cand_len == cand.shape[1]).all() & (ref_len == refs.shape[2]).all())
    if not full:  # tokens past a sequence's end are ignored; zero them (the id range below must not see them)
        cand = torch.where(torch.arange(cand.shape[1], device=cand.device) < cand_len.unsqueeze(-1), cand, 0)
        refs = torch.where(torch.arange(refs.shape[2], device=refs.device) < ref_len.unsqueeze(-1), refs, 0)

    matches = None
    if dictionary == "packed":
        low = 0
        if vocab_size is None:  # one host sync for the id range (padding is already zeroed)
            ranges = [torch.stack(torch.aminmax(t)) for t in (cand, refs) if t.numel()]
            bounds = torch.stack(ranges).tolist() if ranges else []
            low = min([0] + [lo for lo, _ in bounds])
            vocab_size = max([0] + [hi for _, hi in bounds]) + 1
        if low >= 0:  # None if the keys would overflow int64: same counts via unique(dim=0)
            matches = _matches_packed(cand, refs, cand_len, ref_len, full, max_order, max(int(vocab_size), 1))
    if matches is None:
        matches = _matches_rows(cand, refs, cand_len, ref_len, full, max_order)
    matches = matches.to(torch.float64)
    totals = (cand_len.unsqueeze(-1) - torch.arange(max_order, device=cand.device)).clamp_(min=0).to(torch.float64)

    # Closest reference length (sacrebleu: smallest |c - r|, the shorter reference on ties); missing refs excluded.
    if n_refs == 1:
        closest = ref_len[:, 0]
    else:
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
    c_len, r_len = stats.candidate_length.to(torch.float64), stats.reference_length.to(torch.float64)

    any_match = (matches > 0).any(dim=-1)  # sacrebleu returns 0 before smoothing when nothing matches
    if smoothing == "add-k":
        add = torch.full((max_order,), smooth_value, dtype=torch.float64, device=matches.device)
        add[0] = 0.0
        matches, totals = matches + add, totals + add
    # Orders from the first one without candidate n-grams on are left out (sacrebleu's loop `break`).
    has_total = totals > 0
    active = has_total.cumprod(dim=-1) > 0
    safe_totals = torch.where(has_total, totals, 1.0)
    precision = matches / safe_totals  # matches >= 0
    no_match = active & (matches <= 0)
    if smoothing == "exp":
        k = torch.cumsum(no_match, dim=-1, dtype=torch.float64)
        precision = torch.where(no_match, torch.exp2(k).mul_(safe_totals).reciprocal_(), precision)
    elif smoothing == "floor":
        precision = torch.where(no_match, smooth_value / safe_totals, precision)
    precision = torch.where(active, precision, 0.0)
    log_p = torch.where(precision > 0, torch.log(precision), _LOG_ZERO)

    if weights is None:
        used_w = active.to(torch.float64) if effective_order else torch.ones_like(precision)
    else:
        w = _weights_tensor(weights, max_order, matches.device)
        used_w = torch.where(active, w, 0.0) if effective_order else w.expand_as(precision)
    norm = used_w.sum(dim=-1)
    log_mean = (used_w * log_p).sum(dim=-1) / torch.where(norm > 0, norm, 1.0)

    # exp(1 - r / c) is 0 for c = 0 < r (r / 0 = inf)
    bp = torch.where(c_len < r_len, torch.exp(1.0 - r_len / c_len), 1.0)
    score = bp * torch.exp(log_mean)
    return torch.where(any_match & (norm > 0), score, 0.0)


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
