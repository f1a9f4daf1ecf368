"""Sequence classification, written once for teacher-dump, student-train and kd-eval: which
outputs of a classifier mean which label, the texts as model inputs, pooled hidden states, and
class distributions as Arrow-free arrays.

A classifier's outputs are indexed by its config's id2label. A task (sst2, agnews) or a data
file names its labels too; `align_labels` decides how the two correspond, or refuses with the
fix: the same names (any case, any order: the model's order wins), or the default names
LABEL_0..LABEL_{L-1} of an unnamed head matched by position. A dump's manifest then records the
label names in the model's output order, and every reader maps by those names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from kd_shards.schemas.shard import NO_LABEL
from kd_shards.shared.errors import UserError, one_line

Pooling = Literal["cls", "mean"]
"""How a sequence of hidden states becomes one vector: the first token's ([CLS]) or the mean
over the real (unpadded) tokens."""

UNNAMED_LABEL = re.compile(r"^LABEL_(\d+)$")
ENCODER_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "encoder.layers")
"""Where encoders keep their stack of layers (BERT/RoBERTa/MiniLM/ELECTRA, DistilBERT,
ModernBERT, others), relative to the base model."""


def architectures(config: dict) -> list[str]:
    return list(config.get("architectures") or [])


def is_sequence_classifier(config: dict) -> bool:
    """A model with a classification head (`*ForSequenceClassification`)."""
    return any(name.endswith("ForSequenceClassification") for name in architectures(config))


def is_causal_lm(config: dict) -> bool:
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures(config))


def is_encoder_body(config: dict) -> bool:
    """A bare encoder (BertModel, RobertaModel, ...): a student gets a new head on top."""
    return any(
        name.endswith("Model") and not name.endswith("LMHeadModel")
        for name in architectures(config)
    )


def model_labels(config: dict) -> list[str]:
    """A classifier's label names in output order, as transformers reads them from its
    config.json: id2label, or without it num_labels unnamed labels LABEL_i (2 when that is not
    stated either: transformers 5 saves a model with the default two labels without both);
    [] when id2label's keys are not label indices."""
    id2label = config.get("id2label")
    if id2label is None:
        return [f"LABEL_{index}" for index in range(int(config.get("num_labels") or 2))]
    try:
        return [str(id2label[key]) for key in sorted(id2label, key=int)]
    except (ValueError, TypeError):
        return []


def align_labels(model: Sequence[str], task: Sequence[str] | None, who: str) -> list[str]:
    """The label names of the model's outputs, in its output order, checked against the task's.

    Args:
        model: the model's id2label names in output order.
        task: the task's label names, or None for a data file (whose labels must then be the
            model's names or indices).
        who: how messages name the model (e.g. "--model teacher").
    Returns:
        One name per output; with an unnamed head (LABEL_i), the task's names by position.
    """
    model = list(model)
    if task is None:
        return model
    task = list(task)
    if len(model) != len(task):
        raise UserError(
            f"{who} has {len(model)} output labels ({', '.join(model)}) but the data has "
            f"{len(task)} ({', '.join(task)}): use a classifier trained for this task's labels"
        )
    if all(UNNAMED_LABEL.match(name) for name in model):
        return task
    by_name = {name.lower(): name for name in task}
    if sorted(by_name) != sorted(name.lower() for name in model):
        raise UserError(
            f"{who} names its labels {', '.join(model)} but the data's labels are "
            f"{', '.join(task)}: use a classifier trained for this task, or name its labels in "
            "config.json id2label"
        )
    return [by_name[name.lower()] for name in model]


def gold_index(references: Sequence[str], labels: Sequence[str], index: int) -> int:
    """The gold label's index in `labels` (NO_LABEL when the example has none)."""
    if not references or not str(references[0]).strip():
        return NO_LABEL
    raw = str(references[0]).strip()
    by_name = {label.lower(): position for position, label in enumerate(labels)}
    if raw.lower() in by_name:
        return by_name[raw.lower()]
    if raw.isdigit() and int(raw) < len(labels):
        return int(raw)
    raise UserError(
        f"record {index} has label {raw!r}, which is none of the model's labels "
        f"({', '.join(labels)}): fix the data or use a classifier for these labels"
    )


