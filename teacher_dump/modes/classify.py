"""teacher-dump --mode classify: class distributions instead of token top-k.

Two kinds of teacher:
- a sequence classifier (`*ForSequenceClassification`): each text, tokenized by the teacher and
  truncated to its context, goes through shared.engine.ClassifierEngine (vLLM's pooling runner,
  or transformers where vLLM cannot run it here or hidden states are asked for);
- a causal LM used as a verbalizer (--label-words): for each label word, the prompt followed
  by the word is teacher-forced (shared.engine.TeacherEngine.score) and the word's tokens'
  logprobs are summed; the class distribution is those probabilities renormalized over the words.
Both give one row per example in the layout of schemas.shard.CLASSIFY_CONVENTIONS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kd_shards.schemas.shard import (
    CLASSIFY_CONVENTIONS,
    CLASSIFY_SCHEMA_VERSION,
    LOGPROB_STEP,
    NO_LABEL,
)
from kd_shards.shared.classification import (
    align_labels,
    classifier_input_ids,
    gold_index,
    is_causal_lm,
    is_sequence_classifier,
    log_softmax_rows,
    model_labels,
)
from kd_shards.shared.engine import classifier_settings
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import ResolvedModel
from kd_shards.shared.tasks import Example, Task, examples_from_records
from kd_shards.shared.tokenizer import render_prompt
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.modes.tokens import build_engine
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ShardRow, make_classification_row

NAME = "classify"
OWN_FIELDS = frozenset()


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
    text_pairs: bool = False
    """The examples are sentence pairs (the shards carry the text_pair column)."""


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


def verbalizer_prompt(config: DumpConfig, example: Example) -> str:
    """--verbalizer-prompt filled in for one example. A sentence pair fills {text} and {pair}
    when the prompt has both; otherwise {text} becomes the two texts on their own lines
    ("Text 1: ...", "Text 2: ...")."""
    labels = ", ".join(config.label_words)
    if example.pair is None:
        return config.verbalizer_prompt.format(text=example.prompt, labels=labels)
    if "{pair}" in config.verbalizer_prompt:
        return config.verbalizer_prompt.format(
            text=example.prompt, pair=example.pair, labels=labels
        )
    both = f"\nText 1: {example.prompt}\nText 2: {example.pair}"
    return config.verbalizer_prompt.format(text=both, labels=labels)


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
            ids, cut = classifier_input_ids(tokenizer, example.prompt, example.pair, context)
            truncated += cut
        else:
            prompt = verbalizer_prompt(config, example)
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
                text_pair=example.pair,
            )
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = bool(examples) and examples[0].pair is not None
    return requests, ClassificationPlan(labels, kind, word_ids, truncated, pad_id, pairs)


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
        **({"text_pairs": True} if plan.text_pairs else {}),
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
    from kd_shards.shared.engine import ClassifierEngine

    return ClassifierEngine(
        classifier_settings(
            config,
            model.directory,
            max_model_len=context,
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


def check_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    if task.name == "text":
        raise UserError("--data text holds raw text without prompts: use --mode text with it")
    if not (task.is_classification or task.name == "columns"):
        raise UserError(
            f"--mode classify needs labelled texts: use a classification task (sst2, agnews, "
            "mrpc, rte, qqp, cola, phrasebank, ...), or a file with "
            f"--prompt-column (the text) and --target-column (the label), not {config.data}"
        )


def requests(config: DumpConfig, task: Task, records, inputs: TeacherInputs) -> ModeRequests:
    rendered, plan = classification_requests(
        config,
        inputs.model,
        inputs.tokenizer,
        examples_from_records(task, records, config.limit),
        task.labels,
        context=inputs.context,
        use_template=inputs.use_template,
    )
    return ModeRequests(rendered, 0, plan)


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    """Classify dumps keep schema v1's exact all-label layout (schemas.shard)."""
    return {
        "schema_version": CLASSIFY_SCHEMA_VERSION,
        "top_k": len(planned.plan.labels),
        "logprobs": {
            "mode": "raw_logprobs",
            "meaning": "natural-log probabilities over all labels (temperature 1)",
            "rounding_step": LOGPROB_STEP,
        },
        "sampling": None,
        "classify": manifest_section(config, planned.plan),
    }


def rows_per_prompt(config: DumpConfig) -> int:
    return 1


def storage(config: DumpConfig, vocabulary: int) -> None:
    """Classify rows keep every label exactly (schema v1's layout)."""
    return None


def start(config: DumpConfig, inputs: TeacherInputs, plan: ClassificationPlan, engine=None):
    """The classifier (or, for a verbalizer, the causal LM) teacher, or `engine` reused."""
    if engine is not None:
        return ClassifyTeacher(config, plan, engine, owns_engine=False)
    if plan.teacher_kind == "classifier":
        built = build_classifier_engine(config, inputs.model, inputs.context)
    else:
        # A verbalizer needs the exact logprobs of its label words, never draws.
        built = build_engine(config, inputs.model, sampled_logprobs=False)
    return ClassifyTeacher(config, plan, built, owns_engine=True)


def record_engine(manifest: dict, description: dict) -> None:
    manifest["engine"] = description["engine"]
    manifest["teacher"]["dtype"] = description["dtype"]
    manifest["classify"].update(description["classify"])


class ClassifyTeacher:
    """Classify mode's Teacher (teacher_dump.modes.interface): one row per example, and the
    figures the manifest keeps about them (hidden width, the label words' mass)."""

    def __init__(self, config: DumpConfig, plan: ClassificationPlan, engine, owns_engine: bool):
        self.config, self.plan, self.engine, self.owns_engine = config, plan, engine, owns_engine
        self.rows_done, self.hidden_width, self.label_word_mass = 0, None, 0.0

    def description(self) -> dict:
        entry, updates = engine_record(self.engine, self.plan)
        return {"engine": entry, "classify": updates, "dtype": self.engine.dtype}

    def rows(self, todo: list[DumpRequest]) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
        for request, log_probabilities, hidden, word_mass in classified(
            self.config, self.engine, self.plan, todo
        ):
            if hidden is not None:
                self.hidden_width = int(hidden.shape[0])
            if word_mass is not None:
                self.label_word_mass += word_mass
            self.rows_done += 1
            row = make_classification_row(
                source_index=request.source_index,
                log_probabilities=log_probabilities,
                gold=int(request.target_ids[0]),
                text=request.prompt_text,
                labels=self.plan.labels,
                hidden=hidden,
                text_pair=request.text_pair,
            )
            yield request, [row]

    def record_rows(self, manifest: dict) -> None:
        """The hidden-state width and the verbalizer's label-word mass (a resumed dump adds its
        rows to the running sums of the earlier runs)."""
        section = manifest["classify"]
        if section.get("hidden") is not None and self.hidden_width is not None:
            section["hidden"]["width"] = self.hidden_width
        if self.plan.teacher_kind == "verbalizer":
            verbalizer = section["verbalizer"]
            verbalizer["label_word_mass_sum"] = (
                verbalizer.get("label_word_mass_sum", 0.0) + self.label_word_mass
            )
            verbalizer["label_word_mass_rows"] = (
                verbalizer.get("label_word_mass_rows", 0) + self.rows_done
            )
            verbalizer["mean_label_word_mass"] = verbalizer["label_word_mass_sum"] / max(
                verbalizer["label_word_mass_rows"], 1
            )

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()
