"""Fully sharded data parallel students (--parallel fsdp): torch's FSDP2 and sharded checkpoints.

Each decoder layer is its own FSDP2 unit (`fully_shard`), and the rest of the student
(embeddings, final norm, LM head) belongs to a root unit that wraps the objective's loss
(`ShardedStudent`): the loss runs the decoder and applies the LM head chunk by chunk outside
the model's own forward, so the root's forward must be the whole loss for FSDP2 to gather those
weights for it and to reduce their gradients after it. Gradients are reduce-scattered as SUMS
over ranks (divide factor 1), as the data-parallel path sums them: the loss is still divided
once, by the target tokens of the whole step over all ranks.

Every rank must run the same number of forward and backward passes per step (each one gathers
and reduce-scatters weights collectively). A rank whose stream has no micro-batch left, or one
without target tokens, therefore runs its last real micro-batch again with weight 0: it adds
zero gradient, and the collectives stay matched.

Checkpoints: the model and optimizer state as torch.distributed.checkpoint writes them (one
file per rank, in checkpoint/sharded/), and the full model gathered to rank 0 as safetensors
(what final/ publishes and transformers loads). torch.distributed.checkpoint could load the
shards onto another number of ranks, but --resume keeps the world size: the loader positions
are per rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_shards.shared.causal_lm import causal_lm
from kd_shards.shared.errors import UserError
from kd_shards.student_train.distributed import Distributed

SHARDED_DIRECTORY = "sharded"
"""The torch.distributed.checkpoint directory inside a checkpoint."""


class ShardedStudent(torch.nn.Module):
    """The FSDP2 root: its forward is the objective's loss sums of one micro-batch."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective
        self.placeholder = None
        """This rank's last micro-batch with target tokens (see the module's docstring)."""

    def forward(self, batch, device: torch.device) -> torch.Tensor:
        """(4,) loss sums of `batch` (the objective's sums: student_train/family.py)."""
        return self.objective.sums(self.model, batch, device)

    def batch_to_run(self, batch) -> tuple[object, float]:
        """(the micro-batch to run, its weight): a batch without target tokens is replaced by
        the last one that had some, with weight 0."""
        if batch.target_tokens > 0:
            self.placeholder = batch
            return batch, 1.0
        if self.placeholder is None:
            raise UserError(
                "--parallel fsdp: a rank had no training rows at its first step: use fewer "
                "ranks than rows, or --parallel ddp"
            )
        return self.placeholder, 0.0


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The student's list of decoder layers (each becomes one FSDP2 unit)."""
    decoder = causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(
            f"--parallel fsdp: {type(causal_lm(model)).__name__} has no decoder.layers list to "
            "shard: use --parallel ddp for this architecture"
        )
    return layers


def shard_student(model: torch.nn.Module, objective, context: Distributed) -> ShardedStudent:
    """Shard `model` over the ranks with FSDP2 (in place: its parameters become DTensors)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    root = ShardedStudent(model, objective)
    fully_shard(root)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sums over ranks, not means: the loss is already divided by the whole step's
            # tokens. A plain SUM reduction (gloo has no pre-multiplied sum).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def full_model_copy(root: ShardedStudent, is_main: bool) -> torch.nn.Module | None:
    """On rank 0, a plain CPU copy of the student holding its full weights (gathered from the
    shards), for save_pretrained; None on the other ranks. Every rank calls it (the gather is
    collective); the copy is built without collectives, so rank 0 can save it alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(
        root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_main:
        return None
    model = causal_lm(root.model)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    weights = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    copy.load_state_dict(weights, assign=True)
    copy.tie_weights()
    return copy


def sharded_state(root: ShardedStudent, optimizer) -> dict:
    """This rank's shards of the model and optimizer state, for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(root, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(state: dict, checkpoint: Path) -> None:
    """Every rank writes its shards into checkpoint/sharded/ (rank 0 also the metadata)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(Path(checkpoint) / SHARDED_DIRECTORY))


def load_sharded(root: ShardedStudent, optimizer, checkpoint: Path) -> None:
    """Restore the model and optimizer shards of a checkpoint onto this run's sharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(root, optimizer)
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED_DIRECTORY))
    set_state_dict(
        root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
