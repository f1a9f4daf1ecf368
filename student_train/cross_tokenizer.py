"""Cross-tokenizer training of a causal LM student: a dump made with another tokenizer,
re-tokenized by the student's (docs/cross-tokenizer.md).

    row (prompt_text, target_text, teacher ids + top-k) ──encode_row──► the student's prompt
    (its chat template) + target tokens, and the student ↔ teacher positions that end at the
    same character (shared.token_alignment) ──cross_collate──► CrossBatch ──objective──►
    CE on every student target token, ULD / hybrid KD (cross_tokenizer_losses) where aligned

Sequence-level KD (--loss ce) needs the texts only; logit KD (--cross-tokenizer uld|hybrid)
also needs the teacher's tokenizer, which teacher-dump stores beside the manifest, to recompute
each teacher token's character end from its ids. The family (families/causal_lm.py) chooses
this objective when the student's tokenizer is not the dump's, or when asked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from kd_shards.schemas.manifest import TOKENIZER_FOLDER
from kd_shards.shared.causal_lm import chunked_head_sums, final_hidden_states
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import Dump, TrainingRow, iterate_rows
from kd_shards.shared.token_alignment import aligned_positions, character_ends, dump_tokenizer
from kd_shards.shared.tokenizer import has_chat_template, render_prompt
from kd_shards.student_train.cross_tokenizer_losses import cross_tokenizer_loss_sums
from kd_shards.student_train.losses import LossOptions

TEXT_COLUMNS = ("prompt_text", "target_text")
"""What cross-tokenizer training reads besides the training columns: the texts it re-tokenizes."""
ALIGNMENT_NAME = "alignment.json"
"""The alignment report in the training run's --out."""
REPORT_ROWS = 256
"""Rows of the training dump over which setup reports the alignment (alignment.json)."""


@dataclass(frozen=True)
class TextEncoder:
    """How a dump's rows become the student's tokens (everything encode_row needs)."""

    student_tokenizer: object
    teacher_tokenizer: object | None
    """The dump's tokenizer: needed for logit KD (character ends) and text-mode prompts."""
    use_template: bool
    """Wrap prompts in the student's chat template (the teacher used one, the student has one)."""
    teacher_stop_ids: frozenset[int]
    """The teacher's end-of-turn ids: a target ending in one gets the student's eos."""
    max_length: int
    """Longest student sequence (prompt + target); longer rows are cut as shared.collation's
    fit_row cuts them."""
    align: bool
    """Compute the student ↔ teacher alignment (logit KD), not only the student's tokens."""
    token_map: np.ndarray | None = None
    """Hybrid: (V_teacher,) the student id each teacher id is exactly, -1 where none."""


@dataclass(frozen=True)
class EncodedRow:
    """One row in the student's tokens."""

    prompt_ids: np.ndarray
    """(P,) int64."""
    target_ids: np.ndarray
    """(S,) int64."""
    student_index: np.ndarray
    """(M,) int64 student target positions that have a teacher position ..."""
    teacher_index: np.ndarray
    """(M,) int64 ... and which (into the row's teacher target positions)."""


def encode_row(encoder: TextEncoder, row: TrainingRow) -> EncodedRow:
    """The student's prompt and target tokens for `row`, and the aligned positions."""
    student = encoder.student_tokenizer
    text = row.target_text
    teacher_ids = row.target_ids
    ends_with_stop = len(teacher_ids) > 0 and int(teacher_ids[-1]) in encoder.teacher_stop_ids
    if not text and len(teacher_ids) > int(ends_with_stop):
        raise UserError(
            f"sample {row.sample_id} has target tokens but no target_text: a cross-tokenizer "
            "student re-tokenizes the dump's texts; redo the dump with its texts stored, or "
            "train a student that shares the teacher's tokenizer"
        )
    prompt = encode_prompt(encoder, row)
    target = list(student(text, add_special_tokens=False)["input_ids"]) if text else []
    student_ends = character_ends(student, target, text) if encoder.align else None
    if ends_with_stop and student.eos_token_id is not None:
        target.append(int(student.eos_token_id))
        if student_ends is not None:
            # Both replies end here: the teacher's stop token and the student's eos align.
            student_ends = np.append(student_ends, len(text) + 1)
    keep_prompt = max(1, min(len(prompt), encoder.max_length - len(target)))
    keep_target = max(0, encoder.max_length - keep_prompt)
    prompt = prompt[len(prompt) - keep_prompt :]
    target = target[:keep_target]
    student_index = teacher_index = np.zeros(0, dtype=np.int64)
    if encoder.align:
        teacher_ends = character_ends(encoder.teacher_tokenizer, teacher_ids, text)
        if ends_with_stop:
            teacher_ends[-1] = len(text) + 1
        student_index, teacher_index = aligned_positions(student_ends[:keep_target], teacher_ends)
    return EncodedRow(
        np.asarray(prompt, dtype=np.int64),
        np.asarray(target, dtype=np.int64),
        student_index,
        teacher_index,
    )


