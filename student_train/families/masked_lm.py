"""The masked-LM family: a `*ForMaskedLM` student (BERT, RoBERTa, DistilBERT, ModernBERT)
trained on masked-LM dumps (teacher-dump --mode mlm) with DistilBERT's triple loss.

Its tokenizer must be the teacher's (the dump's ids are the student's input). A row is the
masked window as stored; the student's logits at the row's masked positions meet the teacher's
distributions there (KD at temperature T) and the original tokens (MLM CE), and its last hidden
state at every non-padding token meets the teacher's (cosine), as DistilBERT does: the hidden
states of unmasked tokens carry the teacher's representation as well, and padding carries
none. A step's sums are divided by its masked positions (student_train.losses
.masked_lm_distillation_sums says how the cosine term joins that divisor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_shards.schemas.manifest import check_tokenizer_fingerprint
from kd_shards.schemas.shard import PAD_ID, TOKEN_HIDDEN_COLUMN
from kd_shards.shared.errors import UserError
from kd_shards.shared.fidelity import fidelity_metrics, fidelity_sums
from kd_shards.shared.masked_lm import is_masked_lm, load_masked_lm
from kd_shards.shared.models import context_length, resolve_model
from kd_shards.shared.shard_reader import MASKED_LM_COLUMNS, Dump, TrainingRow
from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
from kd_shards.student_train.config import MASKED_LM_TEMPERATURE, TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import FamilySetup, StudentFamily
from kd_shards.student_train.losses import masked_lm_distillation_sums
from kd_shards.student_train.student import Student


@dataclass(frozen=True)
class MaskedBatch:
    """B masked windows. L longest window, N masked positions, K teacher entries, M tokens."""

    input_ids: torch.Tensor
    """(B, L) int64 masked windows, right-padded with the tokenizer's padding id."""
    attention_mask: torch.Tensor
    """(B, L) int64, 1 on real tokens."""
    row_index: torch.Tensor
    """(N,) int64 the row of each masked position."""
    position: torch.Tensor
    """(N,) int64 its index in the window."""
    target_ids: torch.Tensor
    """(N,) int64 the original tokens."""
    topk_ids: torch.Tensor
    """(N, K) int64 teacher ids (PAD_ID in freed slots)."""
    topk_logprobs: torch.Tensor
    """(N, K) float32 (-inf in freed slots)."""
    topk_log_tail: torch.Tensor
    """(N,) float32 stored log tail mass."""
    teacher_hidden: torch.Tensor | None
    """(M, H) float32 the teacher's hidden state at every real token (row by row), or None."""
    token_weights: torch.Tensor | None
    """(M,) float32 each real token's cosine weight T_r / P_r, or None."""
    sample_ids: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.sample_ids)

    @property
    def target_tokens(self) -> int:
        return int(self.target_ids.numel())


def collate_masked(rows: list[TrainingRow], pad_id: int, with_hidden: bool) -> MaskedBatch:
    """Stack masked-LM rows into a MaskedBatch (pure: no model, no device)."""
    longest = max(len(row.prompt_ids) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for index, row in enumerate(rows):
        input_ids[index, : len(row.prompt_ids)] = row.prompt_ids
        attention_mask[index, : len(row.prompt_ids)] = 1
    width = max(row.topk_ids.shape[1] for row in rows)

    def widened(array: np.ndarray, fill) -> np.ndarray:
        missing = width - array.shape[1]
        return np.pad(array, ((0, 0), (0, missing)), constant_values=fill) if missing else array

    teacher_hidden = token_weights = None
    if with_hidden:
        teacher_hidden = torch.from_numpy(
            np.concatenate([row.hidden for row in rows]).astype(np.float32)
        )
        token_weights = torch.from_numpy(
            np.concatenate(
                [
                    np.full(len(row.prompt_ids), len(row.target_ids) / len(row.prompt_ids))
                    for row in rows
                ]
            ).astype(np.float32)
        )
    return MaskedBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        row_index=torch.from_numpy(
            np.concatenate(
                [np.full(len(row.target_ids), index) for index, row in enumerate(rows)]
            ).astype(np.int64)
        ),
        position=torch.from_numpy(
            np.concatenate([row.mask_positions for row in rows]).astype(np.int64)
        ),
        target_ids=torch.from_numpy(
            np.concatenate([row.target_ids for row in rows]).astype(np.int64)
        ),
        topk_ids=torch.from_numpy(
            np.concatenate([widened(row.topk_ids, PAD_ID) for row in rows]).astype(np.int64)
        ),
        topk_logprobs=torch.from_numpy(
            np.concatenate([widened(row.topk_logprobs, -np.inf) for row in rows]).astype(np.float32)
        ),
        topk_log_tail=torch.from_numpy(
            np.concatenate([row.topk_log_tail for row in rows]).astype(np.float32)
        ),
        teacher_hidden=teacher_hidden,
        token_weights=token_weights,
        sample_ids=tuple(row.sample_id for row in rows),
    )