def classifier_input_ids(
    tokenizer, text: str, pair: str | None, max_length: int
) -> tuple[list[int], bool]:
    """(token ids of one example as a classifier reads it, whether it was truncated): special
    tokens added, a sentence pair as the tokenizer joins `text` and `pair` (BERT:
    [CLS] a [SEP] b [SEP]), at most `max_length` ids. A single text keeps its start and its
    closing special token; a pair is cut by the tokenizer, longest text first. Teacher-dump,
    student-train (encode_texts) and kd-eval all tokenize this way, so every stage reads the
    same ids. Token type (segment) ids are not passed: every model reads type 0."""
    if pair is None:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(ids) <= max_length:
            return ids, False
        return ids[: max_length - 1] + ids[-1:], True
    ids = list(tokenizer(text, pair, add_special_tokens=True)["input_ids"])
    if len(ids) <= max_length:
        return ids, False
    cut = tokenizer(
        text, pair, add_special_tokens=True, truncation="longest_first", max_length=max_length
    )
    return list(cut["input_ids"]), True


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: int, pairs: Sequence[str | None] | None = None
) -> dict:
    """Token ids of texts (or, with `pairs`, of text pairs) as a model reads them, as
    classifier_input_ids gives them, right-padded to the longest: {"input_ids",
    "attention_mask"} (B, L) int64."""
    if pairs is not None and any(pair is not None for pair in pairs):
        if any(pair is None for pair in pairs):
            raise UserError(
                "a batch mixes single texts and text pairs: give every example a second text"
            )
        encoded = tokenizer(
            list(texts),
            list(pairs),
            padding=True,
            truncation="longest_first",
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    encoded = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def pool(hidden, attention_mask, pooling: Pooling):
    """(B, L, H) hidden states -> (B, H): the first token's, or the mean over real tokens.

    Args:
        hidden: (B, L, H) float. attention_mask: (B, L), 1 on real tokens.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {pooling!r}")


def load_classifier(
    directory, *, labels: Sequence[str], trust_remote_code: bool, who: str = "--model"
):
    """A transformers sequence classifier in float32 with one output per label (`labels` in
    output order). A bare encoder gets a new, randomly initialized head; a classifier must
    already have len(labels) outputs."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(directory),
            dtype=torch.float32,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: index for index, label in enumerate(labels)},
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{who} {directory}: cannot load it as a sequence classifier ({one_line(error)}): "
            "pass an encoder or *ForSequenceClassification model directory"
        ) from None
    model.eval()
    return model


def encoder_layers(model):
    """(the module holding an encoder's layers, the attribute name of its ModuleList), found
    along ENCODER_LAYER_PATHS, or None."""
    import torch

    base = getattr(model, "base_model", model)
    for path in ENCODER_LAYER_PATHS:
        *parents, name = path.split(".")
        parent = base
        for part in parents:
            parent = getattr(parent, part, None)
        if isinstance(getattr(parent, name, None), torch.nn.ModuleList):
            return parent, name
    return None


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """(N, L) logits -> (N, L) float64 log-probabilities (numerically stable)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def rank_order(log_probabilities: np.ndarray) -> np.ndarray:
    """(N, L) log-probabilities in label order -> (N, L) label indices, most likely first
    (stable: ties keep label order), as the shards store them."""
    return np.argsort(-np.asarray(log_probabilities), axis=1, kind="stable").astype(np.int32)


def label_order(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """Stored (N, L) rank-ordered label ids and logprobs -> (N, L) logprobs in label order."""
    result = np.empty(topk_logprobs.shape, dtype=np.float32)
    np.put_along_axis(result, np.asarray(topk_ids, dtype=np.int64), topk_logprobs, axis=1)
    return result