def encode_prompt(encoder: TextEncoder, row: TrainingRow) -> list[int]:
    """The student's prompt: the prompt text through its chat template (or plain, as the teacher
    had it); a text-mode row (no prompt text) starts from its first teacher tokens decoded; at
    least one token (the first target is predicted from the last prompt token)."""
    student = encoder.student_tokenizer
    if row.text:
        prompt = render_prompt(student, row.text, use_chat_template=encoder.use_template)
    else:
        if encoder.teacher_tokenizer is None:
            raise UserError(
                f"sample {row.sample_id} has no prompt text (a text-mode dump) and the dump "
                "keeps no tokenizer to decode its prompt tokens: redo it with this teacher-dump, "
                "which stores its tokenizer beside the manifest"
            )
        decoded = encoder.teacher_tokenizer.decode(
            [int(token_id) for token_id in row.prompt_ids], skip_special_tokens=True
        )
        prompt = list(student(decoded, add_special_tokens=True)["input_ids"]) if decoded else []
    if not prompt:
        start = student.bos_token_id if student.bos_token_id is not None else student.eos_token_id
        prompt = [int(start)]
    return [int(token_id) for token_id in prompt]


@dataclass(frozen=True)
class CrossBatch:
    """One micro-batch in the student's tokens. B rows, L longest sequence, N student target
    positions, K the teacher's stored entries."""

    input_ids: torch.Tensor
    """(B, L) int64, right-padded with 0 (masked)."""
    attention_mask: torch.Tensor
    """(B, L) int64."""
    row_index: torch.Tensor
    """(N,) int64 the row of each student target position."""
    position: torch.Tensor
    """(N,) int64 the sequence position whose output predicts it."""
    target_ids: torch.Tensor
    """(N,) int64 the student's target tokens."""
    aligned: torch.Tensor
    """(N,) bool: the position has a teacher distribution."""
    teacher_logprobs: torch.Tensor
    """(N, K) float32 the aligned teacher position's entries (-inf: PAD; unaligned rows: -inf)."""
    teacher_log_tail: torch.Tensor
    """(N,) float32 its stored log tail (NaN: none stored)."""
    mapped_ids: torch.Tensor
    """(N, K) int64 the student id each teacher entry is exactly (hybrid), else -1."""
    mapped_mass: torch.Tensor
    """(N,) float64 the teacher mass on entries that map exactly (0 where unaligned)."""
    teacher_positions: int
    """Teacher target positions of these rows (for the alignment report)."""
    sample_ids: tuple[str, ...]

    @property
    def target_tokens(self) -> int:
        return int(self.target_ids.numel())

    @property
    def rows(self) -> int:
        return len(self.sample_ids)


