"""How close a model is to the teacher, measured on teacher-dump shards: CE on the targets,
KL(teacher || model) on the teacher's top-k (tail bucketed, T = 1) and top-1 agreement.

student-train reports it on --eval-shards during training; kd-eval reports it per model with
--teacher-shards. Both use these functions, so the numbers are comparable. The caller decides
which rows form each batch (student-train: its own micro-batches of a rank's share; kd-eval: the
dump in file order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from kd_shards.shared.causal_lm import chunked_head_sums, final_hidden_states
from kd_shards.shared.collation import collate
from kd_shards.shared.distributions import topk_divergence_sum
from kd_shards.shared.shard_reader import TrainingRow


def fidelity_sums(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_log_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluation sums of one chunk: how close the student is to the teacher.

    Args:
        logits: (N, V). target_ids: (N,). topk_ids, topk_logprobs: (N, K).
        topk_log_tail: optional (N,) stored log tail mass (NaN: 1 - sum(p)).
    Returns:
        (4,) float64: [CE on the targets, KL(teacher || student) on the teacher's top-k with the
        tail bucketed (T = 1), top-1 agreement count (student argmax == teacher's rank-1 id),
        positions]. All sums; divide by positions for means.
    """
    with torch.no_grad():
        ce = F.cross_entropy(logits.float(), target_ids.long(), reduction="sum")
        kl = topk_divergence_sum(
            logits,
            topk_ids,
            topk_logprobs,
            divergence="fkl",
            beta=0.0,
            temperature=1.0,
            tail="bucket",
            topk_log_tail=topk_log_tail,
        )
        agreement = (logits.argmax(-1) == topk_ids[:, 0]).sum()
        positions = ce.new_tensor(len(logits), dtype=torch.float64)
        return torch.stack([ce.double(), kl.double(), agreement.double(), positions])


def fidelity_sums_over_batches(
    model: torch.nn.Module,
    output_logits: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[list[TrainingRow]],
    *,
    chunk_tokens: int,
    device: torch.device,
    bf16: bool = False,
) -> torch.Tensor:
    """(4,) float64 sums [CE, KL, top-1 matches, positions] over the rows of `batches`."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for rows in batches:
            batch = collate(rows)
            hidden = final_hidden_states(
                model, batch.input_ids.to(device), batch.attention_mask.to(device)
            )
            selected = hidden[batch.row_index.to(device), batch.position.to(device)]
            per_position = (
                batch.target_ids,
                batch.topk_ids,
                batch.topk_logprobs,
                batch.topk_log_tail,
            )
            sums += chunked_head_sums(
                selected,
                output_logits,
                fidelity_sums,
                tuple(tensor.to(device) for tensor in per_position),
                chunk_tokens=chunk_tokens,
                width=4,
            ).double()
    model.train(was_training)
    return sums


def fidelity_metrics(sums: torch.Tensor) -> dict:
    """Means from fidelity sums (after adding them over ranks)."""
    ce, kl, agreement, positions = sums.tolist()
    positions = max(positions, 1.0)
    return {
        "eval_ce": ce / positions,
        "eval_kl": kl / positions,
        "eval_top1": agreement / positions,
        "eval_tokens": int(positions),
    }
