"""teacher-dump --mode classify: class distributions instead of token top-k.

Two kinds of teacher:
- a sequence classifier (`*ForSequenceClassification`): each text, tokenized by the teacher and
  truncated to its context, goes through shared.engine.ClassifierEngine (vLLM's pooling runner,
  or transformers where vLLM cannot run it here or hidden states are asked for);
- a causal LM used as a verbalizer (--label-words): for each label word, the prompt followed
  by the word is teacher-forced (shared.engine.TeacherEngine.score) and the word's tokens'
  logprobs are summed; the class distribution is those probabilities renormalized over the words.
Both write one row per example in the layout of schemas.shard.CLASSIFY_CONVENTIONS.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from schemas.shard import CLASSIFY_CONVENTIONS, NO_LABEL
from shared.classification import (
    align_labels,
    gold_index,
    is_causal_lm,
    is_sequence_classifier,
    log_softmax_rows,
    model_labels,
)
from shared.errors import UserError
from shared.models import ResolvedModel
from shared.tasks import Example
from shared.tokenizer import render_prompt
from teacher_dump.config import DumpConfig
from teacher_dump.requests import DumpRequest
from teacher_dump.rows import make_classification_row
from teacher_dump.shards import ShardWriter


@dataclass(frozen=True)
class ClassificationPlan:
    """What a classify dump needs besides its requests."""

    labels: list[str]
    """Label names in the order of the teacher's outputs (= label index in the shards)."""
    teacher_kind: str
    """'classifier' or 'verbalizer'."""
    label_word_ids: list[list[int]] | None
    """Verbalizer: each label word's token ids as the reply (None for a classifier)."""
    truncated: int
    """Texts cut to the teacher's context."""
    pad_id: int
    """The teacher tokenizer's padding id (transformers batches)."""


def teacher_labels(
    config: DumpConfig,
    model: ResolvedModel,
    tokenizer,
    task_labels: tuple[str, ...] | None,
    use_template: bool,
) -> tuple[list[str], str, list[list[int]] | None]:
    """(labels, "classifier" or "verbalizer", each label word's token ids for a verbalizer):
    what kind of teacher --model is, checked against the data's labels and --label-words."""
    if is_sequence_classifier(model.config):
        if config.label_words:
            raise UserError(
                f"--model {config.model} is a sequence classifier: --label-words is for a causal "
                "LM teacher (a verbalizer); drop it"
            )
        labels = align_labels(model_labels(model.config), task_labels, f"--model {config.model}")
        kind, word_ids = "classifier", None
    elif is_causal_lm(model.config):
        if not config.label_words:
            raise UserError(
                f"--model {config.model} is a causal LM, not a sequence classifier: pass "
                "--label-words (one word per label) to use it as a verbalizer teacher, or a "
                "*ForSequenceClassification model"
            )
        labels = list(task_labels) if task_labels is not None else list(config.label_words)
        if len(config.label_words) != len(labels):
            raise UserError(
                f"--label-words gives {len(config.label_words)} words but the data has "
                f"{len(labels)} labels ({', '.join(labels)}): give one word per label, in order"
            )
        kind = "verbalizer"
        prefix = "" if use_template else " "
        word_ids = [
            list(tokenizer(prefix + word.strip(), add_special_tokens=False)["input_ids"])
            for word in config.label_words
        ]
        if any(not ids for ids in word_ids):
            raise UserError("--label-words holds an empty word: give one non-empty word per label")
    else:
        names = ", ".join(model.config.get("architectures") or ["unknown"])
        raise UserError(
            f"--model {config.model} is a {names}, not a sequence classifier: --mode classify "
            "needs a *ForSequenceClassification model (or a causal LM with --label-words)"
        )
    return labels, kind, word_ids


