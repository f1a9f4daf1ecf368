"""teacher-dump --mode mlm: a masked LM's distributions at the masked positions of raw text
(task-agnostic masked-LM distillation, as in DistilBERT).

Raw text is cut into --chunk-tokens windows ([CLS] ... [SEP] included); each window is masked
--masks-per-text times at dump time (teacher_dump.masking: BERT's 80/10/10, seeded per window
and copy), and each masked copy is one row: its masked input, the chosen positions, the
original tokens there and the teacher's distribution there (schemas.shard
MASKED_LM_CONVENTIONS), optionally the teacher's hidden state at every token. The teacher runs
in transformers (shared.masked_lm says why).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from kd_shards.schemas.shard import MASKED_LM_CONVENTIONS
from kd_shards.shared.errors import UserError
from kd_shards.shared.masked_lm import MaskedLanguageModelEngine, is_masked_lm
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task, examples_from_records
from kd_shards.shared.tokenizer import chunk_text
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.masking import choose_masks, masking_generator
from kd_shards.teacher_dump.modes import tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import DumpRequest, check_lengths
from kd_shards.teacher_dump.rows import ScoredTarget, ShardRow, make_row

NAME = "mlm"
OWN_FIELDS = frozenset({"chunk_tokens", "masks_per_text", "mask_rate"})
storage = tokens.storage
BATCH_SIZE = 16
"""Windows per transformers forward."""
DRAWS_STREAM = 1
"""--store sampled: the draws of a copy come from its own generator, beside its masks'."""


@dataclass(frozen=True)
class MaskingPlan:
    """What the masking of every window needs from the teacher's tokenizer."""

    mask_id: int
    replacement_ids: np.ndarray
    """(R,) the non-special ids a random replacement is drawn from."""
    special_ids: np.ndarray
    """(S,) the tokenizer's special ids (never chosen)."""
    pad_id: int


def check_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    tokens.check_vocabulary(config, inputs)
    if not is_masked_lm(inputs.model.config):
        names = ", ".join(inputs.model.config.get("architectures") or ["unknown"])
        raise UserError(
            f"--model {config.model} is a {names}, not a masked LM: --mode mlm needs a "
            "*ForMaskedLM teacher (BERT, RoBERTa, DistilBERT, ModernBERT); use --mode text for "
            "a causal LM"
        )
    if inputs.tokenizer.mask_token_id is None:
        raise UserError(
            f"--model {config.model}: its tokenizer has no mask token, which --mode mlm puts "
            "at the chosen positions: use the masked LM's own tokenizer"
        )
    if task.name not in ("text", "columns"):
        raise UserError(
            f"--mode mlm needs raw text: use --data text (or a file with --prompt-column), not {config.data}"
        )


