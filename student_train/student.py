"""The student model: loading it in float32 (optionally with a LoRA adapter) and proving it can
read the shards (its tokenizer fingerprint must equal the teacher's). Its forward is split in
two halves by shared.causal_lm, so the loss never builds (B, L, V) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.manifest import check_tokenizer_fingerprint
from shared.errors import UserError, one_line
from shared.models import context_length, resolve_model
from shared.tokenizer import load_tokenizer, tokenizer_fingerprint

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraOptions:
    """A peft LoRA adapter on the student (r = 0: train all weights instead)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target: tuple[str, ...] = ("all-linear",)
    rslora: bool = False


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


def load_student(
    reference: str,
    *,
    manifest: dict,
    trust_remote_code: bool,
    lora: LoraOptions = LoraOptions(),
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """Load the student in float32, refusing one whose tokenizer differs from the teacher's.

    `weights_from`: a checkpoint directory whose weights (full model, or LoRA adapter) replace
    the student's, to resume training."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(reference, flag="--student", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    check_tokenizer_fingerprint(manifest, tokenizer_fingerprint(tokenizer), "student")
    vocabulary = len(tokenizer)
    full_weights = weights_from if weights_from is not None and lora.r == 0 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(full_weights or resolved.directory),
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        reason = one_line(error)
        raise UserError(
            f"--student {reference}: cannot load a causal LM ({reason}): pass a "
            "Hugging Face causal-LM directory"
        ) from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocabulary:
        raise UserError(
            f"--student {reference}: its LM head has {rows} rows but its tokenizer {vocabulary} "
            "tokens: resize the student's embeddings to the tokenizer first"
        )
    model.config.use_cache = False
    if lora.r > 0:
        model = add_lora(model, lora)
        if weights_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(Path(weights_from) / ADAPTER_WEIGHTS))
    model.to(device)
    return Student(
        model=model,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        context=context_length(resolved.config),
        is_lora=lora.r > 0,
        reference=reference,
    )


def is_classification_student(reference: str) -> bool:
    """Whether --student is a sequence classifier or a bare encoder (it then trains on class
    distributions), rather than a causal LM (token distributions)."""
    from shared.classification import is_causal_lm, is_encoder_body, is_sequence_classifier

    config = resolve_model(reference, flag="--student").config
    if is_causal_lm(config):
        return False
    return is_sequence_classifier(config) or is_encoder_body(config)


def load_classification_student(
    reference: str,
    *,
    labels: list[str],
    trust_remote_code: bool,
    lora: LoraOptions = LoraOptions(),
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """A sequence classifier with one output per label (in the dump's label order), float32. A
    bare encoder gets a new head; a classifier must already have these labels in this order.
    Its own tokenizer reads the texts (class distributions do not depend on a tokenizer)."""
    from shared.classification import (
        align_labels,
        is_sequence_classifier,
        load_classifier,
        model_labels,
    )

    resolved = resolve_model(reference, flag="--student")
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    if is_sequence_classifier(resolved.config):
        names = align_labels(model_labels(resolved.config), labels, f"--student {reference}")
        if names != list(labels):
            raise UserError(
                f"--student {reference} orders its labels {', '.join(names)} but the data "
                f"orders them {', '.join(labels)}: use a student with the same label order, or "
                "its bare encoder (it gets a new head)"
            )
    full_weights = weights_from if weights_from is not None and lora.r == 0 else None
    model = load_classifier(
        full_weights or resolved.directory,
        labels=labels,
        trust_remote_code=trust_remote_code,
        who="--student",
    )
    model.train()
    if lora.r > 0:
        model = add_lora(model, lora, task_type="SEQ_CLS")
        if weights_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(Path(weights_from) / ADAPTER_WEIGHTS))
    model.to(device)
    return Student(
        model=model,
        tokenizer=tokenizer,
        vocabulary=len(labels),
        context=context_length(resolved.config),
        is_lora=lora.r > 0,
        reference=reference,
    )


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