def classification_requests(
    config: DumpConfig,
    model: ResolvedModel,
    tokenizer,
    examples: list[Example],
    task_labels: tuple[str, ...] | None,
    *,
    context: int,
    use_template: bool,
) -> tuple[list[DumpRequest], ClassificationPlan]:
    """Check the teacher and the labels, and render every example (before any engine starts)."""
    labels, kind, word_ids = teacher_labels(config, model, tokenizer, task_labels, use_template)
    requests, truncated = [], 0
    longest_word = max((len(ids) for ids in word_ids), default=0) if word_ids else 0
    for example in examples:
        if not example.prompt.strip():
            raise UserError(
                f"record {example.index} has an empty text: fix or remove it (or check "
                "--prompt-column)"
            )
        gold = gold_index(example.references, labels, example.index)
        if kind == "classifier":
            ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
            if len(ids) > context:
                # Keep the start and the closing special token, as tokenizers truncate.
                ids = ids[: context - 1] + ids[-1:]
                truncated += 1
        else:
            prompt = config.verbalizer_prompt.format(
                text=example.prompt, labels=", ".join(config.label_words)
            )
            ids = render_prompt(tokenizer, prompt, use_chat_template=use_template)
            if len(ids) + longest_word + 1 > context:
                raise UserError(
                    f"record {example.index}: the verbalizer prompt has {len(ids)} tokens, "
                    f"which with the label words does not fit the context of {context}: raise "
                    "--max-model-len or shorten --verbalizer-prompt"
                )
        requests.append(
            DumpRequest(
                source_index=example.index,
                prompt_ids=np.asarray(ids, dtype=np.int32),
                target_ids=np.asarray([gold], dtype=np.int32),
                prompt_text=example.prompt,
                references=(labels[gold],) if gold != NO_LABEL else (),
            )
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return requests, ClassificationPlan(labels, kind, word_ids, truncated, pad_id)


def manifest_section(config: DumpConfig, plan: ClassificationPlan) -> dict:
    """The manifest's "classify" entry (the backend is filled in once the engine runs)."""
    return {
        "labels": plan.labels,
        "label_order": "topk_ids hold all label indices in rank order (most likely first)",
        "conventions": CLASSIFY_CONVENTIONS,
        "teacher_kind": plan.teacher_kind,
        "backend": None,
        "backend_reason": None,
        "truncated_texts": plan.truncated,
        "hidden": (
            {"layer": config.hidden_layer, "pooling": config.hidden_pooling, "width": None}
            if config.hidden_layer is not None
            else None
        ),
        "verbalizer": (
            {
                "label_words": list(config.label_words),
                "prompt": config.verbalizer_prompt,
                "mean_label_word_mass": None,
            }
            if plan.teacher_kind == "verbalizer"
            else None
        ),
    }


def build_classifier_engine(config: DumpConfig, model: ResolvedModel, context: int):
    from shared.engine import ClassifierEngine, ClassifierSettings

    return ClassifierEngine(
        ClassifierSettings(
            model=str(model.directory),
            dtype=config.dtype,
            max_model_len=context,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            trust_remote_code=config.trust_remote_code,
            backend=config.classify_backend,
            hidden_layer=config.hidden_layer,
            pooling=config.hidden_pooling,
        )
    )


def engine_record(engine, plan: ClassificationPlan) -> tuple[dict, dict]:
    """(manifest "engine" entry, updates to the "classify" entry) for the engine that ran."""
    if plan.teacher_kind == "verbalizer":
        backend, reason = "vllm-score", "label words scored by teacher forcing"
    else:
        backend, reason = engine.backend, engine.fallback_reason
    arguments = {key: value for key, value in engine.engine_arguments.items() if key != "model"}
    return (
        {
            "name": backend,
            "version": engine.vllm_version,
            "platform": engine.platform,
            "arguments": arguments,
        },
        {"backend": backend, "backend_reason": reason},
    )


def dump_classification(
    config: DumpConfig,
    engine,
    plan: ClassificationPlan,
    todo: list[DumpRequest],
    *,
    total: int,
    writer: ShardWriter,
) -> dict:
    """Stream the examples through the teacher into shards. Returns statistics for the manifest:
    {"rows", "hidden_width", "label_word_mass" (verbalizer: sum over rows)}."""
    progress = tqdm(
        total=total,
        initial=total - len(todo),
        unit="text",
        desc=f"teacher-dump classify r{config.rank}/{config.world_size}",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    statistics = {"rows": 0, "hidden_width": None, "label_word_mass": 0.0}
    started = time.perf_counter()
    try:
        for request, log_probabilities, hidden, word_mass in classified(config, engine, plan, todo):
            if hidden is not None:
                statistics["hidden_width"] = int(hidden.shape[0])
            writer.add_prompt_rows(
                [
                    make_classification_row(
                        source_index=request.source_index,
                        log_probabilities=log_probabilities,
                        gold=int(request.target_ids[0]),
                        text=request.prompt_text,
                        labels=plan.labels,
                        hidden=hidden,
                    )
                ]
            )
            statistics["rows"] += 1
            progress.update(1)
            progress.set_postfix_str(
                f"{statistics['rows'] / max(time.perf_counter() - started, 1e-9):,.1f} texts/s",
                refresh=False,
            )
            if word_mass is not None:
                statistics["label_word_mass"] += word_mass
        writer.flush()
    finally:
        progress.close()
    return statistics


def classified(config: DumpConfig, engine, plan: ClassificationPlan, todo: list[DumpRequest]):
    """(request, (L,) log-probabilities in label order, (H,) hidden or None, the label words'
    probability mass before renormalizing (verbalizer) or None) per example, in completion
    order."""
    if plan.teacher_kind == "classifier":
        for batch in engine.classify(
            ((request, request.prompt_ids.tolist()) for request in todo),
            max_in_flight=config.max_in_flight,
            pad_id=plan.pad_id,
        ):
            for row, request in enumerate(batch.keys):
                hidden = None if batch.hidden is None else batch.hidden[row]
                yield request, batch.log_probabilities[row], hidden, None
        return
    yield from verbalized(config, engine, plan, todo)


def verbalized(config: DumpConfig, engine, plan: ClassificationPlan, todo: list[DumpRequest]):
    """The verbalizer: each (example, label word) teacher-forced once; an example is complete
    when all its words are scored. The class distribution renormalizes the words' probabilities;
    the mass they held before that is reported too (the manifest keeps its mean)."""
    words = plan.label_word_ids
    sequences = (
        ((position, label), request.prompt_ids.tolist() + words[label])
        for position, request in enumerate(todo)
        for label in range(len(words))
    )
    scores: dict[int, np.ndarray] = {}
    remaining: dict[int, int] = {}
    for (position, label), scored in engine.score(
        sequences, top_k=1, max_in_flight=config.max_in_flight
    ):
        prompt_length = len(todo[position].prompt_ids)
        # Row j-1 of the scored positions predicts token j: the word starts at token P.
        word_logprobs = scored.position_logprobs[prompt_length - 1 :, 0]
        scores.setdefault(position, np.zeros(len(words)))[label] = float(word_logprobs.sum())
        remaining[position] = remaining.get(position, len(words)) - 1
        if remaining[position] == 0:
            word_scores = scores.pop(position)
            mass = float(np.exp(word_scores).sum())
            yield todo[position], log_softmax_rows(word_scores[None, :])[0], None, mass
