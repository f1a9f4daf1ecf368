"""Collation: rows read from shards become the tensors a model and the losses take.

A pure function of rows, shared by training and the fidelity evaluation. Sequences are
prompt + target, right-padded (so causal attention at real positions never sees padding and
results do not depend on how rows are grouped). Only target positions carry loss: for target
token t of a row with P prompt tokens, the predicting position is P + t - 1; prompt positions
and padding are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from kd_shards.schemas.shard import PAD_ID
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import TrainingRow


@dataclass(frozen=True)
class Batch:
    """One micro-batch. B rows, L longest sequence, N target positions, K teacher top-k."""

    input_ids: torch.Tensor
    """(B, L) int64, right-padded with 0 (masked)."""
    attention_mask: torch.Tensor
    """(B, L) int64, 1 on real tokens."""
    row_index: torch.Tensor
    """(N,) int64: the row of each target position."""
    position: torch.Tensor
    """(N,) int64: the sequence position whose output predicts the target."""
    target_ids: torch.Tensor
    """(N,) int64: the target tokens."""
    topk_ids: torch.Tensor | None
    """(N, K) int64 teacher ids (PAD_ID = -1 in freed slots); None when lengths only."""
    topk_logprobs: torch.Tensor | None
    """(N, K) float32 teacher logprobs (-inf in freed slots)."""
    topk_log_tail: torch.Tensor | None
    """(N,) float32 log of the teacher's mass outside its stored ids (-inf: none), NaN where the
    dump stores no tail (then it is 1 - sum(p))."""
    sample_ids: tuple[str, ...]

    @property
    def target_tokens(self) -> int:
        return int(self.target_ids.numel())

    @property
    def rows(self) -> int:
        return len(self.sample_ids)


def fit_row(row: TrainingRow, max_length: int) -> TrainingRow:
    """Shorten a row to at most max_length tokens: prompt tokens go first (from the left, keeping
    at least one, because the first target is predicted from the last prompt token), then target
    tokens from the end."""
    if row.length <= max_length:
        return row
    if row.mask_positions is not None:
        raise UserError(
            f"masked-LM row {row.sample_id} has {row.length} tokens, above --max-length "
            f"{max_length} (or the student's context): raise it, or dump shorter --chunk-tokens"
        )
    keep_prompt = max(1, max_length - len(row.target_ids))
    keep_target = max_length - keep_prompt
    return replace(
        row,
        prompt_ids=row.prompt_ids[len(row.prompt_ids) - keep_prompt :],
        target_ids=row.target_ids[:keep_target],
        topk_ids=None if row.topk_ids is None else row.topk_ids[:keep_target],
        topk_logprobs=None if row.topk_logprobs is None else row.topk_logprobs[:keep_target],
        topk_log_tail=None if row.topk_log_tail is None else row.topk_log_tail[:keep_target],
    )


def keep_top_entries(row: TrainingRow, count: int) -> TrainingRow:
    """A row with only the `count` most likely teacher entries of every position; the mass of
    the others joins the stored tail (which stays NaN where the dump stores none).

    The entries are in rank order, so these are the first `count` columns."""
    if row.topk_ids is None or row.topk_ids.shape[1] <= count:
        return row
    dropped = np.exp(row.topk_logprobs[:, count:].astype(np.float64)).sum(axis=1)
    tail = row.topk_log_tail
    if tail is not None:
        with np.errstate(divide="ignore"):
            tail = np.log(np.exp(tail.astype(np.float64)) + dropped).astype(np.float32)
    return replace(
        row,
        topk_ids=row.topk_ids[:, :count],
        topk_logprobs=row.topk_logprobs[:, :count],
        topk_log_tail=tail,
    )


def collate(rows: list[TrainingRow]) -> Batch:
    """Stack rows into a right-padded Batch (see Batch for shapes). Rows need >= 1 prompt token."""
    longest = max(row.length for row in rows) if rows else 0
    input_ids = np.zeros((len(rows), longest), dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    row_index, position = [], []
    for index, row in enumerate(rows):
        prompt_length = len(row.prompt_ids)
        input_ids[index, :prompt_length] = row.prompt_ids
        input_ids[index, prompt_length : row.length] = row.target_ids
        attention_mask[index, : row.length] = 1
        row_index.append(np.full(len(row.target_ids), index, dtype=np.int64))
        position.append(np.arange(prompt_length - 1, row.length - 1, dtype=np.int64))

    def concatenate(parts: list[np.ndarray], dtype, width: int | None = None) -> torch.Tensor:
        if parts:
            return torch.from_numpy(np.concatenate(parts).astype(dtype, copy=False))
        return torch.zeros((0,) if width is None else (0, width), dtype=getattr(torch, dtype))

    has_topk = bool(rows) and rows[0].topk_ids is not None
    width = max(row.topk_ids.shape[1] for row in rows) if has_topk else None

    def widened(array: np.ndarray, fill) -> np.ndarray:
        # rows of a variable-width representation are padded to the widest
        missing = width - array.shape[1]
        return np.pad(array, ((0, 0), (0, missing)), constant_values=fill) if missing else array

    def log_tail(row: TrainingRow) -> np.ndarray:
        if row.topk_log_tail is None:
            return np.full(len(row.target_ids), np.nan, dtype=np.float32)
        return row.topk_log_tail

    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        row_index=concatenate(row_index, "int64"),
        position=concatenate(position, "int64"),
        target_ids=concatenate([row.target_ids for row in rows], "int64"),
        topk_ids=(
            concatenate([widened(row.topk_ids, PAD_ID) for row in rows], "int64", width)
            if has_topk
            else None
        ),
        topk_logprobs=(
            concatenate([widened(row.topk_logprobs, -np.inf) for row in rows], "float32", width)
            if has_topk
            else None
        ),
        topk_log_tail=(
            concatenate([log_tail(row) for row in rows], "float32") if has_topk else None
        ),
        sample_ids=tuple(row.sample_id for row in rows),
    )
