"""The causal LM family: a decoder-only student (AutoModelForCausalLM) trained on token dumps.

Its tokenizer must be the teacher's (token ids only mean the same tokens under one tokenizer).
Rows are collated as prompt + target (shared.collation); the decoder runs to final hidden
states, the positions that predict each target are kept, and the LM head is applied chunk by
chunk inside the loss (shared.causal_lm), so no (B, L, V) logits tensor is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_shards.schemas.manifest import check_tokenizer_fingerprint, is_encoder_decoder_dump
from kd_shards.shared.causal_lm import (
    check_output_path,
    final_hidden_states,
    output_logits_function,
)
from kd_shards.shared.classification import is_causal_lm
from kd_shards.shared.collation import Batch, collate
from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.fidelity import fidelity_metrics, fidelity_sums_over_batches
from kd_shards.shared.models import context_length, resolve_model
from kd_shards.shared.shard_reader import TRAINING_COLUMNS, Dump, TrainingRow
from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import FamilySetup, StudentFamily
from kd_shards.student_train.losses import LossOptions, chunked_loss_sums
from kd_shards.student_train.student import NO_LORA, LoraOptions, Student, with_lora


class LanguageModelObjective:
    """Token KD (or sequence KD with ce) of a causal LM on token dumps."""

    unit = "target tokens"

    def __init__(self, output_logits, loss_options: LossOptions, chunk_tokens: int):
        self.output_logits = output_logits
        """(C, H) hidden states -> (C, V) logits: the LM head, sliced to the tokenizer."""
        self.loss_options = loss_options
        self.chunk_tokens = chunk_tokens
        self.modules: list[torch.nn.Module] = []

    def batch(self, rows: list[TrainingRow]) -> Batch:
        return collate(rows)

    def sums(self, model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        """(4,) loss sums of a batch over its target tokens (hidden is 0)."""
        hidden = final_hidden_states(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        selected = hidden[batch.row_index.to(device), batch.position.to(device)]
        sums = chunked_loss_sums(
            selected,
            self.output_logits,
            batch.target_ids.to(device),
            batch.topk_ids.to(device),
            batch.topk_logprobs.to(device),
            batch.topk_log_tail.to(device),
            options=self.loss_options,
            chunk_tokens=self.chunk_tokens,
        )
        return torch.cat([sums, sums.new_zeros(1)])

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        return fidelity_sums_over_batches(
            model,
            self.output_logits,
            batches,
            chunk_tokens=self.chunk_tokens,
            device=device,
            bf16=bf16,
        )

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        return fidelity_metrics(sums)

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}


def load_student(
    reference: str,
    *,
    manifest: dict,
    trust_remote_code: bool,
    lora: LoraOptions = NO_LORA,
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
    model = with_lora(model, lora, weights_from, task_type="CAUSAL_LM")
    model.to(device)
    return Student(
        model=model,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        context=context_length(resolved.config),
        is_lora=lora.r > 0,
        reference=reference,
    )


def setup(
    config: TrainConfig,
    context: Distributed,
    dump: Dump,
    eval_dump: Dump | None,
    checkpoint: Path | None,
) -> FamilySetup:
    """The causal LM student, its objective and the columns it reads. Token ids only mean the
    same tokens under the teacher's tokenizer: the student's fingerprint must match every dump."""
    for flag, checked in (("--shards", dump), ("--eval-shards", eval_dump)):
        if checked is not None and is_encoder_decoder_dump(checked.manifest):
            raise UserError(
                f"{flag} {checked.directory} was dumped by an encoder-decoder teacher, whose "
                "distributions are conditioned on an encoder's reading of the prompt, but "
                f"--student {config.student} is a causal LM: train an encoder-decoder student "
                "(T5, BART) on it, or dump a causal teacher"
            )
    student = load_student(
        config.student,
        manifest=dump.manifest,
        trust_remote_code=config.trust_remote_code,
        lora=config.lora_options,
        device=context.device,
        weights_from=checkpoint,
    )
    if eval_dump is not None:
        fingerprint = tokenizer_fingerprint(student.tokenizer)
        check_tokenizer_fingerprint(eval_dump.manifest, fingerprint, "student")
    check_output_path(student.model, student.vocabulary, context.device)
    objective = LanguageModelObjective(
        output_logits_function(student.model, student.vocabulary),
        config.loss_options(),
        config.chunk_tokens,
    )
    return FamilySetup(student, objective, TRAINING_COLUMNS)


CAUSAL_LM = StudentFamily(
    name="causal LM",
    accepts=is_causal_lm,
    reads_class_dumps=False,
    shardable=True,
    setup=setup,
)
