"""How close a model is to the teacher, measured on teacher-dump shards: CE on the targets,
KL(teacher || model) on the teacher's top-k (tail bucketed, T = 1) and top-1 agreement.

student-train reports it on --eval-shards during training; kd-eval reports it per model with
--teacher-shards. Both use this one function, so the numbers are comparable.
"""

from __future__ import annotations

import torch

from student_train.batches import collate, take_micro_batch
from student_train.losses import fidelity_sums
from student_train.shard_stream import Dump, ShardStream
from student_train.student import final_hidden_states


def fidelity_sums_on_dump(
    model,
    output_logits,
    dump: Dump,
    *,
    rank: int,
    world_size: int,
    batch_shape: dict,
    chunk_tokens: int,
    buffer_rows: int,
    limit: int | None,
    device: torch.device,
    bf16: bool = False,
) -> torch.Tensor:
    """(4,) float64 sums [CE, KL, top-1 matches, positions] over this rank's share of the dump
    (at most `limit` rows), in file order."""
    stream = ShardStream(
        dump, rank=rank, world_size=world_size, shuffle=False, buffer_rows=buffer_rows, epochs=1
    )
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    taken = 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        while rows := take_micro_batch(stream, **batch_shape):
            if limit is not None:
                rows = rows[: max(0, limit - taken)]
            if not rows:
                break
            taken += len(rows)
            batch = collate(rows)
            hidden = final_hidden_states(
                model, batch.input_ids.to(device), batch.attention_mask.to(device)
            )
            selected = hidden[batch.row_index.to(device), batch.position.to(device)]
            for start in range(0, len(selected), chunk_tokens):
                stop = start + chunk_tokens
                sums += fidelity_sums(
                    output_logits(selected[start:stop]),
                    batch.target_ids[start:stop].to(device),
                    batch.topk_ids[start:stop].to(device),
                    batch.topk_logprobs[start:stop].to(device),
                )
    model.train(was_training)
    return sums


def fidelity_metrics(sums: torch.Tensor) -> dict:
    """Means from fidelity_sums_on_dump's sums (after adding them over ranks)."""
    ce, kl, agreement, positions = sums.tolist()
    positions = max(positions, 1.0)
    return {
        "eval_ce": ce / positions,
        "eval_kl": kl / positions,
        "eval_top1": agreement / positions,
        "eval_tokens": int(positions),
    }