class MaskedLanguageModelObjective:
    """DistilBERT's triple loss of a masked-LM student on a masked-LM dump."""

    unit = "masked positions"

    def __init__(
        self,
        *,
        vocabulary: int,
        pad_id: int,
        weights: tuple[float, float, float],
        temperature: float,
        tail: str,
        labels_only: bool,
    ):
        self.vocabulary, self.pad_id = vocabulary, pad_id
        self.weights, self.temperature, self.tail = weights, temperature, tail
        self.labels_only = labels_only
        """--loss ce: the MLM loss alone (the same cut, not distilled)."""
        self.with_hidden = weights[2] > 0 and not labels_only
        self.modules: list[torch.nn.Module] = []

    def batch(self, rows: list[TrainingRow], with_hidden: bool | None = None) -> MaskedBatch:
        return collate_masked(
            rows, self.pad_id, self.with_hidden if with_hidden is None else with_hidden
        )

    def forward(self, model, batch: MaskedBatch, device: torch.device, with_hidden: bool):
        output = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=with_hidden,
        )
        row_index, position = batch.row_index.to(device), batch.position.to(device)
        logits = output.logits[row_index, position, : self.vocabulary]
        hidden = None
        if with_hidden:
            real = batch.attention_mask.to(device).bool()
            hidden = output.hidden_states[-1][real]
        return logits, hidden

    def sums(
        self, model: torch.nn.Module, batch: MaskedBatch, device: torch.device
    ) -> torch.Tensor:
        """(4,) sums [total, ce, kd, cos] over the batch's masked positions."""
        logits, hidden = self.forward(model, batch, device, self.with_hidden)
        if self.labels_only:
            ce = torch.nn.functional.cross_entropy(
                logits.float(), batch.target_ids.to(device), reduction="sum"
            )
            return torch.stack([ce, ce, ce.new_zeros(()), ce.new_zeros(())])
        return masked_lm_distillation_sums(
            logits,
            batch.target_ids.to(device),
            batch.topk_ids.to(device),
            batch.topk_logprobs.to(device),
            batch.topk_log_tail.to(device),
            hidden,
            None if batch.teacher_hidden is None else batch.teacher_hidden.to(device),
            None if batch.token_weights is None else batch.token_weights.to(device),
            weights=self.weights,
            temperature=self.temperature,
            tail=self.tail,
        )

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        """(4,) float64 [CE, KL(teacher ‖ student) at T = 1 with the tail bucketed, top-1
        agreement, masked positions] over held-out rows (shared.fidelity's figures)."""
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for rows in batches:
                batch = self.batch(rows, with_hidden=False)
                logits, _ = self.forward(model, batch, device, False)
                sums += fidelity_sums(
                    logits.float(),
                    batch.target_ids.to(device),
                    batch.topk_ids.to(device),
                    batch.topk_logprobs.to(device),
                    batch.topk_log_tail.to(device),
                )
        model.train(was_training)
        return sums

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        return fidelity_metrics(sums)

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}


