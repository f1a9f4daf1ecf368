"""Decoding schema-v2 distribution columns into what the trainer takes: pure numpy, no I/O.

Every representation (schemas.shard.REPRESENTATIONS) decodes to the same three arrays as a
schema-v1 shard gives, so losses and fidelity do not care how a dump was stored:
- ids (N, W) int32, each position's entries in rank order (most likely first), PAD_ID after them;
- logprobs (N, W) float32, -inf in padding slots;
- log_tail (N,) float32, log of the teacher's mass outside the stored ids, taken from the
  stored tail (adaptive, topk) or from the draws (sampled: the share of padding-row draws);
  -inf when nothing is outside.

Shapes: N target positions (of any number of rows laid end to end), E stored entries in all,
W = the widest position (topk: k).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from kd_shards.schemas.shard import LOGPROB_STEP, PAD_ID, TAIL_EMPTY, TAIL_STEP, Storage


@dataclass(frozen=True)
class DecodedPositions:
    ids: np.ndarray
    """(N, W) int32 rank order, PAD_ID after each position's entries."""
    logprobs: np.ndarray
    """(N, W) float32, -inf where ids is PAD_ID."""
    log_tail: np.ndarray
    """(N,) float32 log of the mass outside the stored ids (-inf: none)."""


def segment_offsets(counts: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 offsets of segments of the given lengths (N,), laid end to end."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def segmented_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at every segment.

    Args:
        values: (E,) integers, segments laid end to end. counts: (N,) segment lengths, sum E.
    Returns:
        (E,) int64.
    """
    total = np.cumsum(values, dtype=np.int64)
    before = np.concatenate(([0], total))[segment_offsets(counts)[:-1]]
    return total - np.repeat(before, counts)


def tail_from_levels(levels: np.ndarray) -> np.ndarray:
    """kd_tail levels (N,) -> (N,) float32 log tail mass (-inf for TAIL_EMPTY)."""
    log_tail = levels.astype(np.float64) * -TAIL_STEP
    return np.where(levels == TAIL_EMPTY, -np.inf, log_tail).astype(np.float32)


def sqrt_levels_to_logprobs(levels: np.ndarray, scale: int) -> np.ndarray:
    """adaptive kd_levels (E,) -> (E,) float32 logprobs: p = (max(v, 1/4) / scale)²."""
    amplitude = np.maximum(levels.astype(np.float64), 0.25) / scale
    return (2.0 * np.log(amplitude)).astype(np.float32)


def decode_codebook(text: bytes, dtype: str) -> np.ndarray:
    """The footer's base64 codebook -> (U,) int64: code c stands for token id codebook[c]."""
    return np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype).astype(np.int64)


