"""Training losses of student-train: pure functions of student logits and the teacher's stored
top-k.

Nothing here reads files or configs. Shapes use N for target positions (flattened over the
batch), K for the teacher's top-k, V for the student's vocabulary (already sliced to
len(tokenizer)), H for hidden size.

Every function returns SUMS over positions. The caller divides once, by the number of target
tokens in the whole optimizer step (all micro-batches, all ranks), so that the gradient does not
depend on how a batch is split. The KD term compares the distributions that
shared.distributions defines (tail policies, temperature, PAD slots); CE is on the stored
target tokens (sequence-level KD when those are the teacher's samples).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd_shards.shared.causal_lm import chunked_head_sums
from kd_shards.shared.distributions import TailPolicy, divergence_per_position, topk_divergence_sum
from kd_shards.shared.loss_names import LOSSES, Loss  # noqa: F401 - LOSSES: importable beside the losses

DEFAULT_BETA = {"jsd": 0.5, "skew-kl": 0.1}
"""Default β: JSD's mixture weight (GKD) and skew KL's skew (DistiLLM)."""


@dataclass(frozen=True)
class LossOptions:
    """The loss's hyper-parameters, resolved once from the config and passed whole to the loss
    functions below (plain numbers and names: the math reads no config)."""

    loss: Loss
    alpha: float
    """Weight of CE in total = α·CE + (1−α)·KD."""
    beta: float
    """JSD's mixture weight or skew KL's skew; resolved: the per-loss default when --beta is not
    given."""
    temperature: float
    tail: TailPolicy
    """How the teacher's mass outside its stored ids enters token KD (unused by classes)."""


def loss_sums(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_log_tail: torch.Tensor | None = None,
    *,
    options: LossOptions,
) -> torch.Tensor:
    """Summed training loss of one chunk: total = α·CE + (1-α)·KD (loss "ce": total = CE).

    With a sampled (RS-KD) dump the teacher's probabilities are the draws' weights w_i = hits /
    draws and its tail is empty, so forward KL with the bucket tail is sum_i w_i (log w_i -
    log s_i) + const: its gradient (sum w) s - w has expectation s - p, the gradient of
    KL(p || s), with s the student's softmax over the whole vocabulary.

    Args:
        logits: (N, V). target_ids: (N,) int, the tokens that carry loss (sequence KD target).
        topk_ids: (N, K) int. topk_logprobs: (N, K) float.
        topk_log_tail: optional (N,) the teacher's stored log tail mass (NaN: 1 - sum(p)).
        options: the loss, α, β, T and tail policy.
    Returns:
        (3,) float32: [total, ce, kd] sums over the N positions (kd is 0 for loss "ce").
    """
    loss, alpha, tail = options.loss, options.alpha, options.tail
    logits = logits.float()
    ce_trains = loss == "ce" or alpha > 0
    # One logsumexp over the vocabulary serves CE and the bucketed tail. When neither needs its
    # gradient (renormalized KD with alpha = 0), CE is computed for the logs only, without one.
    normalizer_trains = ce_trains or tail == "bucket"
    with torch.set_grad_enabled(torch.is_grad_enabled() and normalizer_trains):
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    target_logits = torch.gather(logits, 1, target_ids.long().unsqueeze(-1))
    ce = (log_normalizer - target_logits).sum()
    if not ce_trains:
        ce = ce.detach()
    if loss == "ce":
        return torch.stack([ce, ce, torch.zeros_like(ce)])
    kd = topk_divergence_sum(
        logits,
        topk_ids,
        topk_logprobs,
        divergence=loss,
        beta=options.beta,
        temperature=options.temperature,
        tail=tail,
        log_normalizer=log_normalizer,
        topk_log_tail=topk_log_tail,
    )
    return torch.stack([alpha * ce + (1.0 - alpha) * kd, ce, kd])


def chunked_loss_sums(
    hidden: torch.Tensor,
    output_logits: Callable[[torch.Tensor], torch.Tensor],
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_log_tail: torch.Tensor | None = None,
    *,
    options: LossOptions,
    chunk_tokens: int,
) -> torch.Tensor:
    """loss_sums over hidden states, chunk by chunk, never holding all positions' logits
    (shared.causal_lm.chunked_head_sums: peak memory is one chunk of full-vocabulary logits).

    Args:
        hidden: (N, H) final hidden states at the positions that predict each target.
        output_logits: maps (C, H) hidden states to (C, V) logits (the LM head, sliced to V).
        target_ids: (N,). topk_ids, topk_logprobs: (N, K). topk_log_tail: optional (N,).
        chunk_tokens: positions per chunk. The rest: see loss_sums.
    Returns:
        (3,) float32: [total, ce, kd] sums over the N positions.
    """
    per_chunk = functools.partial(loss_sums, options=options)
    if topk_log_tail is None:
        topk_log_tail = torch.full(target_ids.shape, math.nan, device=target_ids.device)
    return chunked_head_sums(
        hidden,
        output_logits,
        per_chunk,
        (target_ids, topk_ids, topk_logprobs, topk_log_tail),
        chunk_tokens=chunk_tokens,
        width=3,
    )


