"""Cross-tokenizer KD losses: pure functions of student logits and a teacher's stored top-k whose
ids belong to ANOTHER vocabulary.

- ULD, the Universal Logit Distillation loss (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", arXiv:2402.12030): the
  Wasserstein-1 distance between the two distributions under a cost that ignores which token
  is which, whose closed form is the L1 distance between the probability vectors each sorted in
  decreasing order, Σ_i |p_(i) − q_(i)|. It needs no vocabulary mapping.
- The GOLD-style hybrid (TRL's GOLD trainer, trl/experimental/gold/gold_trainer.py): teacher ids
  whose decoded string is exactly one student token (shared.token_alignment.exact_token_map)
  get forward KL on that matched mass, Σ_matched p_i (log p_i − log q_{m(i)}); ULD compares the
  rest, the unmatched teacher probabilities against the student's probabilities outside the
  matched ids.

Truncation, because a dump stores only the teacher's top entries: at a position with c real
stored entries (PAD slots: -inf), the teacher's sorted vector is those c probabilities and the
student's is its c largest probabilities (torch.topk over the full vocabulary; the hybrid's: of
the ids outside the matched ones). Tail policy "bucket" (the default) adds one more outcome,
"everything else": |p_tail − q_tail| with p_tail the teacher's stored tail (or 1 − Σp) and
q_tail the student's mass outside the compared entries, so both vectors sum to 1, as in ULD's
full-vocabulary form. "renormalize" compares the c entries of each side renormalized to sum to
1 (the hybrid: the teacher's renormalized, the student's full-vocabulary probabilities, and no
tail term).

Shapes: M aligned positions, K stored entries, V the student's vocabulary. Every function
returns a SUM over positions (the caller divides once per optimizer step). Temperature is 1
(the config refuses others with these losses).
"""

from __future__ import annotations

import torch

from kd_shards.shared.distributions import TailPolicy


