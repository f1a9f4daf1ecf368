"""The built-in student families, in the order they are asked whether they take a model.

A new family is one module here exposing a StudentFamily (student_train/family.py), added to
FAMILIES.
"""

from __future__ import annotations

from kd_shards.shared.models import resolve_model
from kd_shards.student_train.families.causal_lm import CAUSAL_LM
from kd_shards.student_train.families.masked_lm import MASKED_LM
from kd_shards.student_train.families.seq2seq import SEQ2SEQ_LM
from kd_shards.student_train.families.sequence_classifier import SEQUENCE_CLASSIFIER
from kd_shards.student_train.family import StudentFamily

FAMILIES: tuple[StudentFamily, ...] = (CAUSAL_LM, SEQ2SEQ_LM, MASKED_LM, SEQUENCE_CLASSIFIER)
"""A *ForMaskedLM model belongs to two families: the masked LM (on a masked-LM dump) and the
sequence classifier (fine-tuned with a new head on a classify dump or --data); family_of
chooses by the dump."""
DEFAULT_FAMILY = CAUSAL_LM
"""Takes a model no family claims: its loader then says why the model cannot train."""


def family_of(reference: str, manifest: dict | None = None) -> StudentFamily:
    """The family of --student: the first in FAMILIES whose `accepts` takes its config and
    that reads the kind of dump `manifest` describes (when given); failing that, the first that
    takes the config (which then refuses the dump in one line)."""
    config = resolve_model(reference, flag="--student").config
    accepting = [family for family in FAMILIES if family.accepts(config)]
    if manifest is not None:
        reading = [family for family in accepting if family.reads(manifest)]
        accepting = reading or accepting
    return accepting[0] if accepting else DEFAULT_FAMILY