def cross_collate(rows: list[TrainingRow], encoder: TextEncoder) -> CrossBatch:
    """Encode and stack rows (see CrossBatch for shapes)."""
    encoded = [encode_row(encoder, row) for row in rows]
    longest = max((len(e.prompt_ids) + len(e.target_ids) for e in encoded), default=0)
    width = max(
        (row.topk_logprobs.shape[1] for row in rows if row.topk_logprobs is not None), default=1
    )
    input_ids = np.zeros((len(rows), longest), dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    row_index, position, target_ids = [], [], []
    logprobs, log_tail, mapped, aligned_rows = [], [], [], []
    offset = 0
    for index, (row, item) in enumerate(zip(rows, encoded, strict=True)):
        prompt, target = len(item.prompt_ids), len(item.target_ids)
        input_ids[index, :prompt] = item.prompt_ids
        input_ids[index, prompt : prompt + target] = item.target_ids
        attention_mask[index, : prompt + target] = 1
        row_index.append(np.full(target, index, dtype=np.int64))
        position.append(np.arange(prompt - 1, prompt + target - 1, dtype=np.int64))
        target_ids.append(item.target_ids)
        rows_logprobs = np.full((target, width), -np.inf, dtype=np.float32)
        rows_tail = np.full(target, np.nan, dtype=np.float32)
        rows_mapped = np.full((target, width), -1, dtype=np.int64)
        if encoder.align and len(item.student_index):
            teacher = item.teacher_index
            stored = row.topk_logprobs[teacher]
            rows_logprobs[item.student_index, : stored.shape[1]] = stored
            if row.topk_log_tail is not None:
                rows_tail[item.student_index] = row.topk_log_tail[teacher]
            if encoder.token_map is not None:
                ids = row.topk_ids[teacher].astype(np.int64)
                rows_mapped[item.student_index, : ids.shape[1]] = np.where(
                    ids >= 0, encoder.token_map[np.clip(ids, 0, None)], -1
                )
            aligned_rows.append(offset + item.student_index)
        logprobs.append(rows_logprobs)
        log_tail.append(rows_tail)
        mapped.append(rows_mapped)
        offset += target
    aligned = np.zeros(offset, dtype=bool)
    if aligned_rows:
        aligned[np.concatenate(aligned_rows)] = True
    all_logprobs = np.concatenate(logprobs) if logprobs else np.zeros((0, width), np.float32)
    all_mapped = np.concatenate(mapped) if mapped else np.zeros((0, width), np.int64)
    with np.errstate(over="ignore"):
        mass = np.where(all_mapped >= 0, np.exp(all_logprobs.astype(np.float64)), 0.0).sum(1)

    def joined(parts, dtype) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        )

    return CrossBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        row_index=joined(row_index, np.int64),
        position=joined(position, np.int64),
        target_ids=joined(target_ids, np.int64),
        aligned=torch.from_numpy(aligned),
        teacher_logprobs=torch.from_numpy(all_logprobs),
        teacher_log_tail=joined(log_tail, np.float32),
        mapped_ids=torch.from_numpy(all_mapped),
        mapped_mass=torch.from_numpy(mass),
        teacher_positions=sum(len(row.target_ids) for row in rows),
        sample_ids=tuple(row.sample_id for row in rows),
    )


class CrossTokenizerObjective:
    """Sequence-level KD (kd "sequence") or ULD / hybrid logit KD of a causal LM on a dump of
    another tokenizer."""

    unit = "target tokens"

    def __init__(
        self, output_logits, encoder: TextEncoder, options: LossOptions, kd: str, chunk_tokens: int
    ):
        self.output_logits = output_logits
        self.encoder = encoder
        self.options = options
        self.kd = kd
        """"sequence", "uld" or "hybrid"."""
        self.chunk_tokens = chunk_tokens
        self.modules: list[torch.nn.Module] = []

    def batch(self, rows: list[TrainingRow]) -> CrossBatch:
        return cross_collate(rows, self.encoder)

    def chunk_sums(self, model, batch: CrossBatch, device) -> torch.Tensor:
        """(3,) [total, ce, kd] sums of a batch."""
        hidden = final_hidden_states(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        selected = hidden[batch.row_index.to(device), batch.position.to(device)]

        def per_chunk(logits, target_ids, aligned, logprobs, log_tail, mapped):
            return cross_tokenizer_loss_sums(
                logits, target_ids, aligned, logprobs, log_tail, mapped,
                kd=self.kd, alpha=self.options.alpha, tail=self.options.tail,
            )  # fmt: skip

        tensors = (
            batch.target_ids, batch.aligned, batch.teacher_logprobs, batch.teacher_log_tail,
            batch.mapped_ids,
        )  # fmt: skip
        return chunked_head_sums(
            selected,
            self.output_logits,
            per_chunk,
            tuple(tensor.to(device) for tensor in tensors),
            chunk_tokens=self.chunk_tokens,
            width=3,
        )

    def sums(self, model, batch: CrossBatch, device) -> torch.Tensor:
        """(4,) loss sums of a batch over its student target tokens (hidden is 0)."""
        sums = self.chunk_sums(model, batch, device)
        return torch.cat([sums, sums.new_zeros(1)])

    def evaluation_sums(self, model, batches, device, bf16: bool) -> torch.Tensor:
        """(7,) float64 [total, ce, kd, student positions, aligned positions, mapped mass,
        teacher positions] over held-out rows."""
        totals = torch.zeros(7, dtype=torch.float64, device=device)
        model.eval()
        with torch.no_grad():
            for rows in batches:
                batch = self.batch(rows)
                if batch.target_tokens == 0:
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    sums = self.chunk_sums(model, batch, device).double()
                counts = torch.tensor(
                    [
                        batch.target_tokens,
                        int(batch.aligned.sum()),
                        float(batch.mapped_mass.sum()),
                        batch.teacher_positions,
                    ],
                    dtype=torch.float64,
                    device=device,
                )
                totals += torch.cat([sums, counts])
        model.train()
        return totals

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        total, ce, kd, positions, aligned, mass, teacher = sums.tolist()
        metrics = {
            "eval_loss": total / max(positions, 1.0),
            "eval_ce": ce / max(positions, 1.0),
            "eval_tokens": int(positions),
        }
        if self.kd != "sequence":
            metrics.update(alignment_metrics(positions, aligned, mass, teacher, prefix="eval_"))
            metrics["eval_kd"] = kd / max(positions, 1.0)
        return metrics

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}


