"""The encoder-decoder family: a T5/BART-style student (AutoModelForSeq2SeqLM) trained on token
dumps.

A row's prompt is the encoder's input and its target the decoder's (shared.encoder_decoder):
the same rows a causal student reads, with the same losses (every divergence, sequence-level KD
with --loss ce on a generate dump), chunked over the LM head. Its tokenizer must be the
teacher's. An encoder-decoder teacher's dump is the natural input; a decoder teacher's dump
with the same tokenizer trains it too (its targets are conditioned on the same prompts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_shards.schemas.manifest import check_tokenizer_fingerprint
from kd_shards.shared.encoder_decoder import (
    check_output_path,
    collate_encoder_decoder,
    decoder_start_id,
    fidelity_sums_over_batches,
    is_encoder_decoder,
    output_logits_function,
    target_hidden_states,
)
from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.fidelity import fidelity_metrics
from kd_shards.shared.models import context_length, resolve_model
from kd_shards.shared.shard_reader import TRAINING_COLUMNS, Dump, TrainingRow
from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import FamilySetup, StudentFamily
from kd_shards.student_train.losses import LossOptions, chunked_loss_sums
from kd_shards.student_train.student import NO_LORA, LoraOptions, Student, with_lora


class Seq2SeqObjective:
    """Token KD (or sequence KD with ce) of an encoder-decoder student on token dumps."""

    unit = "target tokens"

    def __init__(
        self,
        output_logits,
        loss_options: LossOptions,
        chunk_tokens: int,
        *,
        start_id: int,
        pad_id: int,
    ):
        self.output_logits = output_logits
        """(C, H) decoder hidden states -> (C, V) logits (shared.encoder_decoder)."""
        self.loss_options = loss_options
        self.chunk_tokens = chunk_tokens
        self.start_id, self.pad_id = start_id, pad_id
        self.modules: list[torch.nn.Module] = []

    def batch(self, rows: list[TrainingRow]):
        return collate_encoder_decoder(rows, start_id=self.start_id, pad_id=self.pad_id)

    def sums(self, model: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
        """(4,) loss sums of a batch over its target tokens (hidden is 0)."""
        targets = batch.targets
        sums = chunked_loss_sums(
            target_hidden_states(model, batch, device),
            self.output_logits,
            targets.target_ids.to(device),
            targets.topk_ids.to(device),
            targets.topk_logprobs.to(device),
            targets.topk_log_tail.to(device),
            options=self.loss_options,
            chunk_tokens=self.chunk_tokens,
        )
        return torch.cat([sums, sums.new_zeros(1)])

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        return fidelity_sums_over_batches(
            model,
            self.output_logits,
            batches,
            start_id=self.start_id,
            pad_id=self.pad_id,
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
    from transformers import AutoModelForSeq2SeqLM

    resolved = resolve_model(reference, flag="--student", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    check_tokenizer_fingerprint(manifest, tokenizer_fingerprint(tokenizer), "student")
    vocabulary = len(tokenizer)
    full_weights = weights_from if weights_from is not None and lora.r == 0 else None
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            str(full_weights or resolved.directory),
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise UserError(
            f"--student {reference}: cannot load an encoder-decoder model ({one_line(error)}): "
            "pass a T5/BART-style model directory (AutoModelForSeq2SeqLM)"
        ) from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocabulary:
        raise UserError(
            f"--student {reference}: its LM head has {rows} rows but its tokenizer {vocabulary} "
            "tokens: resize the student's embeddings to the tokenizer first"
        )
    model.config.use_cache = False
    model = with_lora(model, lora, weights_from, task_type="SEQ_2_SEQ_LM")
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
    """The encoder-decoder student, its objective and the columns it reads; the student's
    tokenizer must match every dump's."""
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
    model_config = student.model.config
    start_id = decoder_start_id(model_config)
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else start_id
    check_output_path(student.model, student.vocabulary, start_id, context.device)
    objective = Seq2SeqObjective(
        output_logits_function(student.model, student.vocabulary),
        config.loss_options(),
        config.chunk_tokens,
        start_id=start_id,
        pad_id=pad_id,
    )
    return FamilySetup(student, objective, TRAINING_COLUMNS)


SEQ2SEQ_LM = StudentFamily(
    name="seq2seq (encoder-decoder)",
    accepts=is_encoder_decoder,
    reads_class_dumps=False,
    shardable=False,
    setup=setup,
)