def load_student(
    reference: str,
    *,
    manifest: dict,
    trust_remote_code: bool,
    device: torch.device | str = "cpu",
    weights_from: Path | None = None,
) -> Student:
    """The masked-LM student in float32 (from `weights_from`, a checkpoint, to resume),
    refusing one whose tokenizer differs from the teacher's."""
    resolved = resolve_model(reference, flag="--student", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(resolved.directory, trust_remote_code=trust_remote_code)
    check_tokenizer_fingerprint(manifest, tokenizer_fingerprint(tokenizer), "student")
    model = load_masked_lm(
        weights_from or resolved.directory,
        trust_remote_code=trust_remote_code,
        who="--student",
    )
    model.train()
    model.to(device)
    return Student(
        model=model,
        tokenizer=tokenizer,
        vocabulary=len(tokenizer),
        context=context_length(resolved.config),
        is_lora=False,
        reference=reference,
    )


def setup(
    config: TrainConfig,
    context: Distributed,
    dump: Dump,
    eval_dump: Dump | None,
    checkpoint: Path | None,
) -> FamilySetup:
    """The masked-LM student, its objective and the columns it reads."""
    if config.lora_r > 0:
        raise UserError("--lora-r: a masked-LM student trains all its weights here: drop --lora-r")
    if config.alpha is not None:
        raise UserError(
            "--alpha mixes CE and KD of causal and classification students; a masked-LM "
            "student weighs its three terms with --masked-lm-weights KD,MLM,COS: use that"
        )
    if config.loss not in ("fkl", "ce"):
        raise UserError(
            f"--loss {config.loss}: a masked-LM student trains with DistilBERT's loss (--loss "
            "fkl, the default) or the MLM loss alone (--loss ce)"
        )
    if config.batch_tokens is not None:
        raise UserError("--batch-tokens packs causal rows; a masked-LM student: use --micro-batch")
    student = load_student(
        config.student,
        manifest=dump.manifest,
        trust_remote_code=config.trust_remote_code,
        device=context.device,
        weights_from=checkpoint,
    )
    if eval_dump is not None:
        check_tokenizer_fingerprint(
            eval_dump.manifest, tokenizer_fingerprint(student.tokenizer), "student"
        )
    weights = tuple(float(weight) for weight in config.masked_lm_weights)
    labels_only = config.loss == "ce"
    with_hidden = weights[2] > 0 and not labels_only
    if with_hidden:
        check_hidden_states(dump, student)
    pad_id = student.tokenizer.pad_token_id
    objective = MaskedLanguageModelObjective(
        vocabulary=student.vocabulary,
        pad_id=0 if pad_id is None else pad_id,
        weights=weights,
        temperature=config.temperature if config.temperature is not None else MASKED_LM_TEMPERATURE,
        tail=config.tail,
        labels_only=labels_only,
    )
    columns = (*MASKED_LM_COLUMNS, TOKEN_HIDDEN_COLUMN) if with_hidden else MASKED_LM_COLUMNS
    return FamilySetup(student, objective, columns)


def check_hidden_states(dump: Dump, student: Student) -> None:
    """The cosine term needs the teacher's last hidden states, of the student's width."""
    hidden = (dump.manifest.get("mlm") or {}).get("hidden")
    if not hidden or not hidden.get("width"):
        raise UserError(
            f"--shards {dump.directory} holds no teacher hidden states, which the cosine term "
            "needs: dump with teacher-dump --hidden-layer -1, or pass --masked-lm-weights 5,2,0"
        )
    if hidden.get("layer") != -1:
        raise UserError(
            f"--shards {dump.directory} holds the teacher's layer {hidden.get('layer')}, but the "
            "cosine term compares last hidden states: dump with --hidden-layer -1"
        )
    width = student.model.config.hidden_size
    if int(hidden["width"]) != width:
        raise UserError(
            f"the teacher's hidden states are {hidden['width']} wide, the student's {width}: "
            "the cosine term needs equal widths (a student cut from the teacher with "
            "init-student), or pass --masked-lm-weights 5,2,0"
        )


MASKED_LM = StudentFamily(
    name="masked LM",
    accepts=is_masked_lm,
    reads_class_dumps=False,
    shardable=False,
    setup=setup,
    reads_masked_lm_dumps=True,
)