def classification_loss_sums(
    logits: torch.Tensor,
    gold: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    *,
    options: LossOptions,
) -> torch.Tensor:
    """Summed classification loss: total = α·CE(gold) + (1−α)·T²·D(p_T ‖ q_T) (loss "ce":
    total = CE), over all L labels (a class distribution has no tail).

    p_T = softmax(teacher log-probabilities / T), q_T = softmax(logits / T); D is the
    divergence named by `loss` (shared.distributions.divergence_per_position).

    Args:
        logits: (B, L) student logits. gold: (B,) int, NO_LABEL (-1) where the example has no
            gold label (it adds no CE). teacher_logprobs: (B, L) teacher log-probabilities in
            label order (T = 1), or None for labels only (then loss must be "ce").
        options: the loss, α, β and T (a class distribution has no tail policy).
    Returns:
        (3,) float32: [total, ce, kd] sums over the B examples (kd is 0 for loss "ce").
    """
    loss, alpha, temperature = options.loss, options.alpha, options.temperature
    logits = logits.float()
    log_q = torch.log_softmax(logits, dim=-1)
    labelled = gold >= 0
    ce = -log_q[labelled].gather(1, gold[labelled].long().unsqueeze(1)).sum()
    if loss == "ce":
        return torch.stack([ce, ce, torch.zeros_like(ce)])
    if teacher_logprobs is None:
        raise ValueError("a KD loss needs the teacher's class distributions")
    log_p = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    log_q_tempered = torch.log_softmax(logits / temperature, dim=-1)
    valid = torch.ones_like(log_p, dtype=torch.bool)
    kd = (
        divergence_per_position(
            log_p, log_q_tempered, valid, divergence=loss, beta=options.beta
        ).sum()
        * temperature**2
    )
    if alpha == 0:
        ce = ce.detach()
    return torch.stack([alpha * ce + (1.0 - alpha) * kd, ce, kd])


def hidden_state_mse_sum(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ over examples of the mean squared difference between the projected student state and
    the teacher's: the hidden-state loss before its weight.

    Args:
        projected: (B, H) the student's pooled state through the learned projection.
        teacher: (B, H) the teacher's pooled state.
    Returns:
        Scalar: Σ_b mean_h (projected − teacher)².
    """
    return (projected.float() - teacher.float()).pow(2).mean(-1).sum()


def masked_lm_distillation_sums(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_log_tail: torch.Tensor | None,
    student_hidden: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    *,
    weights: tuple[float, float, float],
    temperature: float,
    tail: TailPolicy,
) -> torch.Tensor:
    """Summed DistilBERT triple loss: total = α_kd·KD + α_mlm·CE + α_cos·COS.

    KD = Σ_masked T²·KL(p_T ‖ q_T) over the teacher's stored entries (tail per `tail`), CE =
    Σ_masked −log q(original token) at T = 1, COS = Σ_tokens w·(1 − cos(h_s, h_t)).

    The caller divides by the step's masked positions. `token_weights` carry the cosine term
    to that divisor: with w = T_r / P_r for every token of row r (its masked positions over its
    tokens), a row adds its mean cosine loss times T_r, so the step's COS is the mean over
    tokens that DistilBERT takes, weighted as the other two terms are, and the sums still add
    up over micro-batches whatever the split.

    Args:
        logits: (N, V) student logits at the N masked positions. target_ids: (N,) the original
            tokens there. topk_ids, topk_logprobs: (N, K) the teacher's entries.
            topk_log_tail: optional (N,) the teacher's stored log tail mass.
        student_hidden, teacher_hidden: (M, H) last hidden states at the M tokens the cosine
            term covers, or None when it is off (α_cos = 0). token_weights: (M,) their w.
        weights: (α_kd, α_mlm, α_cos).
    Returns:
        (4,) float32: [total, ce, kd, cos] sums.
    """
    kd_weight, ce_weight, cosine_weight = weights
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    target_logits = torch.gather(logits, 1, target_ids.long().unsqueeze(-1))
    ce = (log_normalizer - target_logits).sum()
    kd = topk_divergence_sum(
        logits,
        topk_ids,
        topk_logprobs,
        divergence="fkl",
        beta=0.0,
        temperature=temperature,
        tail=tail,
        log_normalizer=log_normalizer,
        topk_log_tail=topk_log_tail,
    )
    cosine = ce.new_zeros(())
    if student_hidden is not None:
        similarity = torch.nn.functional.cosine_similarity(
            student_hidden.float(), teacher_hidden.float(), dim=-1
        )
        cosine = (token_weights.float() * (1.0 - similarity)).sum()
    total = kd_weight * kd + ce_weight * ce + cosine_weight * cosine
    return torch.stack([total, ce, kd, cosine])