def alignment_metrics(
    positions: float, aligned: float, mass: float, teacher: float, prefix: str = ""
) -> dict:
    """Shares from alignment counts: of the student's target positions, those with a teacher
    distribution; of the teacher's, those aligned; the mean teacher mass that maps exactly to
    a student id at an aligned position (hybrid)."""
    return {
        f"{prefix}aligned_share": aligned / max(positions, 1.0),
        f"{prefix}teacher_aligned_share": aligned / max(teacher, 1.0),
        f"{prefix}mapped_mass": mass / max(aligned, 1.0),
    }


def text_encoder(
    dump: Dump,
    student_tokenizer,
    *,
    kd: str,
    max_length: int,
    trust_remote_code: bool,
    token_map_of=None,
) -> TextEncoder:
    """The TextEncoder of `dump` for this student; refuses logit KD without the teacher's
    tokenizer. `token_map_of(teacher_tokenizer)`: the hybrid's exact map."""
    teacher = dump_tokenizer(dump, trust_remote_code=trust_remote_code)
    if kd != "sequence" and teacher is None:
        raise UserError(
            f"--shards {dump.directory} keeps no teacher tokenizer ({TOKENIZER_FOLDER}/ beside "
            "the manifest), which cross-tokenizer logit KD needs to align tokens: redo the dump "
            "with this teacher-dump, or train with --loss ce (sequence-level KD)"
        )
    tokenizer_record = dump.manifest.get("tokenizer", {})
    return TextEncoder(
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher,
        use_template=bool(tokenizer_record.get("chat_template_used"))
        and has_chat_template(student_tokenizer),
        teacher_stop_ids=frozenset(int(i) for i in tokenizer_record.get("stop_token_ids") or []),
        max_length=max_length,
        align=kd != "sequence",
        token_map=token_map_of(teacher) if kd == "hybrid" else None,
    )


def alignment_report(dump: Dump, encoder: TextEncoder, limit: int = REPORT_ROWS) -> dict:
    """Over the dump's first `limit` rows: how many student target positions align with a
    teacher position and how much teacher mass maps exactly (the dump × student report)."""
    taken: list[TrainingRow] = []
    columns = (
        "sample_id", "prompt_ids", "target_ids", "target_logprobs", "topk_ids", "topk_logprobs",
        *TEXT_COLUMNS,
    )  # fmt: skip
    for row in iterate_rows(dump, columns=columns):
        taken.append(row)
        if len(taken) >= limit:
            break
    if taken and all(not row.target_text for row in taken):
        raise UserError(
            f"--shards {dump.directory} stores no target texts: a cross-tokenizer student "
            "re-tokenizes the dump's texts; redo the dump with its texts stored, or train a "
            "student that shares the teacher's tokenizer"
        )
    batch = cross_collate(taken, encoder)
    aligned = int(batch.aligned.sum())
    report = {
        "rows": len(taken),
        "student_positions": batch.target_tokens,
        "teacher_positions": batch.teacher_positions,
        "aligned_positions": aligned,
    }
    if encoder.align:
        report.update(
            alignment_metrics(
                batch.target_tokens, aligned, float(batch.mapped_mass.sum()),
                batch.teacher_positions,
            )
        )  # fmt: skip
        if encoder.token_map is None:
            report.pop("mapped_mass")
    return report


def print_report(report: dict, kd: str) -> None:
    if kd == "sequence":
        print(
            f"cross-tokenizer sequence KD: {report['rows']} rows re-tokenized to "
            f"{report['student_positions']} student tokens ({report['teacher_positions']} "
            "teacher tokens)",
            file=sys.stderr,
        )
        return
    mapped = (
        f"; teacher mass mapping exactly {report['mapped_mass']:.3f}"
        if "mapped_mass" in report
        else ""
    )
    print(
        f"cross-tokenizer {kd}: over the first {report['rows']} rows, "
        f"{report['aligned_share']:.3f} of {report['student_positions']} student positions "
        f"align with a teacher position ({report['teacher_aligned_share']:.3f} of "
        f"{report['teacher_positions']} teacher positions){mapped}",
        file=sys.stderr,
    )
