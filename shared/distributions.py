"""The teacher's stored top-k and the student's logits as two distributions over the same
outcomes, and the divergences between them.

Both student-train's losses and the fidelity metrics of student-train and kd-eval are built on
these pure functions, so "KL to the teacher" means the same thing everywhere. Shapes: N target
positions, K the teacher's top-k, V the student's vocabulary (sliced to len(tokenizer)).
Everything returns per-position values or SUMS over positions; callers divide once.

The compared outcomes, per position:
- tail "renormalize": teacher and student both restricted to the teacher's k ids and
  renormalized there (a proper divergence on the shared support).
- tail "bucket": k+1 outcomes, the k ids plus one "everything else" outcome holding the
  teacher's tail mass (as the dump stores it; 1 - sum(p_i) where it stores none, schema v1) and
  the student's exact remaining mass for the student.
Teacher slots holding PAD_ID (-1, logprob -inf) are outside the support on both sides.
Temperature T raises both compared distributions to the power 1/T and renormalizes them over
their outcomes. For the student under "renormalize" that is exactly softmax(z / T) restricted to
the k ids; under "bucket" the tail is tempered as one outcome on both sides (the teacher's
individual tail tokens are unknown), so identical distributions still cost zero. Divergence sums
are multiplied by T^2 so gradient magnitudes stay comparable across temperatures.
"""

from __future__ import annotations

import math

import torch

from kd_shards.shared.loss_names import Divergence, TailPolicy

TAIL_NOISE = 1e-3
"""Bucket policy, tails derived as 1 - sum(p) (schema v1): below this they count as empty.
Stored v1 logprobs are rounded by up to 4.9e-4 nats each, so 1 - sum(p) is only known to about
that precision; a temperature > 1 would otherwise amplify rounding noise into visible tail mass.
Stored tails (schema v2) are exact to 0.8 % and are used down to TAIL_FLOOR."""
TAIL_FLOOR = 1e-9
"""The mass an empty teacher tail gets: keeps reverse KL and JSD finite."""
EXACT_TAIL_BELOW = 1e-2
"""Student tails below this are computed from the logits outside the teacher's ids rather than
as 1 - sum(q): float32 log-probabilities leave 1 - sum(q) only ~1e-6 accurate."""


def teacher_tail_mass(
    topk_logprobs: torch.Tensor, log_tail: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, 1) the mass the teacher leaves outside its stored ids, unfloored: the stored tail
    where there is one, else 1 - sum(p).

    Args:
        topk_logprobs: (N, K) float, -inf at PAD slots (float32 at least in the result).
        log_tail: optional (N,) stored log tail mass (-inf: none), NaN where none is stored.
    """
    logprobs = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32))
    derived = 1.0 - torch.where(torch.isfinite(logprobs), logprobs.exp(), 0.0).sum(-1, keepdim=True)
    if log_tail is None:
        return derived
    stored = log_tail.to(logprobs.dtype).unsqueeze(-1)
    return torch.where(torch.isnan(stored), derived, stored.exp())


def empty_teacher_tail(
    topk_logprobs: torch.Tensor, log_tail: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, 1) bool: the teacher's tail counts as empty (replaced by TAIL_FLOOR): a derived tail
    below TAIL_NOISE, a stored one at or below TAIL_FLOOR."""
    mass = teacher_tail_mass(topk_logprobs, log_tail)
    if log_tail is None:
        return mass < TAIL_NOISE
    derived = torch.isnan(log_tail).unsqueeze(-1)
    return torch.where(derived, mass < TAIL_NOISE, mass <= TAIL_FLOOR)


