"""A causal LM scores each option by teacher forcing: the log-probability of the option's
continuation tokens after its context, in a plain transformers forward (float32, batched).
Two scorings: "mean" (the sum divided by the continuation's token count, so that longer
options are not penalized for their length; reported as accuracy) and "sum" (the total
log-probability). Context and continuation are tokenized separately, as
lm-evaluation-harness does, so that every option is cut at the same token boundary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_shards.kd_eval.choices.interface import ChoiceScorer, ChoiceSettings
from kd_shards.shared.classification import is_causal_lm
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import context_length
from kd_shards.shared.tasks.interface import Example


def option_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(context + continuation token ids, how many of them are the continuation's)."""
    context_ids = list(tokenizer(context)["input_ids"])
    continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not continuation_ids:
        raise UserError(f"an option has no tokens ({continuation!r}): fix the record")
    return context_ids + continuation_ids, len(continuation_ids)


def continuation_logprobs(
    model, sequences: list[tuple[list[int], int]], pad_id: int
) -> list[float]:
    """Summed log-probability of the last n tokens of each (ids, n), in one forward pass.

    Args:
        sequences: (token ids, n) per sequence, n >= 1 and n < len(ids).
    """
    import torch

    longest = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    log_probabilities = torch.log_softmax(logits, dim=-1)
    sums = []
    for row, (ids, count) in enumerate(sequences):
        # Position j predicts token j + 1: the continuation's tokens are predicted by the
        # positions just before them.
        positions = torch.arange(len(ids) - count - 1, len(ids) - 1)
        targets = torch.tensor(ids[len(ids) - count :])
        sums.append(float(log_probabilities[row, positions, targets].sum()))
    return sums


def score(
    directory: Path, tokenizer, examples: Sequence[Example], settings: ChoiceSettings
) -> dict[str, list[np.ndarray]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory),
        dtype=torch.float32,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    ).eval()
    limit = settings.max_length or context_length(model.config.to_dict()) or 1 << 30
    sequences = []
    for position, example in enumerate(examples):
        for option, (context, continuation) in enumerate(example.choices):
            ids, count = option_ids(tokenizer, context, continuation)
            if count >= limit:
                raise UserError(
                    f"record {example.index}: option {option} alone has {count} tokens, more "
                    f"than the context of {limit}: raise --max-model-len"
                )
            # A long context keeps its end: the tokens nearest the option.
            sequences.append((position, option, ids[-limit:], count))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals = {(position, option): 0.0 for position, option, _, _ in sequences}
    ordered = sorted(sequences, key=lambda item: len(item[2]))
    for start in range(0, len(ordered), settings.batch_size):
        batch = ordered[start : start + settings.batch_size]
        sums = continuation_logprobs(model, [(ids, count) for _, _, ids, count in batch], pad_id)
        for (position, option, _, _), value in zip(batch, sums, strict=True):
            totals[(position, option)] = value
    counts = {(position, option): count for position, option, _, count in sequences}
    result: dict[str, list[np.ndarray]] = {"mean": [], "sum": []}
    for position, example in enumerate(examples):
        keys = [(position, option) for option in range(len(example.choices))]
        summed = np.asarray([totals[key] for key in keys], dtype=np.float64)
        result["sum"].append(summed)
        result["mean"].append(summed / np.asarray([counts[key] for key in keys]))
    return result


SCORER = ChoiceScorer(
    name="causal",
    models="a causal LM (*ForCausalLM)",
    accepts=is_causal_lm,
    score=score,
)