def requests(
    config: DumpConfig, task: Task, records: LoadedRecords, inputs: TeacherInputs
) -> ModeRequests:
    """Windows of --chunk-tokens tokens, special tokens included (the text mode's chunks of the
    same text, each wrapped in the tokenizer's [CLS] ... [SEP])."""
    tokenizer = inputs.tokenizer
    examples = examples_from_records(task, records, None)
    prefix, suffix = special_wrapping(tokenizer)
    added = len(prefix) + len(suffix)
    if config.chunk_tokens - added < 2:
        raise UserError(f"--chunk-tokens must be at least {added + 2} for this tokenizer")
    bodies = chunk_text(
        [example.prompt or example.references[0] for example in examples],
        tokenizer,
        chunk_tokens=config.chunk_tokens - added,
        limit=config.limit,
    )
    windows = [
        DumpRequest(
            source_index=index,
            prompt_ids=np.concatenate([prefix, body, suffix]).astype(np.int32),
            target_ids=None,
            prompt_text="",
            references=(),
        )
        for index, body in enumerate(bodies)
    ]
    kept, skipped = check_lengths(
        windows, context=inputs.context, new_tokens=0, skip_too_long=config.skip_too_long
    )
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    everything = np.arange(len(tokenizer), dtype=np.int64)
    plan = MaskingPlan(
        mask_id=int(tokenizer.mask_token_id),
        replacement_ids=everything[~np.isin(everything, special)],
        special_ids=special,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    return ModeRequests(kept, skipped, plan)


def special_wrapping(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids before, ids after) the text that the tokenizer adds to a single sequence ([CLS] and
    [SEP] for BERT, <s> and </s> for RoBERTa), read off one tokenized word."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(bare) + 1):
        if wrapped[start : start + len(bare)] == bare:
            end = start + len(bare)
            return (
                np.asarray(wrapped[:start], dtype=np.int32),
                np.asarray(wrapped[end:], dtype=np.int32),
            )
    raise UserError("the teacher's tokenizer changes a word when it adds special tokens")


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    """A token dump's entries plus the "mlm" section (the backend is filled in once it runs)."""
    return {
        **tokens.manifest_entries(config, inputs, sampling=None),
        "mlm": {
            "masks_per_text": config.masks_per_text,
            "mask_rate": config.mask_rate,
            "masking": "max(1, round(mask_rate x non-special tokens)) positions per window, "
            "uniformly without replacement; each becomes the mask token with p 0.8, a uniformly "
            "drawn non-special token with p 0.1, else stays",
            "seed": "numpy default_rng([seed, source_index, copy])",
            "mask_token_id": planned.plan.mask_id,
            "conventions": MASKED_LM_CONVENTIONS,
            "architecture": None,
            "backend": None,
            "backend_reason": None,
            "hidden": (
                {"layer": config.hidden_layer, "per": "token", "width": None}
                if config.hidden_layer is not None
                else None
            ),
        },
    }


def rows_per_prompt(config: DumpConfig) -> int:
    return config.masks_per_text


def start(config: DumpConfig, inputs: TeacherInputs, plan: MaskingPlan, engine=None):
    """The masked LM in transformers (or `engine`, a MaskedLanguageModelEngine already built)."""
    owns = engine is None
    if owns:
        engine = MaskedLanguageModelEngine(
            inputs.model.directory,
            dtype=config.dtype,
            hidden_layer=config.hidden_layer,
            batch_size=BATCH_SIZE,
            pad_id=plan.pad_id,
            trust_remote_code=config.trust_remote_code,
        )
    elif not isinstance(engine, MaskedLanguageModelEngine):
        raise UserError("--mode mlm needs a MaskedLanguageModelEngine, not a vLLM engine")
    return MaskedTeacher(config, inputs.tokenizer, plan, engine, owns)


def record_engine(manifest: dict, description: dict) -> None:
    manifest["engine"] = description["engine"]
    manifest["teacher"]["dtype"] = description["dtype"]
    manifest["mlm"].update(description["mlm"])


def masked_copy(
    config: DumpConfig, plan: MaskingPlan, request: DumpRequest, copy: int
) -> tuple[np.ndarray, np.ndarray]:
    """(masked window, chosen positions) of copy `copy` of a window."""
    window = request.prompt_ids
    return choose_masks(
        window,
        np.isin(window, plan.special_ids),
        rate=config.mask_rate,
        mask_id=plan.mask_id,
        replacement_ids=plan.replacement_ids,
        generator=masking_generator(config.seed, request.source_index, copy),
    )


def engine_entries(
    config: DumpConfig, log_probabilities: np.ndarray, originals: np.ndarray, draws_seed: list
) -> tuple[np.ndarray, np.ndarray]:
    """(T, K+1) ids and logprobs in the layout of teacher_dump.rows.ScoredTarget: column 0 the
    original token, then the top-K in rank order (topk, adaptive) or K draws from the full
    distribution (sampled)."""
    rows = np.arange(len(originals))
    first = (originals[:, None], log_probabilities[rows, originals][:, None])
    if config.store == "sampled":
        generator = np.random.default_rng(draws_seed)
        cumulative = np.cumsum(np.exp(log_probabilities.astype(np.float64)), axis=1)
        uniform = generator.random((len(originals), config.draws)) * cumulative[:, -1:]
        drawn = np.stack([np.searchsorted(cumulative[row], uniform[row]) for row in rows])
        drawn = np.minimum(drawn, log_probabilities.shape[1] - 1)
        values = np.take_along_axis(log_probabilities, drawn, axis=1)
    else:
        count = min(config.engine_logprobs, log_probabilities.shape[1])
        top = np.argpartition(-log_probabilities, count - 1, axis=1)[:, :count]
        order = np.argsort(
            -np.take_along_axis(log_probabilities, top, axis=1), axis=1, kind="stable"
        )
        drawn = np.take_along_axis(top, order, axis=1)
        values = np.take_along_axis(log_probabilities, drawn, axis=1)
    ids = np.concatenate([first[0], drawn], axis=1).astype(np.int32)
    return ids, np.concatenate([first[1], values], axis=1).astype(np.float32)


class MaskedTeacher:
    """Mlm mode's Teacher (teacher_dump.modes.interface): --masks-per-text rows per window."""

    def __init__(self, config, tokenizer, plan: MaskingPlan, engine, owns_engine: bool):
        self.config, self.tokenizer, self.plan = config, tokenizer, plan
        self.engine, self.owns_engine = engine, owns_engine
        self.hidden_width = None

    def description(self) -> dict:
        engine = self.engine
        return {
            "engine": {
                "name": engine.backend,
                "version": engine.version,
                "platform": "cpu",
                "arguments": {"dtype": engine.dtype, "batch_size": engine.batch_size},
            },
            "dtype": engine.dtype,
            "mlm": {
                "backend": engine.backend,
                "backend_reason": engine.fallback_reason,
                "architecture": engine.architecture,
            },
        }

    def rows(self, todo: list[DumpRequest]) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
        config, copies = self.config, self.config.masks_per_text

        def windows():
            for request in todo:
                for copy in range(copies):
                    masked, positions = masked_copy(config, self.plan, request, copy)
                    yield (request, copy, masked, positions), masked, positions

        pending: list[ShardRow] = []
        for batch in self.engine.run(windows()):
            for index, (request, copy, masked, positions) in enumerate(batch.keys):
                hidden = None if batch.hidden is None else batch.hidden[index]
                pending.append(
                    self.row(
                        request, copy, masked, positions, batch.log_probabilities[index], hidden
                    )
                )
                if copy == copies - 1:  # a window's copies are consecutive
                    yield request, pending
                    pending = []

    def row(self, request, copy, masked, positions, log_probabilities, hidden) -> ShardRow:
        originals = request.prompt_ids[positions].astype(np.int64)
        ids, logprobs = engine_entries(
            self.config,
            log_probabilities,
            originals,
            [self.config.seed, request.source_index, copy, DRAWS_STREAM],
        )
        target = ScoredTarget(
            sample_id=f"{request.source_index}-{copy}",
            completion_index=copy,
            target_ids=originals.astype(np.int32),
            position_ids=ids,
            position_logprobs=logprobs,
            finish_reason="masked",
            target_text=self.tokenizer.decode(originals.tolist(), skip_special_tokens=True),
        )
        row = make_row(
            request, target, len(self.tokenizer), self.config.storage(len(self.tokenizer))
        )
        if hidden is not None:
            self.hidden_width = int(hidden.shape[1])
        return replace(
            row,
            prompt_ids=masked.astype(np.int32),
            mask_positions=positions.astype(np.int32),
            token_hidden=None if hidden is None else hidden.astype(np.float16),
        )

    def record_rows(self, manifest: dict) -> None:
        hidden = manifest["mlm"].get("hidden")
        if hidden is not None and self.hidden_width is not None:
            hidden["width"] = self.hidden_width

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()