def teacher_log_distribution(
    topk_logprobs: torch.Tensor,
    *,
    temperature: float,
    tail: TailPolicy,
    log_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probabilities over the compared outcomes.

    Args:
        topk_logprobs: (N, K) float, raw teacher logprobs; -inf marks PAD_ID slots.
        temperature: T > 0.
        tail: "renormalize" or "bucket".
        log_tail: optional (N,) stored log tail mass, NaN where none is stored (bucket only).
    Returns:
        (log_p, valid): (N, M) float32 and bool, M = K (renormalize) or K + 1 (bucket, last =
        tail). log_p is -inf where not valid; each row's valid entries sum to 1 in probability.
    """
    # float32 at least (float64 stays: the benchmark measures KLs near 1e-7 with it)
    logprobs = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32))
    valid = torch.isfinite(logprobs)
    scaled = torch.where(valid, logprobs / temperature, -math.inf)
    if tail == "bucket":
        tail_mass = teacher_tail_mass(logprobs, log_tail)
        tail_mass = torch.where(empty_teacher_tail(logprobs, log_tail), TAIL_FLOOR, tail_mass)
        scaled = torch.cat([scaled, tail_mass.log() / temperature], dim=-1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    elif tail != "renormalize":
        raise ValueError(f"unknown tail policy {tail!r}")
    log_p = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return torch.where(valid, log_p, -math.inf), valid


def student_log_distribution(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    temperature: float,
    tail: TailPolicy,
    log_normalizer: torch.Tensor | None = None,
    empty_teacher_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Student log-probabilities over the same outcomes as teacher_log_distribution.

    Args:
        logits: (N, V) student logits (any float dtype; computed in float32).
        topk_ids: (N, K) int, teacher ids in [0, V) or PAD_ID (< 0). Every row must have at
            least one valid id (rows without one are filtered out by the caller).
        temperature: T > 0.
        tail: "renormalize" or "bucket".
        log_normalizer: (N, 1) logsumexp of the logits, when the caller already has it.
        empty_teacher_tail: (N, 1) bool (bucket only): see empty_teacher_tail. Where the
            teacher's tail is empty within the stored precision (set to TAIL_FLOOR), the
            student's exact tail is compared at no less than that floor, so that identical
            distributions cost nothing at any temperature. Elsewhere it is exact.
    Returns:
        log_q: (N, M) float32, M = K or K + 1; -inf where the teacher slot is PAD_ID.
    """
    logits = logits.float()
    valid = topk_ids >= 0
    # PAD slots borrow the row's first (always valid) id so gathers stay in range; their values
    # are discarded below.
    ids = torch.where(valid, topk_ids, topk_ids[:, :1]).long()
    gathered = torch.gather(logits, 1, ids)
    if tail == "renormalize":
        # The normalizer cancels on the k ids: no (N, V) work beyond the gather.
        return _temper(gathered.masked_fill(~valid, -math.inf), temperature)
    if tail != "bucket":
        raise ValueError(f"unknown tail policy {tail!r}")
    if log_normalizer is None:
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    gathered = (gathered - log_normalizer).masked_fill(~valid, -math.inf)
    log_tail = log_remaining_mass(logits, ids, gathered, log_normalizer=log_normalizer)
    if empty_teacher_tail is not None:
        log_tail = torch.where(
            empty_teacher_tail, log_tail.clamp(min=math.log(TAIL_FLOOR)), log_tail
        )
    return _temper(torch.cat([gathered, log_tail], dim=-1), temperature)


def log_remaining_mass(
    logits: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor, *, log_normalizer: torch.Tensor
) -> torch.Tensor:
    """log of the student's exact probability mass outside the teacher's ids, with gradient.

    Unlike the teacher's tail (known only to the precision of the stored logprobs), the
    student's tail is exact and is never floored or zeroed. Where it is large, log1p(-sum q) in
    float64 is accurate. Where it is small, that subtraction loses its digits (the float32
    log-probabilities carry absolute errors of ~1e-6), so those rows take the logsumexp of the
    logits outside the ids instead: an (n, V) pass over those rows only.

    Args:
        logits: (N, V) float32. ids: (N, K) int64 in [0, V) (PAD slots already replaced by a
            valid id of the row). log_q: (N, K) student log-probabilities at the ids, -inf at
            PAD slots. log_normalizer: (N, 1) logsumexp of the logits.
    Returns:
        (N, 1) float32, in log space (no floor); where the ids cover the whole vocabulary the
        empty complement gets log(TAIL_FLOOR**2) instead of -inf.
    """
    remaining = 1.0 - log_q.double().exp().sum(-1, keepdim=True)
    log_tail = torch.log(remaining.clamp(min=EXACT_TAIL_BELOW)).float()
    small = (remaining < EXACT_TAIL_BELOW).squeeze(-1)
    if bool(small.any()):
        rows = small.nonzero().squeeze(-1)
        outside = logits[rows].scatter(1, ids[rows], -math.inf)
        exact = torch.logsumexp(outside, dim=-1, keepdim=True) - log_normalizer[rows]
        exact = torch.where(torch.isneginf(exact), 2 * math.log(TAIL_FLOOR), exact)
        log_tail = log_tail.index_put((rows,), exact)
    return log_tail


def _temper(log_probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raise a distribution over outcomes to the power 1/T and renormalize (in log space)."""
    scaled = log_probabilities / temperature
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def divergence_per_position(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor,
    *,
    divergence: Divergence,
    beta: float,
) -> torch.Tensor:
    """Per-position divergence between teacher p and student q on shared outcomes.

    Args:
        log_p, log_q: (N, M) log-probabilities (-inf outside `valid`).
        valid: (N, M) bool support mask.
        divergence: fkl = KL(p||q); rkl = KL(q||p); jsd = β KL(p||m) + (1-β) KL(q||m) with
            m = β p + (1-β) q, and β = 0 / 1 meaning forward / reverse KL (as in GKD);
            skew-kl = KL(p || β p + (1-β) q) (DistiLLM); tvd = ½ Σ|p - q|.
        beta: the JSD mixture weight or the skew of skew KL.
    Returns:
        (N,) float32, no reduction.
    """
    p = torch.where(valid, log_p.exp(), 0.0)
    q = torch.where(valid, log_q.exp(), 0.0)
    # Zero the log terms outside the support so that 0 * log 0 never produces NaN (in values or
    # in gradients).
    lp = torch.where(valid, log_p, 0.0)
    lq = torch.where(valid, log_q, 0.0)
    name = divergence
    if name == "jsd" and beta <= 0.0:
        name = "fkl"
    elif name == "jsd" and beta >= 1.0:
        name = "rkl"
    if name == "fkl":
        return (p * (lp - lq)).sum(-1)
    if name == "rkl":
        return (q * (lq - lp)).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name in ("jsd", "skew-kl"):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"{name} needs 0 < beta < 1, got {beta}")
        log_mixture = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        log_mixture = torch.where(valid, log_mixture, 0.0)
        teacher_to_mixture = (p * (lp - log_mixture)).sum(-1)
        if name == "skew-kl":
            return teacher_to_mixture
        student_to_mixture = (q * (lq - log_mixture)).sum(-1)
        return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
    raise ValueError(f"unknown divergence {name!r}")


def topk_divergence_sum(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    divergence: Divergence,
    beta: float,
    temperature: float,
    tail: TailPolicy,
    log_normalizer: torch.Tensor | None = None,
    topk_log_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed divergence of student logits from the teacher's top-k.

    Args:
        logits: (N, V) student logits. topk_ids: (N, K) int. topk_logprobs: (N, K) float.
        log_normalizer: optional (N, 1) logsumexp of the logits (shared with the CE term).
        topk_log_tail: optional (N,) stored log tail mass, NaN where none is stored.
    Returns:
        Scalar: T² · Σ_positions divergence. Positions where the teacher kept no valid id carry
        nothing (they do not occur in practice; the teacher's top-k always has a real token).
    """
    has_support = (topk_ids >= 0).any(-1)
    if not bool(has_support.all()):
        logits, topk_ids, topk_logprobs = (
            logits[has_support],
            topk_ids[has_support],
            topk_logprobs[has_support],
        )
        if log_normalizer is not None:
            log_normalizer = log_normalizer[has_support]
        if topk_log_tail is not None:
            topk_log_tail = topk_log_tail[has_support]
    log_p, valid = teacher_log_distribution(
        topk_logprobs, temperature=temperature, tail=tail, log_tail=topk_log_tail
    )
    empty_tail = empty_teacher_tail(topk_logprobs, topk_log_tail) if tail == "bucket" else None
    log_q = student_log_distribution(
        logits,
        topk_ids,
        temperature=temperature,
        tail=tail,
        log_normalizer=log_normalizer,
        empty_teacher_tail=empty_tail,
    )
    values = divergence_per_position(log_p, log_q, valid, divergence=divergence, beta=beta)
    return values.sum() * temperature**2
