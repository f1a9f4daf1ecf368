"""kd-eval on a multiple-choice task: how each kind of model scores a question's options.

One scorer per model family, each a module holding SCORER (a `ChoiceScorer`): `accepts`
says from a model's config.json whether it scores that model, `score` turns (context,
continuation) options into option scores. SCORERS lists them in the order they are tried; a
new family (a seq2seq model scoring each option as its decoder target) is one new module and
one entry here. kd_eval/evaluation.py runs every model through the first scorer that accepts
it and hands the scores to the task's `score` (shared/tasks/choice.py).
"""

from __future__ import annotations

from kd_shards.kd_eval.choices import causal, encoder
from kd_shards.kd_eval.choices.interface import ChoiceScorer, ChoiceSettings
from kd_shards.shared.errors import UserError

__all__ = ["SCORERS", "ChoiceScorer", "ChoiceSettings", "scorer_for"]

SCORERS: tuple[ChoiceScorer, ...] = (causal.SCORER, encoder.SCORER)
"""Every multiple-choice scorer, in the order tried."""


def scorer_for(config: dict, who: str) -> ChoiceScorer:
    """The first scorer that accepts a model (its config.json), or a one-line refusal."""
    for scorer in SCORERS:
        if scorer.accepts(config):
            return scorer
    architecture = ", ".join(config.get("architectures") or ["unknown"])
    kinds = "; ".join(f"{scorer.name}: {scorer.models}" for scorer in SCORERS)
    raise UserError(
        f"{who} is a {architecture}, which no multiple-choice scorer runs: pass a model of one "
        f"of these kinds ({kinds})"
    )
