"""Pure conversions from the engine's per-position arrays to the schema-v2 distribution columns.

No I/O here. Two stages, so that a shard in memory holds only what is stored:
1. per row (`encode_row`): choose the entries of each position and quantize their values
   (the values and the tail do not depend on the rest of the shard);
2. per shard (`shard_columns`): the shard's codebook (adaptive) and the final id coding.

Shapes: T target positions of a row, K entries per position from the engine (rank order, PAD_ID
/ -inf after the real ones: padding-row ids were dropped), E = entries kept in all, V the
tokenizer's size. Decoding is shared.shard_codec; the columns are described in schemas.shard.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from kd_shards.schemas.shard import (
    CODEBOOK_KEY,
    LOGPROB_STEP,
    PAD_ID,
    TAIL_EMPTY,
    TAIL_STEP,
    Storage,
)

# --- values and tails ---------------------------------------------------------------------


def logprob_levels(logprobs: np.ndarray) -> np.ndarray:
    """Integer levels round(-logprob / LOGPROB_STEP) >= 0 (int64, any shape; -inf -> 0)."""
    levels = np.rint(-np.asarray(logprobs, dtype=np.float64) / LOGPROB_STEP)
    return np.maximum(np.where(np.isfinite(levels), levels, 0), 0).astype(np.int64)


def sqrt_levels(logprobs: np.ndarray, scale: int) -> np.ndarray:
    """Levels round(scale * sqrt(p)) in [0, scale] (int32): an error of equal KL cost at every
    probability (decoded by shared.shard_codec.sqrt_levels_to_logprobs)."""
    amplitude = np.exp(0.5 * np.asarray(logprobs, dtype=np.float64))
    return np.clip(np.rint(scale * amplitude), 0, scale).astype(np.int32)


def tail_log_mass(logprobs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """log of the mass outside the first counts[t] entries of each position, computed exactly.

    1 - sum(kept p) would lose the digits of a small tail; instead the tail is the dropped part
    of the engine's entries (summed directly) plus the mass beyond them, 1 - sum(all K p) in
    float64 (float32 logprobs: absolute error ~K·1e-7).

    Args:
        logprobs: (T, K) float, rank order, -inf in empty slots. counts: (T,) in [0, K].
    Returns:
        (T,) float64 (-inf when the tail is 0).
    """
    p = np.exp(np.asarray(logprobs, dtype=np.float64))
    beyond = np.maximum(1.0 - p.sum(axis=1), 0.0)
    dropped = np.where(np.arange(p.shape[1]) >= counts[:, None], p, 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(beyond + dropped)


def tail_levels(log_tail: np.ndarray) -> np.ndarray:
    """(T,) log tail mass (<= 0, -inf allowed) -> (T,) int32 kd_tail levels (TAIL_EMPTY: none)."""
    scaled = np.rint(-np.asarray(log_tail, dtype=np.float64) / TAIL_STEP)
    finite = np.isfinite(scaled)
    return np.where(finite, np.clip(scaled, 0, TAIL_EMPTY - 1), TAIL_EMPTY).astype(np.int32)


# --- which entries an adaptive position keeps ----------------------------------------------


def counts_by_mass(logprobs: np.ndarray, *, mass: float, k_max: int) -> np.ndarray:
    """The fewest entries whose mass reaches `mass`, at most k_max (and at most the real ones).

    Args:
        logprobs: (T, K) float rank order (-inf in empty slots). mass: in (0, 1].
    Returns:
        (T,) int32 counts in [1, min(k_max, real entries)].
    """
    p = np.exp(np.asarray(logprobs[:, :k_max], dtype=np.float64))
    below = (np.cumsum(p, axis=1) < mass).sum(axis=1) + 1
    real = np.isfinite(logprobs[:, :k_max]).sum(axis=1)
    return np.maximum(np.minimum(below, real), 1).astype(np.int32)


def _fidelity_tables(
    logprobs: np.ndarray, k_max: int, vocabulary: int, scale: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position and prefix length n = 1..k_max, the two fidelity figures of storing the n
    most likely entries as sqrt levels with the stored tail, and the exact-value KL gains.

    KL(p || p_hat) (p_hat: decoded values on the stored ids, the stored tail spread evenly over
    the V - n other ids, normalized) is given up to the position's constant sum_v p_v log p_v,
    the same constant reference_figures leaves out.

    Returns:
        kl (T, k_max), neg_log_mass (T, k_max), gain (T, k_max): gain[:, n] is how much the
        exact-value KL falls when rank n is added.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    p_all = np.exp(lp)
    beyond = np.maximum(1.0 - p_all.sum(axis=1, keepdims=True), 0.0) + p_all[:, k_max:].sum(
        axis=1, keepdims=True
    )
    lp, p = lp[:, :k_max], p_all[:, :k_max]
    tails = np.cumsum(p[:, ::-1], axis=1)[:, ::-1] + beyond  # tails[:, n]: mass of ranks >= n
    tails_after = np.concatenate([tails[:, 1:], beyond], axis=1)  # outside ranks < n + 1
    decoded = 2.0 * np.log(np.maximum(sqrt_levels(lp, scale), 0.25) / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_after = np.log(tails_after)
        stored = np.where(
            np.isfinite(log_after), -TAIL_STEP * np.rint(-log_after / TAIL_STEP), -np.inf
        )
        stored = np.maximum(stored, -69.0)  # an empty tail: no mass there to misplace
        rest = np.log(vocabulary - np.arange(1, k_max + 1, dtype=np.float64))
        kl = (
            -np.cumsum(np.where(p > 0, p * decoded, 0.0), axis=1)
            - tails_after * (stored - rest)
            + np.log(np.cumsum(np.where(p > 0, np.exp(decoded), 0.0), axis=1) + np.exp(stored))
        )
        neg_log_mass = -np.log1p(-np.minimum(tails_after, 1.0))
        xlogx_after = np.where(tails_after > 0, tails_after * log_after, 0.0)
        xlogx_first = np.where(tails[:, :1] > 0, tails[:, :1] * np.log(tails[:, :1]), 0.0)
    xlogx = np.concatenate([xlogx_first, xlogx_after[:, :-1]], axis=1)
    plogp = np.where(p > 0, p * lp, 0.0)
    rest_before = np.log(vocabulary - np.arange(0, k_max, dtype=np.float64))
    gain = plogp - xlogx + xlogx_after + tails * rest_before - tails_after * rest
    return kl, neg_log_mass, gain


def reference_figures(
    logprobs: np.ndarray, ref_k: int, vocabulary: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-ref_k with exact values and the exact tail: KL(p || p_hat) (without the same
    constant as _fidelity_tables) and -log(captured mass), both (T,)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    p_all = np.exp(lp)
    beyond = np.maximum(1.0 - p_all.sum(axis=1), 0.0)
    p = p_all[:, :ref_k]
    tail = beyond + p_all[:, ref_k:].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = -np.where(p > 0, p * lp[:, :ref_k], 0.0).sum(axis=1) - np.where(
            tail > 0, tail * (np.log(tail) - np.log(vocabulary - ref_k)), 0.0
        )
    return kl, -np.log1p(-np.minimum(tail, 1.0))


def counts_for_parity(
    logprobs: np.ndarray,
    group_lengths: np.ndarray,
    *,
    ref_k: int,
    k_max: int,
    vocabulary: int,
    scale: int,
    iterations: int = 24,
) -> np.ndarray:
    """The fewest entries per position such that, summed over each group of positions (a row),
    BOTH fidelity figures are no worse than exact top-ref_k with exact values: KL(p || p_hat)
    (stored values and stored tail included) and -log(captured mass).

    Entries are allocated greedily by their exact KL gain, with one threshold per group found
    by bisection; no position gets more than k_max. Where even k_max entries everywhere cannot
    reach parity (the quantized values cost more than the extra entries gain; rare), the group
    gets the most entries the bisection tried.

    Args:
        logprobs: (T, K) float32 rank order, K >= k_max >= ref_k. group_lengths: (G,) positions
            per group (sum T). scale: the sqrt levels' S.
    Returns:
        (T,) int32 counts in [1, k_max].
    """
    kl, neg_log_mass, gain = _fidelity_tables(logprobs, k_max, vocabulary, scale)
    ref_kl, ref_neg_log_mass = reference_figures(logprobs, ref_k, vocabulary)
    # count(lambda) = #{n : envelope[n] >= lambda} on the non-increasing envelope of the gains,
    # for all positions at once: one searchsorted over per-position shifted keys.
    envelope = np.minimum.accumulate(np.where(np.arange(k_max) == 0, np.inf, gain), axis=1)
    keys = np.clip(-np.log(np.maximum(envelope, 1e-300)), -100.0, 900.0)
    positions = np.arange(len(kl))
    keys = (keys + 1000.0 * positions[:, None]).ravel()
    group = np.repeat(np.arange(len(group_lengths)), group_lengths)
    starts = np.concatenate(([0], np.cumsum(group_lengths)[:-1]))

    def counts_at(log_threshold: np.ndarray) -> np.ndarray:
        wanted = np.clip(-log_threshold[group], -100.0, 900.0) + 1000.0 * positions
        return np.maximum(np.searchsorted(keys, wanted, side="right") - positions * k_max, 1)

    def at_parity(counts: np.ndarray) -> np.ndarray:
        worse_kl = np.add.reduceat(kl[positions, counts - 1] - ref_kl, starts)
        worse_mass = np.add.reduceat(neg_log_mass[positions, counts - 1] - ref_neg_log_mass, starts)
        return (worse_kl <= 0) & (worse_mass <= 0)

    low = np.full(len(group_lengths), np.log(1e-7))  # many entries
    high = np.full(len(group_lengths), np.log(10.0))  # one entry
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        good = at_parity(counts_at(middle))
        low = np.where(good, middle, low)
        high = np.where(good, high, middle)
    return counts_at(low).astype(np.int32)


# --- stage 1: one row ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowEntries:
    """One row's stored distributions before the shard-level coding (see shard_columns)."""

    counts: np.ndarray
    """(T,) int32 entries per position."""
    ids: np.ndarray
    """(E,) int32 token ids: rank order (topk, adaptive) or ascending (sampled)."""
    values: np.ndarray
    """(E,) int32: topk the drops (kd_drops), adaptive the sqrt levels, sampled the hits."""
    tail: np.ndarray
    """(T,) int32: kd_tail levels (topk, adaptive) or the draws (sampled, rs_draws)."""


