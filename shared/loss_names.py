"""The names of student-train's losses, divergences and tail policies, defined once: the
distributions (shared/distributions.py), student-train's config and losses, and the scripts that
drive them all take them from here. Importing it costs nothing (no torch)."""

from __future__ import annotations

from typing import Literal, get_args

TailPolicy = Literal["bucket", "renormalize"]
"""bucket: the teacher mass outside its top-k is one extra outcome; renormalize: compare on the
k ids only."""
TAIL_POLICIES: tuple[str, ...] = get_args(TailPolicy)
Divergence = Literal["fkl", "rkl", "jsd", "skew-kl", "tvd"]
"""fkl KL(p||q), rkl KL(q||p), jsd generalized JSD(beta) as in GKD, skew-kl KL(p || beta p +
(1 - beta) q) as in DistiLLM, tvd total variation."""
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
Loss = Literal["ce", Divergence]
"""What student-train minimizes (--loss): ce, cross-entropy on the target tokens only, or one of
the logit-KD divergences."""
LOSSES: tuple[str, ...] = get_args(Loss)
