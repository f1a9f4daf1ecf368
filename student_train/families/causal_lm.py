"""The causal LM family: a decoder-only student (AutoModelForCausalLM) trained on token dumps.

Token KD needs the teacher's tokenizer (token ids only mean the same tokens under one tokenizer).
A student with another tokenizer trains on the dump's texts instead (--loss ce, or
--cross-tokenizer uld|hybrid: student_train.cross_tokenizer). Rows are collated as prompt + target (shared.collation); the decoder runs to final hidden
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
from kd_shards.shared.files import atomic_write_json
from kd_shards.shared.models import context_length, resolve_model
from kd_shards.shared.shard_reader import TRAINING_COLUMNS, Dump, TrainingRow, open_dump
from kd_shards.shared.token_alignment import exact_token_map
from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.cross_tokenizer import (
    ALIGNMENT_NAME,
    TEXT_COLUMNS,
    CrossTokenizerObjective,
    alignment_report,
    print_report,
    text_encoder,
)
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import FamilySetup, StudentFamily
from kd_shards.student_train.losses import LossOptions, chunked_loss_sums
from kd_shards.student_train.multi_teacher import CombinedTeachersObjective, teacher_lookups
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
    manifest: dict | None,
    trust_remote_code: bool,
    lora: LoraOptions = NO_LORA,
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """Load the student in float32, refusing one whose tokenizer differs from the teacher's
    (the `manifest`'s; None: no check, for cross-tokenizer training).

    `weights_from`: a checkpoint directory whose weights (full model, or LoRA adapter) replace
    the student's, to resume training."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(reference, flag="--student", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    if manifest is not None:
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
    same tokens under the teacher's tokenizer: the student's fingerprint must match every dump,
    unless it trains across tokenizers (cross_tokenizer_kind)."""
    for flag, checked in (("--shards", dump), ("--eval-shards", eval_dump)):
        if checked is not None and is_encoder_decoder_dump(checked.manifest):
            raise UserError(
                f"{flag} {checked.directory} was dumped by an encoder-decoder teacher, whose "
                "distributions are conditioned on an encoder's reading of the prompt, but "
                f"--student {config.student} is a causal LM: train an encoder-decoder student "
                "(T5, BART) on it, or dump a causal teacher"
            )
    kind = cross_tokenizer_kind(config, dump)
    student = load_student(
        config.student,
        manifest=dump.manifest if kind is None else None,
        trust_remote_code=config.trust_remote_code,
        lora=config.lora_options,
        device=context.device,
        weights_from=checkpoint,
    )
    if eval_dump is not None:
        if kind is None:
            fingerprint = tokenizer_fingerprint(student.tokenizer)
        else:  # the eval rows are aligned with the training dump's tokenizer
            fingerprint = dump.manifest["tokenizer"]["fingerprint"]
        check_tokenizer_fingerprint(eval_dump.manifest, fingerprint, "student")
    check_output_path(student.model, student.vocabulary, context.device)
    output_logits = output_logits_function(student.model, student.vocabulary)
    if kind is not None:
        if config.more_shards:
            raise UserError(
                "--more-shards averages teachers of the student's own tokenizer: train across "
                "tokenizers on one dump (--shards) at a time"
            )
        return cross_tokenizer_setup(config, context, dump, student, output_logits, kind)
    objective = LanguageModelObjective(output_logits, config.loss_options(), config.chunk_tokens)
    if config.more_shards:
        if config.teacher_top_k is not None:
            raise UserError(
                "--set teacher_top_k cuts the --shards teacher only, not --more-shards: drop it "
                "when averaging teachers"
            )
        others = [
            open_dump(path, allow_incomplete=config.allow_incomplete, flag="--more-shards")
            for path in config.more_shards
        ]
        lookups, weights = teacher_lookups(dump, others, config.teacher_weights)
        objective = CombinedTeachersObjective(objective, lookups, weights)
    return FamilySetup(student, objective, TRAINING_COLUMNS)


def cross_tokenizer_kind(config: TrainConfig, dump: Dump) -> str | None:
    """None: token KD on the dump's ids (the student shares its tokenizer); "sequence", "uld"
    or "hybrid": training on the dump's texts (student_train.cross_tokenizer). A student of
    another tokenizer with a logit loss but no --cross-tokenizer is refused."""
    if config.cross_tokenizer != "none":
        return config.cross_tokenizer
    resolved = resolve_model(
        config.student, flag="--student", trust_remote_code=config.trust_remote_code
    )
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=config.trust_remote_code)
    expected = dump.manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint(tokenizer) == expected:
        return None
    if config.loss == "ce":
        return "sequence"
    raise UserError(
        f"tokenizer mismatch: the shards were written with tokenizer {expected[:16]} but "
        f"student has tokenizer {tokenizer_fingerprint(tokenizer)[:16]}: pass --cross-tokenizer "
        f"uld or hybrid for logit KD across tokenizers, --loss ce for sequence-level KD on the "
        "teacher's texts, or a student that shares the teacher's tokenizer"
    )


def cross_tokenizer_setup(config, context, dump, student, output_logits, kind: str) -> FamilySetup:
    """The cross-tokenizer objective; its alignment report (first rows of the dump) on stderr
    and in OUT/alignment.json."""
    encoder = text_encoder(
        dump,
        student.tokenizer,
        kd=kind,
        max_length=config.max_length or student.context or (1 << 30),
        trust_remote_code=config.trust_remote_code,
        token_map_of=lambda teacher: exact_token_map(
            teacher, student.tokenizer, dump.manifest["tokenizer"].get("stop_token_ids") or ()
        ),
    )
    report = alignment_report(dump, encoder)
    if context.is_main:
        print_report(report, kind)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(config.out) / ALIGNMENT_NAME, {"kind": kind, **report})
    objective = CrossTokenizerObjective(
        output_logits, encoder, config.loss_options(), kind, config.chunk_tokens
    )
    return FamilySetup(student, objective, (*TRAINING_COLUMNS, *TEXT_COLUMNS))


CAUSAL_LM = StudentFamily(
    name="causal LM",
    accepts=is_causal_lm,
    reads_class_dumps=False,
    shardable=True,
    setup=setup,
)
