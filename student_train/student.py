"""The student model: loading it (optionally with a LoRA adapter), proving it can read the
shards (tokenizer fingerprint), and the two halves of its forward that the chunked loss needs.

The loss never calls `model(...).logits`, which would materialize (B, L, V) logits. Instead it
runs the decoder to final hidden states, selects the target positions, and applies the LM head
chunk by chunk (student_train.losses.chunked_loss_sums). `check_output_path` proves at start-up,
on a short input, that this reproduces the model's own logits, so an architecture that does
something extra after its LM head is refused instead of silently mistrained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.manifest import check_tokenizer_fingerprint
from shared.errors import UserError
from shared.models import context_length, resolve_model
from shared.tokenizer import load_tokenizer, tokenizer_fingerprint

ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    lora_r: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_target: tuple[str, ...] = ("all-linear",),
    rslora: bool = False,
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """Load the student in float32, refusing one whose tokenizer differs from the teacher's.

    `weights_from`: a checkpoint directory whose weights (full model, or LoRA adapter) replace
    the student's, to resume training."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(reference, flag="--student")
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    check_tokenizer_fingerprint(manifest, tokenizer_fingerprint(tokenizer), "student")
    vocabulary = len(tokenizer)
    full_weights = weights_from if weights_from is not None and lora_r == 0 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(full_weights or resolved.directory),
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
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
    if lora_r > 0:
        model = add_lora(model, lora_r, lora_alpha, lora_dropout, lora_target, rslora)
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
        is_lora=lora_r > 0,
        reference=reference,
    )


def add_lora(model, r: int, alpha: float, dropout: float, target: tuple[str, ...], rslora: bool):
    """Wrap `model` in a peft LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    targets = target[0] if tuple(target) == ("all-linear",) else list(target)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"--lora-target {','.join(target)}: {str(error).splitlines()[0][:160]}: name modules "
            "the student has (e.g. q_proj,v_proj) or use all-linear"
        ) from None


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a possible peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L, H) final hidden states (after the final norm), without the LM head."""
    decoder = causal_lm(model).get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state


def output_logits_function(
    model: torch.nn.Module, vocabulary: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps (C, H) hidden states to (C, vocabulary) logits: the LM head, sliced to the tokenizer
    (padding rows of the embedding never receive probability), with final-logit soft-capping
    where the architecture has it (Gemma 2)."""
    language_model = causal_lm(model)
    head = language_model.get_output_embeddings()
    softcap = getattr(language_model.config, "final_logit_softcapping", None)

    def output_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)[..., :vocabulary]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return output_logits


def check_output_path(student: Student, device: torch.device | str = "cpu") -> None:
    """Refuse a student whose logits final_hidden_states + output_logits do not reproduce."""
    model = student.model
    input_ids = torch.arange(1, 9, device=device).remainder(student.vocabulary).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        hidden = final_hidden_states(model, input_ids, attention_mask)
        actual = output_logits_function(model, student.vocabulary)(hidden).float()
    expected = expected[..., : student.vocabulary]
    difference = (expected - actual).abs().max().item()
    if not difference <= 1e-3 * max(1.0, expected.abs().max().item()):
        architecture = type(causal_lm(model)).__name__
        raise UserError(
            f"--student: {architecture} computes its logits in a way student-train does not "
            f"reproduce (max difference {difference:.3g}): this architecture is not supported yet"
        )