def encode_row(
    ids: np.ndarray, logprobs: np.ndarray, storage: Storage, vocabulary: int
) -> RowEntries:
    """Choose and quantize one row's entries.

    Args:
        ids: (T, K) int32 and logprobs: (T, K) float32 (unrounded engine values), rank order,
            PAD_ID / -inf after the real entries. K >= top_k (topk), k_max (adaptive), or the
            draws in any order (sampled: K = draws, logprobs unused).
        vocabulary: V; a position whose entries cover all V ids has no tail.
    Returns:
        RowEntries.
    """
    if not len(ids):  # a completion without tokens: nothing to choose from
        return RowEntries(*(np.zeros(0, dtype=np.int32) for _ in range(4)))
    real = ids >= 0
    real_count = real.sum(axis=1).astype(np.int32)
    if storage.representation == "sampled":
        return _encode_draws(ids, storage.draws)
    if storage.representation == "topk":
        counts = np.minimum(real_count, storage.top_k)
        keep = np.arange(ids.shape[1]) < counts[:, None]
        levels = np.where(keep, logprob_levels(logprobs), 0)
        # rank order makes the levels non-decreasing; max.accumulate guards float ties
        levels = np.maximum.accumulate(levels, axis=1)
        values = np.diff(levels, axis=1, prepend=0)[keep]
    else:
        if storage.rule == "parity":
            counts = counts_for_parity(
                logprobs,
                np.array([len(ids)]),
                ref_k=storage.top_k,
                k_max=storage.k_max,
                vocabulary=vocabulary,
                scale=storage.value_scale,
            )
        else:
            counts = counts_by_mass(logprobs, mass=storage.mass_target, k_max=storage.k_max)
        counts = np.maximum(np.minimum(counts, real_count), 1).astype(np.int32)
        keep = np.arange(ids.shape[1]) < counts[:, None]
        values = sqrt_levels(logprobs[keep], storage.value_scale)
    log_tail = tail_log_mass(logprobs, counts)
    log_tail = np.where(counts >= vocabulary, -np.inf, log_tail)
    return RowEntries(
        counts=counts.astype(np.int32),
        ids=ids[keep].astype(np.int32),
        values=values.astype(np.int32),
        tail=tail_levels(log_tail),
    )