def rank_padded(
    counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, order_key: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat entries -> (N, width) arrays, each position's entries sorted by order_key.

    Args:
        counts: (N,) entries per position, at most width. ids: (E,) int. logprobs: (E,) float.
        order_key: (E,) non-negative ints, smaller first (ties keep their stored order), or
            None to keep the stored order.
    Returns:
        ids (N, width) int32 with PAD_ID after the entries, logprobs (N, width) float32 with
        -inf there.
    """
    offsets = segment_offsets(counts)
    position = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if order_key is not None and len(order_key):
        spread = int(order_key.max()) + 1
        order = np.argsort(position * spread + order_key, kind="stable")
        ids, logprobs = ids[order], logprobs[order]
    column = np.arange(len(ids), dtype=np.int64) - offsets[:-1][position]
    out_ids = np.full((len(counts), width), PAD_ID, dtype=np.int32)
    out_logprobs = np.full((len(counts), width), -np.inf, dtype=np.float32)
    out_ids[position, column] = ids
    out_logprobs[position, column] = logprobs
    return out_ids, out_logprobs


def decode_distributions(
    columns: dict[str, np.ndarray], storage: Storage, codebook: np.ndarray | None
) -> DecodedPositions | str:
    """A v2 shard's distribution columns (flat, any number of rows) -> DecodedPositions.

    Args:
        columns: the flat values of each of storage.columns (per-position columns (N,),
            per-entry columns (E,)). codebook: the shard's (U,) codebook, or None.
    Returns:
        The decoded positions, or a one-line description of the first structural problem
        (counts that disagree with the entries, negative gaps or drops, levels or codes out of
        range); value checks on the decoded arrays are the reader's (shared.shard_reader).
    """
    representation = storage.representation
    counts_name = "rs_count" if representation == "sampled" else "kd_count"
    counts = columns[counts_name].astype(np.int64)
    entries = [name for name in storage.columns if name not in (counts_name, "kd_tail", "rs_draws")]
    if (counts < 0).any():
        return f"column {counts_name} holds a negative count"
    for name in entries:
        if len(columns[name]) != counts.sum():
            return f"column {name} holds {len(columns[name])} entries, {counts_name} sums to {counts.sum()}"
    if representation == "sampled":
        return _decode_sampled(counts, columns)
    if (counts == 0).any():
        return "a position stores no entry (kd_count 0)"
    tail = columns["kd_tail"]
    if ((tail < 0) | (tail > TAIL_EMPTY)).any():
        return f"kd_tail values outside [0, {TAIL_EMPTY}]"
    log_tail = tail_from_levels(tail)
    if representation == "topk":
        if (counts > storage.top_k).any():
            return f"a position stores more than k={storage.top_k} entries"
        drops = columns["kd_drops"]
        if (drops < 0).any():
            return "kd_drops holds a negative drop (values out of rank order)"
        levels = segmented_cumsum(drops, counts)
        logprobs = (levels * -LOGPROB_STEP).astype(np.float32)
        ids, logprobs = rank_padded(counts, columns["kd_ids"], logprobs, None, storage.top_k)
        return DecodedPositions(ids, logprobs, log_tail)
    if (counts > storage.k_max).any():
        return f"a position stores more than k_max={storage.k_max} entries"
    gaps, levels = columns["kd_id_gaps"], columns["kd_levels"]
    # Segments of ascending gaps: each position's entries, or with top_first its first entry
    # (the exact top-1) and then the others.
    segments = (
        np.stack([np.minimum(counts, 1), counts - 1], axis=1).ravel()
        if storage.top_first
        else counts
    )
    starts = np.zeros(len(gaps), dtype=bool)
    starts[segment_offsets(segments)[:-1][segments > 0]] = True
    if (gaps < 0).any() or (gaps[~starts] == 0).any():
        return "kd_id_gaps are not strictly ascending within a position"
    if ((levels < 0) | (levels > storage.value_scale)).any():
        return f"kd_levels outside [0, {storage.value_scale}]"
    codes = segmented_cumsum(gaps, segments)
    if storage.top_first and _top_repeated(codes, counts):
        return "kd_id_gaps repeat a position's first id among its others"
    if codebook is not None:
        if len(codes) and codes.max() >= len(codebook):
            return f"a code is outside the shard's codebook of {len(codebook)} ids"
        codes = codebook[codes]
    logprobs = sqrt_levels_to_logprobs(levels, storage.value_scale)
    # Highest level first, equal levels by token id: a row decodes the same whatever shard (and
    # so codebook, whose code order is the shard's id frequency) it was written into. With
    # top_first the stored first entry (the exact top-1, an id too) leads regardless.
    spread = int(codes.max(initial=0)) + 1
    order_key = (storage.value_scale - levels.astype(np.int64)) * spread + codes + 1
    if storage.top_first:
        order_key[segment_offsets(counts)[:-1][counts > 0]] = 0
    width = int(counts.max(initial=1))
    ids, logprobs = rank_padded(counts, codes, logprobs, order_key, width)
    return DecodedPositions(ids, logprobs, log_tail)


def _top_repeated(codes: np.ndarray, counts: np.ndarray) -> bool:
    """Whether any position's first code (counts (N,), codes (E,)) recurs among its others."""
    position = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.repeat(codes[segment_offsets(counts)[:-1]], counts) if len(codes) else codes
    return (
        bool(((codes == first)[1:] & (position[1:] == position[:-1])).any())
        if len(codes)
        else False
    )


def _decode_sampled(counts: np.ndarray, columns: dict[str, np.ndarray]) -> DecodedPositions | str:
    """sampled: weights hits / draws as log-probabilities; the tail is the share of draws that
    hit no stored id (padding-row ids)."""
    gaps, hits, draws = columns["rs_id_gaps"], columns["rs_hits"], columns["rs_draws"]
    first = np.zeros(len(gaps), dtype=bool)
    first[segment_offsets(counts)[:-1][counts > 0]] = True
    if (gaps < 0).any() or (gaps[~first] == 0).any():
        return "rs_id_gaps are not strictly ascending within a position"
    if (hits < 1).any():
        return "rs_hits holds a count below 1"
    running = np.concatenate(([0], np.cumsum(hits, dtype=np.int64)))
    offsets = segment_offsets(counts)
    hit_sums = running[offsets[1:]] - running[offsets[:-1]]
    if (draws < 1).any() or (hit_sums > draws).any():
        return "rs_hits of a position add up to more than its rs_draws"
    ids = segmented_cumsum(gaps, counts)
    per_draw = np.repeat(draws.astype(np.float64), counts)
    logprobs = np.log(hits / per_draw).astype(np.float32)
    order_key = np.repeat(draws.astype(np.int64), counts) - hits
    width = int(counts.max(initial=1))
    padded_ids, padded_logprobs = rank_padded(counts, ids, logprobs, order_key, width)
    with np.errstate(divide="ignore"):
        log_tail = np.log((draws - hit_sums) / draws).astype(np.float32)
    return DecodedPositions(padded_ids, padded_logprobs, log_tail)
