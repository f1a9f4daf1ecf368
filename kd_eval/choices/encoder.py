"""An encoder scores the options as choices: each (context, continuation) is tokenized as a text
pair (shared.classification.classifier_input_ids, the same ids classification reads), and
transformers' AutoModelForMultipleChoice gives one logit per option ("choice"). A bare encoder
gets a new, randomly initialized multiple-choice head (it must be fine-tuned first to mean
anything)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_shards.kd_eval.choices.interface import ChoiceScorer, ChoiceSettings
from kd_shards.shared.classification import architectures, classifier_input_ids, is_encoder_body
from kd_shards.shared.models import context_length
from kd_shards.shared.tasks.interface import Example

DEFAULT_MAX_LENGTH = 512


def accepts(config: dict) -> bool:
    return is_encoder_body(config) or any(
        name.endswith("ForMultipleChoice") for name in architectures(config)
    )


def score(
    directory: Path, tokenizer, examples: Sequence[Example], settings: ChoiceSettings
) -> dict[str, list[np.ndarray]]:
    import torch
    from transformers import AutoModelForMultipleChoice

    model = AutoModelForMultipleChoice.from_pretrained(
        str(directory),
        dtype=torch.float32,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    ).eval()
    limit = settings.max_length or context_length(model.config.to_dict()) or DEFAULT_MAX_LENGTH
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = []
    for start in range(0, len(examples), settings.batch_size):
        batch = examples[start : start + settings.batch_size]
        options = max(len(example.choices) for example in batch)
        ids = [
            [
                classifier_input_ids(tokenizer, context, continuation.strip(), limit)[0]
                for context, continuation in example.choices
            ]
            for example in batch
        ]
        longest = max(len(each) for question in ids for each in question)
        input_ids = torch.full((len(batch), options, longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), options, longest), dtype=torch.long)
        for row, question in enumerate(ids):
            for option, each in enumerate(question):
                input_ids[row, option, : len(each)] = torch.tensor(each)
                attention_mask[row, option, : len(each)] = 1
            # A question with fewer options than the batch's most: pad with copies of its
            # first, whose scores are dropped below.
            for option in range(len(question), options):
                input_ids[row, option] = input_ids[row, 0]
                attention_mask[row, option] = attention_mask[row, 0]
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        for row, example in enumerate(batch):
            result.append(logits[row, : len(example.choices)].numpy().astype(np.float64))
    return {"choice": result}


SCORER = ChoiceScorer(
    name="encoder",
    models="an encoder (*ForMultipleChoice, or a bare encoder given a new head)",
    accepts=accepts,
    score=score,
)
