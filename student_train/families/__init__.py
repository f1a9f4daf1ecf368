"""The built-in student families, in the order they are asked whether they take a model.

A new family is one module here exposing a StudentFamily (student_train/family.py), added to
FAMILIES.
"""

from __future__ import annotations

from kd_shards.shared.models import resolve_model
from kd_shards.student_train.families.causal_lm import CAUSAL_LM
from kd_shards.student_train.families.seq2seq import SEQ2SEQ_LM
from kd_shards.student_train.families.sequence_classifier import SEQUENCE_CLASSIFIER
from kd_shards.student_train.family import StudentFamily

FAMILIES: tuple[StudentFamily, ...] = (CAUSAL_LM, SEQ2SEQ_LM, SEQUENCE_CLASSIFIER)
DEFAULT_FAMILY = CAUSAL_LM
"""Takes a model no family claims: its loader then says why the model cannot train."""


def family_of(reference: str) -> StudentFamily:
    """The family of --student (the first in FAMILIES whose `accepts` takes its config)."""
    config = resolve_model(reference, flag="--student").config
    return next((family for family in FAMILIES if family.accepts(config)), DEFAULT_FAMILY)
