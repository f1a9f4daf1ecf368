"""The student model: loading it in float32 (optionally with a LoRA adapter) and proving it can
read the shards (its tokenizer fingerprint must equal the teacher's). Its forward is split in
two halves by shared.causal_lm, so the loss never builds (B, L, V) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.manifest import check_tokenizer_fingerprint
from shared.errors import UserError
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
    """len(tokenizer): logits are sliced to this many columns."""
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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UserError(
            f"--student {reference}: cannot load a causal LM ({first_line[:160]}): pass a "
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


def add_lora(model, lora: LoraOptions):
    """Wrap `model` in a peft LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    target = tuple(lora.target)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target[0] if target == ("all-linear",) else list(target),
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"--lora-target {','.join(target)}: {str(error).splitlines()[0][:160]}: name modules "
            "the student has (e.g. q_proj,v_proj) or use all-linear"
        ) from None
