"""The sequence classifier family: an encoder with a classification head (or a bare encoder,
which gets one) trained on classify dumps or gold labels (--data).

Class distributions do not depend on a tokenizer: the student tokenizes the row texts itself
and no fingerprint is compared. A step computes α·CE(gold) + (1−α)·T²·KD over the labels,
optionally + w·MSE of the projected pooled hidden state against the teacher's, divided by the
step's examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from kd_shards.schemas.manifest import classify_labels
from kd_shards.schemas.shard import HIDDEN_COLUMN, PAIR_COLUMN
from kd_shards.shared.classification import (
    align_labels,
    encode_texts,
    is_causal_lm,
    is_encoder_body,
    is_sequence_classifier,
    label_order,
    load_classifier,
    model_labels,
    pool,
)
from kd_shards.shared.distributions import divergence_per_position
from kd_shards.shared.errors import UserError
from kd_shards.shared.masked_lm import is_masked_lm
from kd_shards.shared.models import AUXILIARY_WEIGHTS, context_length, resolve_model
from kd_shards.shared.shard_reader import CLASSIFY_COLUMNS, Dump, TrainingRow
from kd_shards.shared.tokenizer import load_tokenizer
from kd_shards.student_train.classify_data import combined_teacher_targets
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import FamilySetup, StudentFamily
from kd_shards.student_train.losses import (
    LossOptions,
    classification_loss_sums,
    hidden_state_mse_sum,
)
from kd_shards.student_train.student import NO_LORA, LoraOptions, Student, with_lora

PROJECTION_NAME = AUXILIARY_WEIGHTS[0]
"""The learned projection of the hidden-state loss, saved beside the student's weights."""
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class ClassificationBatch:
    """B examples as a classifier reads them, with their targets."""

    input_ids: torch.Tensor
    """(B, S) int64, the student tokenizer's ids, right-padded."""
    attention_mask: torch.Tensor
    """(B, S) int64."""
    gold: torch.Tensor
    """(B,) int64 gold label index, NO_LABEL (-1) where there is none."""
    teacher_logprobs: torch.Tensor | None
    """(B, L) float32 teacher log-probabilities in label order; None for labels only."""
    teacher_hidden: torch.Tensor | None
    """(B, H_teacher) float32 pooled teacher hidden states, when the hidden loss is on."""
    sample_ids: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.sample_ids)

    @property
    def target_tokens(self) -> int:
        """The step's divisor: one unit per example."""
        return len(self.sample_ids)


@dataclass(frozen=True)
class HiddenLoss:
    """The hidden-state loss: w · MSE(projection(pooled student state), teacher state)."""

    weight: float
    projection: torch.nn.Linear
    """Student width -> teacher width (trained with the student)."""
    student_layer: int
    pooling: str


