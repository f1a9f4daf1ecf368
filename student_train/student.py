"""What every student family shares: the loaded student (`Student`) and its LoRA adapter.

Loading a particular kind of model, and its forward, live in its family
(student_train/families/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kd_shards.shared.errors import UserError, one_line

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraOptions:
    """A peft LoRA adapter on the student (r = 0: train all weights instead)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target: tuple[str, ...] = ("all-linear",)
    rslora: bool = False


NO_LORA = LoraOptions()
"""Train all of the student's weights."""


@dataclass
class Student:
    model: torch.nn.Module
    """The trainable model (a peft.PeftModel when LoRA is on)."""
    tokenizer: object
    vocabulary: int
    """len(tokenizer): logits are sliced to this many columns (classifiers: the labels)."""
    context: int | None
    """The student's context length from its config, if it states one."""
    is_lora: bool
    reference: str
    """What --student named (path or hub id)."""


def with_lora(
    model: torch.nn.Module, lora: LoraOptions, weights_from: Path | None, task_type: str
) -> torch.nn.Module:
    """`model` with a LoRA adapter when lora.r > 0 (its weights from the checkpoint directory
    `weights_from`, to resume), else `model` itself. task_type: peft's (CAUSAL_LM, SEQ_CLS)."""
    if lora.r == 0:
        return model
    model = add_lora(model, lora, task_type=task_type)
    if weights_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(Path(weights_from) / ADAPTER_WEIGHTS))
    return model


def add_lora(model, lora: LoraOptions, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA adapter; only the adapter's weights train (and, for a
    classifier, its head: peft's SEQ_CLS task keeps the head fully trainable)."""
    from peft import LoraConfig, get_peft_model

    target = tuple(lora.target)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target[0] if target == ("all-linear",) else list(target),
        use_rslora=lora.rslora,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"--lora-target {','.join(target)}: {one_line(error)}: name modules "
            "the student has (e.g. q_proj,v_proj) or use all-linear"
        ) from None
