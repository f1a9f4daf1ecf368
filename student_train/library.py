"""kd-shards as a library for your own training loop: a dump's rows as a torch IterableDataset,
the collation, and the losses, with the shapes and SUM contract that student-train uses.

    from kd_shards.student_train.library import ShardDataset, LossOptions, chunked_loss_sums

`ShardDataset` is student-train's own stream (shard_stream.ShardStream: rank-sharded, shuffled
by (seed, epoch, window), bounded memory, checksums checked before a shard's first row), cut into
student-train's micro-batches (batches.take_micro_batch) and collated (shared.collation.collate).
`state_dict()` / `load_state_dict()` save and restore its exact position, so a loop that saves
them beside its model resumes on the very next row. docs/library.md has a complete loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from kd_shards.schemas.manifest import check_tokenizer_fingerprint, is_classify
from kd_shards.shared.causal_lm import final_hidden_states, output_logits_function
from kd_shards.shared.collation import Batch, collate
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import TRAINING_COLUMNS, Dump, open_dump
from kd_shards.shared.tokenizer import tokenizer_fingerprint
from kd_shards.student_train.batches import BatchShape, take_micro_batch
from kd_shards.student_train.losses import LossOptions, chunked_loss_sums, loss_sums
from kd_shards.student_train.shard_stream import ShardStream, StreamPosition

__all__ = [
    "Batch",
    "BatchShape",
    "LossOptions",
    "ShardDataset",
    "chunked_loss_sums",
    "collate",
    "final_hidden_states",
    "loss_sums",
    "output_logits_function",
]


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when it is initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """This rank's micro-batches of a token dump, as student-train cuts them.

    Each item is a collated `Batch` (shared.collation: input_ids (B, L), the N target positions'
    row_index / position / target_ids (N,), the teacher's topk_ids / topk_logprobs (N, K) and
    topk_log_tail (N,)). Iterating ends after `epochs` passes (None: never). Iterating again
    continues from where the last iteration stopped, like student-train after a resume: use a
    new dataset, or load_state_dict, to start over.

    Use it with `DataLoader(dataset, batch_size=None)` (the items are batches already) and at
    most one worker: the position lives in one stream, and several workers would each read the
    whole rank's share.
    """

    def __init__(
        self,
        shards: str,
        *,
        rows_per_batch: int | None = 8,
        batch_tokens: int | None = None,
        max_length: int = 2048,
        seed: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 1024,
        epochs: int | None = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        """`shards`: a teacher-dump --out directory (or object-storage URL). A micro-batch is
        `rows_per_batch` rows, or with `batch_tokens` as many rows as fit in rows x longest
        row <= batch_tokens (student-train's --micro-batch and --batch-tokens). Rows longer than
        `max_length` lose prompt tokens from the left, then target tokens from the end. `seed`,
        `shuffle` and `buffer_rows` are student-train's --seed, shuffling and --shuffle-buffer.
        `rank` / `world_size` default to torch.distributed's when it is initialized."""
        if (rows_per_batch is None) == (batch_tokens is None):
            raise UserError("ShardDataset: pass exactly one of rows_per_batch and batch_tokens")
        self.dump: Dump = open_dump(shards, flag="shards")
        if is_classify(self.dump.manifest):
            raise UserError(
                f"{shards} is a classify dump (one class distribution per text): ShardDataset "
                "streams token dumps; train classifiers with student-train"
            )
        default_rank, default_world = distributed_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.shape = BatchShape(
            rows=rows_per_batch, batch_tokens=batch_tokens, max_length=max_length
        )
        self.stream = ShardStream(
            self.dump,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
            shuffle=shuffle,
            buffer_rows=buffer_rows,
            epochs=epochs,
            columns=TRAINING_COLUMNS,
        )

    @property
    def manifest(self) -> dict:
        return self.dump.manifest

    @property
    def vocabulary(self) -> int:
        """len(teacher tokenizer): slice the student's logits to this many columns."""
        return int(self.dump.manifest["tokenizer"]["size"])

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a student tokenizer other than the teacher's (token ids would mean other
        tokens), with the message student-train gives."""
        check_tokenizer_fingerprint(self.dump.manifest, tokenizer_fingerprint(tokenizer), "student")

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise UserError(
                f"ShardDataset under a DataLoader with num_workers={worker.num_workers}: use "
                "num_workers=0 or 1 (one stream holds the position; decoding is not the bottleneck)"
            )
        while rows := take_micro_batch(self.stream, self.shape):
            yield collate(rows)

    def state_dict(self) -> dict:
        """The position of the next row (epoch, window, offset) and what it is valid for."""
        return {
            "position": self.stream.position.to_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.stream.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by state_dict() (same dump, rank layout and seed)."""
        saved = (state["rank"], state["world_size"], state["seed"])
        if saved != (self.rank, self.world_size, self.stream.seed):
            raise UserError(
                f"ShardDataset.load_state_dict: the state is of rank {saved[0]} of {saved[1]} "
                f"with seed {saved[2]}, this dataset rank {self.rank} of {self.world_size} with "
                f"seed {self.stream.seed}: load each rank's own state with the same seed"
            )
        self.stream = ShardStream(
            self.dump,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.stream.seed,
            shuffle=self.stream.shuffle,
            buffer_rows=self.stream.buffer_rows,
            epochs=self.stream.epochs,
            columns=self.stream.columns,
            position=StreamPosition.from_dict(state["position"]),
        )
