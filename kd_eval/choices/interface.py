"""The interface every multiple-choice scorer implements (kd_eval/choices/)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_shards.shared.tasks.interface import Example


@dataclass(frozen=True)
class ChoiceSettings:
    """What every scorer is run with (the same for every model of one kd-eval run)."""

    batch_size: int
    """Sequences (causal) or questions (encoder) per forward pass."""
    max_length: int | None
    """Tokens per sequence at most (--max-model-len); None: the model's context."""
    trust_remote_code: bool


@dataclass(frozen=True)
class ChoiceScorer:
    """Scores the options of multiple-choice questions with one family of models."""

    name: str
    models: str
    """The models it runs, as refusals name them."""
    accepts: Callable[[dict], bool]
    """config.json -> whether this scorer runs the model."""
    score: Callable[[Path, object, Sequence[Example], ChoiceSettings], dict[str, list[np.ndarray]]]
    """(model directory, its tokenizer, the questions, settings) -> scoring name -> one (O,)
    float64 array of option scores per question (higher is better), the reported scoring
    first."""