class ClassificationObjective:
    """A sequence classifier trained on gold labels and/or teacher class distributions."""

    unit = "examples"

    def __init__(
        self,
        *,
        tokenizer,
        max_length: int,
        loss_options: LossOptions,
        teacher_targets: dict[str, np.ndarray] | None,
        hidden_loss: HiddenLoss | None,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.loss_options = loss_options
        self.teacher_targets = teacher_targets
        """sample id -> (L,) log-probabilities of the combined teachers (multi-teacher), or None
        to read each row's own teacher distribution."""
        self.hidden_loss = hidden_loss
        self.modules = [hidden_loss.projection] if hidden_loss is not None else []

    def batch(self, rows: list[TrainingRow], with_hidden: bool = True) -> ClassificationBatch:
        """`with_hidden=False`: leave out the teacher's hidden states (evaluation)."""
        encoded = encode_texts(
            self.tokenizer,
            [row.text for row in rows],
            self.max_length,
            pairs=[row.text_pair for row in rows],
        )
        gold = torch.tensor([int(row.target_ids[0]) for row in rows], dtype=torch.int64)
        teacher = None
        if self.teacher_targets is not None:
            teacher = np.stack([self.teacher_targets[row.sample_id] for row in rows])
        elif rows and rows[0].topk_ids is not None:
            teacher = label_order(
                np.concatenate([row.topk_ids for row in rows]),
                np.concatenate([row.topk_logprobs for row in rows]),
            )
        hidden = None
        if self.hidden_loss is not None and with_hidden:
            hidden = torch.from_numpy(np.stack([row.hidden for row in rows]).astype(np.float32))
        return ClassificationBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            gold=gold,
            teacher_logprobs=None if teacher is None else torch.from_numpy(teacher).float(),
            teacher_hidden=hidden,
            sample_ids=tuple(row.sample_id for row in rows),
        )

    def forward(self, model, batch: ClassificationBatch, device: torch.device):
        return model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=self.hidden_loss is not None,
        )

    def sums(
        self, model: torch.nn.Module, batch: ClassificationBatch, device: torch.device
    ) -> torch.Tensor:
        """(4,) loss sums over the batch's examples: [α·CE + (1−α)·KD + w·MSE, CE, KD, MSE]."""
        output = self.forward(model, batch, device)
        teacher = batch.teacher_logprobs
        sums = classification_loss_sums(
            output.logits,
            batch.gold.to(device),
            None if teacher is None else teacher.to(device),
            options=self.loss_options,
        )
        hidden = sums.new_zeros(())
        if self.hidden_loss is not None:
            loss = self.hidden_loss
            pooled = pool(
                output.hidden_states[loss.student_layer].float(),
                batch.attention_mask.to(device),
                loss.pooling,
            )
            hidden = hidden_state_mse_sum(loss.projection(pooled), batch.teacher_hidden.to(device))
            sums = torch.stack([sums[0] + loss.weight * hidden, sums[1], sums[2]])
        return torch.cat([sums, hidden.reshape(1)])

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        """(6,) float64 sums over held-out examples: [CE on gold, KL(teacher ‖ student) at T=1,
        argmax agreement with the teacher, correct, examples with gold, examples]."""
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for rows in batches:
                batch = self.batch(rows, with_hidden=False)
                logits = self.forward(model, batch, device).logits.float()
                sums += evaluation_counts(logits, batch.gold.to(device), batch.teacher_logprobs)
        model.train(was_training)
        return sums

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        ce, kl, agreement, correct, labelled, examples = sums.tolist()
        return {
            "eval_ce": ce / max(labelled, 1.0),
            "eval_kl": kl / max(examples, 1.0),
            "eval_top1": agreement / max(examples, 1.0),
            "eval_accuracy": correct / max(labelled, 1.0),
            "eval_tokens": int(examples),
        }

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """The hidden-state projection, when the hidden loss is on."""
        if self.hidden_loss is None:
            return {}
        state = self.hidden_loss.projection.state_dict()
        return {PROJECTION_NAME: {key: value.detach().cpu() for key, value in state.items()}}


def evaluation_counts(
    logits: torch.Tensor, gold: torch.Tensor, teacher_logprobs: torch.Tensor | None
) -> torch.Tensor:
    """(6,) float64 of one held-out batch (see ClassificationObjective.evaluation_sums).

    Args:
        logits: (B, L) float32. gold: (B,) int64, NO_LABEL (-1) where there is none.
        teacher_logprobs: (B, L) teacher log-probabilities (on any device), or None."""
    device = logits.device
    log_q = torch.log_softmax(logits, dim=-1)
    labelled = gold >= 0
    ce = -log_q[labelled].gather(1, gold[labelled].unsqueeze(1)).sum()
    predicted = log_q.argmax(-1)
    correct = (predicted[labelled] == gold[labelled]).sum()
    kl = agreement = torch.zeros((), device=device)
    if teacher_logprobs is not None:
        log_p = torch.log_softmax(teacher_logprobs.to(device), dim=-1)
        valid = torch.ones_like(log_p, dtype=torch.bool)
        kl = divergence_per_position(log_p, log_q, valid, divergence="fkl", beta=0.0).sum()
        agreement = (predicted == log_p.argmax(-1)).sum()
    return torch.stack(
        [
            ce.double(),
            kl.double(),
            agreement.double(),
            correct.double(),
            labelled.sum().double(),
            torch.tensor(float(len(gold)), dtype=torch.float64, device=device),
        ]
    )