def _encode_draws(draws: np.ndarray, count: int) -> RowEntries:
    """Draws (T, D) (PAD_ID where a padding-row id was drawn) -> unique ids with their hits."""
    ordered = np.sort(np.where(draws >= 0, draws, np.iinfo(np.int32).max), axis=1)
    new = np.ones(ordered.shape, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = np.flatnonzero(new.ravel())
    hits = np.diff(np.append(starts, ordered.size))
    values = ordered.ravel()[starts]
    real = values != np.iinfo(np.int32).max
    position = starts[real] // ordered.shape[1]
    return RowEntries(
        counts=np.bincount(position, minlength=len(draws)).astype(np.int32),
        ids=values[real].astype(np.int32),
        values=hits[real].astype(np.int32),
        tail=np.full(len(draws), count, dtype=np.int32),
    )


# --- stage 2: one shard ----------------------------------------------------------------------


def shard_codebook(ids: list[np.ndarray], vocabulary: int) -> np.ndarray:
    """The ids a shard stores, most frequent first (ties by id): code c stands for codebook[c].

    Args:
        ids: every row's stored ids. Returns: (U,) int64, U = the distinct ids stored.
    """
    frequency = np.zeros(vocabulary, dtype=np.int64)
    for row_ids in ids:
        frequency += np.bincount(row_ids, minlength=vocabulary)[:vocabulary]
    return np.argsort(-frequency, kind="stable")[: np.count_nonzero(frequency)]


def gaps_sorted_by_code(
    counts: np.ndarray, codes: np.ndarray, values: np.ndarray, *, top_first: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sort each position's entries by code; (E,) gaps (first = the code) and the values in
    that order. With top_first, each position's first entry (the most likely, in rank order)
    stays first as its code, and only the others are sorted and gap-coded (their first gap is
    the code itself).

    Args:
        counts: (T,). codes: (E,) distinct within a position. values: (E,) carried along.
    """
    position = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    first = np.zeros(len(codes), dtype=bool)
    first[offsets[counts > 0]] = True
    rest = ~first if top_first else np.ones(len(codes), dtype=bool)
    order = np.lexsort((codes, rest, position))
    codes, values = codes[order].astype(np.int64), values[order]
    gaps = np.diff(codes, prepend=0)
    starts = first.copy()
    if top_first:  # the sorted part starts one entry later
        starts[(offsets + 1)[counts > 1]] = True
    gaps = np.where(starts, codes, gaps)
    return gaps.astype(np.int32), values


def shard_columns(
    rows: list[RowEntries], storage: Storage, vocabulary: int
) -> tuple[dict[str, list[np.ndarray]], dict[bytes, bytes]]:
    """Every distribution column of a shard, one array per row, and the footer metadata.

    Returns:
        ({column name: [row 0's values, row 1's, ...]} for storage.columns,
         {footer key: value} (the codebook, when the storage has one)).
    """
    footer: dict[bytes, bytes] = {}
    counts = [row.counts for row in rows]
    tails = [row.tail for row in rows]
    if storage.representation == "topk":
        return {
            "kd_count": counts,
            "kd_ids": [row.ids for row in rows],
            "kd_drops": [row.values for row in rows],
            "kd_tail": tails,
        }, footer
    if storage.representation == "sampled":
        gaps = [gaps_sorted_by_code(row.counts, row.ids, row.values)[0] for row in rows]
        return {
            "rs_count": counts,
            "rs_id_gaps": gaps,
            "rs_hits": [row.values for row in rows],
            "rs_draws": tails,
        }, footer
    id_to_code = None
    if storage.codebook:
        codebook = shard_codebook([row.ids for row in rows], vocabulary)
        id_to_code = np.zeros(vocabulary, dtype=np.int64)
        id_to_code[codebook] = np.arange(len(codebook))
        footer[CODEBOOK_KEY] = base64.b64encode(codebook.astype(storage.codebook_dtype).tobytes())
    gaps, levels = [], []
    for row in rows:
        codes = row.ids if id_to_code is None else id_to_code[row.ids]
        row_gaps, row_levels = gaps_sorted_by_code(
            row.counts, codes, row.values, top_first=storage.top_first
        )
        gaps.append(row_gaps)
        levels.append(row_levels)
    return {"kd_count": counts, "kd_id_gaps": gaps, "kd_levels": levels, "kd_tail": tails}, footer


def padding_entries(ids: np.ndarray) -> int:
    """Engine entries that were padding-row ids (PAD_ID after drop_padding_ids)."""
    return int((ids == PAD_ID).sum())