def _teacher_probabilities(
    teacher_logprobs: torch.Tensor, teacher_log_tail: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p (M, K) with 0 in PAD slots, real (M, K) bool, p_tail (M,)): the tail is the stored one
    where given (not NaN), else 1 − Σp clamped at 0."""
    real = torch.isfinite(teacher_logprobs)
    p = torch.where(real, teacher_logprobs, torch.zeros_like(teacher_logprobs)).exp() * real
    rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    if teacher_log_tail is None:
        return p, real, rest
    stored = teacher_log_tail.float()
    return p, real, torch.where(torch.isnan(stored), rest, stored.exp())


def _sorted_l1(
    p: torch.Tensor, compared: torch.Tensor, q: torch.Tensor, p_tail, q_tail, tail: TailPolicy
) -> torch.Tensor:
    """(M,) Σ_i |p_(i) − q_(i)| over each row's first `compared` sorted slots, plus the tail
    term (bucket), or over both renormalized slots (renormalize).

    p: (M, K) teacher probabilities (0 where not compared). compared: (M,) how many slots.
    q: (M, V') student probabilities to sort (V' >= K). p_tail, q_tail: (M,)."""
    width = p.shape[1]
    p_sorted = torch.sort(p, dim=-1, descending=True).values
    q_sorted = torch.topk(q, min(width, q.shape[1]), dim=-1).values
    if q_sorted.shape[1] < width:
        q_sorted = torch.nn.functional.pad(q_sorted, (0, width - q_sorted.shape[1]))
    slots = torch.arange(width, device=p.device).unsqueeze(0) < compared.unsqueeze(1)
    q_sorted = q_sorted * slots
    if tail == "bucket":
        q_rest = (q_tail - q_sorted.sum(-1)).clamp(min=0.0)
        return (p_sorted - q_sorted).abs().sum(-1) + (p_tail - q_rest).abs()
    p_sorted = p_sorted / p_sorted.sum(-1, keepdim=True).clamp(min=1e-30)
    q_sorted = q_sorted / q_sorted.sum(-1, keepdim=True).clamp(min=1e-30)
    return (p_sorted - q_sorted).abs().sum(-1)


def uld_sum(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_log_tail: torch.Tensor | None = None,
    *,
    tail: TailPolicy = "bucket",
) -> torch.Tensor:
    """ULD summed over positions: Σ_m Σ_i |p_(i) − q_(i)| (+ |p_tail − q_tail| with bucket).

    Args:
        logits: (M, V) student logits at the aligned positions.
        teacher_logprobs: (M, K) the teacher's stored log-probabilities (-inf in PAD slots;
            every row has at least one real entry).
        teacher_log_tail: optional (M,) the stored log tail mass (NaN: none stored).
        tail: bucket or renormalize (module docstring).
    Returns:
        Scalar float32 sum over the M positions.
    """
    p, real, p_tail = _teacher_probabilities(teacher_logprobs.float(), teacher_log_tail)
    q = torch.softmax(logits.float(), dim=-1)
    return _sorted_l1(p, real.sum(-1), q, p_tail, torch.ones_like(p_tail), tail).sum()


def hybrid_sum(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mapped_ids: torch.Tensor,
    teacher_log_tail: torch.Tensor | None = None,
    *,
    tail: TailPolicy = "bucket",
) -> torch.Tensor:
    """GOLD-style hybrid summed over positions: KL on the exactly matched teacher mass plus ULD
    on the unmatched rest.

    KL part: Σ_{i matched} p_i (log p_i − log q_{m(i)}), q the student's softmax over its whole
    vocabulary (bucket) — with renormalize, p renormalized over its stored entries. ULD part:
    the unmatched teacher probabilities, sorted, against the student's largest probabilities
    among the ids no matched entry maps to, as in uld_sum; with bucket the tail term compares
    the teacher's tail with the student's mass outside both the matched ids and the compared
    unmatched ones.

    Args:
        logits: (M, V) student logits at the aligned positions.
        teacher_logprobs: (M, K) the teacher's stored log-probabilities (-inf in PAD slots).
        mapped_ids: (M, K) int, the student id each teacher entry maps to exactly, -1 where
            none (and in PAD slots).
        teacher_log_tail: optional (M,) the stored log tail mass (NaN: none stored).
        tail: bucket or renormalize.
    Returns:
        Scalar float32 sum over the M positions.
    """
    logits = logits.float()
    p, real, p_tail = _teacher_probabilities(teacher_logprobs.float(), teacher_log_tail)
    if tail == "renormalize":
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
        p_tail = torch.zeros_like(p_tail)
    matched = real & (mapped_ids >= 0)
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    vocabulary = logits.shape[1]
    index = torch.where(matched, mapped_ids, torch.full_like(mapped_ids, vocabulary)).long()
    padded_log_q = torch.nn.functional.pad(log_q, (0, 1))  # column V: a dummy for unmatched
    matched_log_q = padded_log_q.gather(1, index)
    log_p = torch.where(matched, teacher_logprobs.float(), torch.zeros_like(p))
    if tail == "renormalize":
        log_p = torch.where(matched, p.clamp(min=1e-30).log(), log_p)
    kl = torch.where(matched, p * (log_p - matched_log_q), torch.zeros_like(p)).sum(-1)
    # The student's probabilities outside the ids the matched entries map to.
    keep = torch.ones(logits.shape[0], vocabulary + 1, device=logits.device)
    keep = keep.scatter(1, index, 0.0)[:, :vocabulary]
    q_unmatched = q * keep
    unmatched = real & ~matched
    p_unmatched = p * unmatched
    q_outside_matched = q_unmatched.sum(-1)
    uld = _sorted_l1(p_unmatched, unmatched.sum(-1), q_unmatched, p_tail, q_outside_matched, tail)
    return (kl + uld).sum()


def cross_tokenizer_loss_sums(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    aligned: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    mapped_ids: torch.Tensor,
    *,
    kd: str,
    alpha: float,
    tail: TailPolicy,
) -> torch.Tensor:
    """Summed training loss of one chunk of student positions: total = α·CE + (1−α)·KD, CE on
    every position, KD (ULD or the hybrid) on the aligned ones only (kd "sequence": total = CE).

    Args:
        logits: (N, V) student logits. target_ids: (N,) the student's target tokens.
        aligned: (N,) bool, whether the position has a teacher distribution.
        teacher_logprobs: (N, K), mapped_ids: (N, K), teacher_log_tail: (N,): the aligned
            teacher position's entries (rows of unaligned positions are ignored, but must be
            finite where a real distribution would be: the collation fills them with p = 1).
        kd: "sequence", "uld" or "hybrid". alpha: CE's weight. tail: bucket or renormalize.
    Returns:
        (3,) float32: [total, ce, kd] sums over the N positions (kd is 0 for "sequence").
    """
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits, target_ids.long(), reduction="sum")
    if kd == "sequence":
        return torch.stack([ce, ce, torch.zeros_like(ce)])
    rows = aligned.nonzero().squeeze(1)
    if rows.numel() == 0:
        divergence = logits.sum() * 0.0  # keeps the graph connected on chunks without teacher
    elif kd == "uld":
        divergence = uld_sum(
            logits[rows], teacher_logprobs[rows], teacher_log_tail[rows], tail=tail
        )
    else:
        divergence = hybrid_sum(
            logits[rows], teacher_logprobs[rows], mapped_ids[rows], teacher_log_tail[rows],
            tail=tail,
        )  # fmt: skip
    if alpha == 0:
        ce = ce.detach()
    return torch.stack([alpha * ce + (1.0 - alpha) * divergence, ce, divergence])