def is_classifier_student(config: dict) -> bool:
    """A sequence classifier, or a bare encoder or masked LM (it gets a new head, on the
    encoder under its masked-LM head); never a causal LM."""
    if is_causal_lm(config):
        return False
    return is_sequence_classifier(config) or is_encoder_body(config) or is_masked_lm(config)


def load_student(
    reference: str,
    *,
    labels: list[str],
    trust_remote_code: bool,
    lora: LoraOptions = NO_LORA,
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """A sequence classifier with one output per label (in the dump's label order), float32. A
    bare encoder gets a new head; a classifier must already have these labels in this order.
    Its own tokenizer reads the texts (class distributions do not depend on a tokenizer)."""
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
    model = with_lora(model, lora, weights_from, task_type="SEQ_CLS")
    model.to(device)
    return Student(
        model=model,
        tokenizer=tokenizer,
        vocabulary=len(labels),
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
    """The classifier student, its objective and the columns it reads. Class distributions are
    tokenizer-free: the student tokenizes the texts itself, and no fingerprint is compared."""
    labels = classify_labels(dump.manifest)
    if eval_dump is not None and classify_labels(eval_dump.manifest) != labels:
        raise UserError(
            f"--eval-shards has labels {', '.join(classify_labels(eval_dump.manifest))} but the "
            f"training data has {', '.join(labels)}: evaluate on a dump with the same labels"
        )
    if config.batch_tokens is not None:
        raise UserError(
            "--batch-tokens packs token rows; a classifier batches examples: use --micro-batch"
        )
    student = load_student(
        config.student,
        labels=labels,
        trust_remote_code=config.trust_remote_code,
        lora=config.lora_options,
        device=context.device,
        weights_from=checkpoint,
    )
    options = config.loss_options(classification=True)
    if options.loss != "ce" and config.data is None and dump.manifest["top_k"] != len(labels):
        raise UserError(f"--shards {dump.directory}: k differs from the number of labels")
    teacher_targets = None
    if config.more_shards:
        teacher_targets = combined_teacher_targets(
            dump, config.more_shards, config.teacher_weights, config.allow_incomplete
        )
    hidden_loss = hidden_loss_of(config, context, dump, student, checkpoint)
    objective = ClassificationObjective(
        tokenizer=student.tokenizer,
        max_length=config.max_length or student.context or DEFAULT_MAX_LENGTH,
        loss_options=options,
        teacher_targets=teacher_targets,
        hidden_loss=hidden_loss,
    )
    columns = CLASSIFY_COLUMNS if hidden_loss is None else (*CLASSIFY_COLUMNS, HIDDEN_COLUMN)
    if (dump.manifest.get("classify") or {}).get("text_pairs"):
        columns = (*columns, PAIR_COLUMN)  # sentence pairs: the second text of each example
    return FamilySetup(student, objective, columns)


def hidden_loss_of(
    config: TrainConfig,
    context: Distributed,
    dump: Dump,
    student: Student,
    checkpoint: Path | None,
) -> HiddenLoss | None:
    """--hidden-weight > 0: the hidden-state loss with its projection (seeded, or restored from
    the checkpoint); else None."""
    if config.hidden_weight <= 0:
        return None
    hidden = (dump.manifest.get("classify") or {}).get("hidden")
    if not hidden or not hidden.get("width"):
        raise UserError(
            f"--hidden-weight needs the teacher's hidden states in the shards, and "
            f"{dump.directory} has none: dump with teacher-dump --hidden-layer N"
        )
    student_width = student.model.config.hidden_size
    torch.manual_seed(config.seed)
    projection = torch.nn.Linear(student_width, int(hidden["width"])).to(context.device)
    if checkpoint is not None:
        projection.load_state_dict(load_file(checkpoint / PROJECTION_NAME))
    return HiddenLoss(
        config.hidden_weight, projection, config.student_hidden_layer, hidden["pooling"]
    )


SEQUENCE_CLASSIFIER = StudentFamily(
    name="sequence classifier",
    accepts=is_classifier_student,
    reads_class_dumps=True,
    shardable=False,
    setup=setup,
)
