"""Choosing the masks of teacher-dump --mode mlm: BERT's masking of a window, drawn from a seed
of its own so that every rank, resume and batching draws the same masks.

Pure functions of arrays and a numpy Generator; no tokenizer, no I/O.
"""

from __future__ import annotations

import numpy as np

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
"""Of the chosen positions: 80% get [MASK], 10% a random token, the other 10% stay (BERT)."""


def masking_generator(seed: int, source_index: int, copy: int) -> np.random.Generator:
    """The generator of one masked copy of one window: a function of the dump's --seed, the
    window's source index and the copy (numpy's SeedSequence, stable across numpy releases)."""
    return np.random.default_rng([seed, source_index, copy])


def choose_masks(
    input_ids: np.ndarray,
    special: np.ndarray,
    *,
    rate: float,
    mask_id: int,
    replacement_ids: np.ndarray,
    generator: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one window.

    max(1, round(rate · n)) of the n non-special positions are chosen uniformly without
    replacement; each chosen position independently becomes `mask_id` with probability 0.8, a
    token drawn uniformly from `replacement_ids` with probability 0.1, and keeps its token
    otherwise. Special positions are never chosen.

    Args:
        input_ids: (P,) int the window, special tokens included.
        special: (P,) bool, True at the special tokens.
        replacement_ids: (R,) int the ids a random replacement is drawn from.
    Returns:
        ((P,) int32 the masked window, (T,) int32 the chosen positions, ascending).
    """
    eligible = np.flatnonzero(~np.asarray(special, dtype=bool))
    if not eligible.size:
        raise ValueError("a window without non-special tokens cannot be masked")
    count = max(1, int(round(rate * eligible.size)))
    positions = np.sort(generator.choice(eligible, size=count, replace=False)).astype(np.int32)
    kind = generator.random(count)
    replacements = generator.choice(np.asarray(replacement_ids), size=count)
    masked = np.asarray(input_ids, dtype=np.int32).copy()
    masked[positions[kind < MASK_SHARE]] = mask_id
    randomized = (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    masked[positions[randomized]] = replacements[randomized]
    return masked, positions
