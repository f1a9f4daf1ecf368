"""Cross-tokenizer distillation: span alignment, ULD and the hybrid's exact map against
references written here, and student-train on a dump of another tokenizer (tiny BPE tokenizers
of 500 and 300 tokens trained on the Python docs: different merges, different token
boundaries)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_shards.shared.token_alignment import aligned_positions, character_ends, exact_token_map
from kd_shards.student_train.cross_tokenizer_losses import hybrid_sum, uld_sum

TEXTS = [
    "The quick brown fox jumps over the lazy dog: 3+4=7.",
    "Café — naïve façade, déjà vu; 1000/8=125 😀 and\n\tindented  spaces.",
    "def f(x):\n    return x ** 2  # squares\n",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from scripts.tiny_models import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return build_tiny_tokenizer(root / "500", 500), build_tiny_tokenizer(root / "300", 300)


def ends_from_offsets(tokenizer, text: str) -> tuple[list[int], list[int | None]]:
    """The tokenizer's own encoding of `text` and, per token, the character its offset span ends
    at, None unless it is the last token ending there (the pieces of one multi-byte character
    share the character's span; only the last completes it)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in encoding["offset_mapping"]]
    completing = [
        end if end > 0 and (index + 1 == len(ends) or ends[index + 1] != end) else None
        for index, end in enumerate(ends)
    ]
    return encoding["input_ids"], completing


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_equals_brute_force_offset_matching(tokenizers, text):
    teacher, student = tokenizers
    teacher_ids, teacher_offsets = ends_from_offsets(teacher, text)
    student_ids, student_offsets = ends_from_offsets(student, text)
    expected = [
        (i, j)
        for i, student_end in enumerate(student_offsets)
        for j, teacher_end in enumerate(teacher_offsets)
        if student_end is not None and student_end == teacher_end
    ]
    student_index, teacher_index = aligned_positions(
        character_ends(student, student_ids, text), character_ends(teacher, teacher_ids, text)
    )
    assert list(zip(student_index.tolist(), teacher_index.tolist(), strict=True)) == expected
    assert 0 < len(expected) < len(student_ids)  # the tokenizations differ, and meet


def reference_exact_map(teacher, student) -> np.ndarray:
    """Decode every id of both tokenizers, one at a time."""
    by_string = {}
    for token_id in range(len(student)):
        string = student.decode([token_id])
        if token_id in student.all_special_ids or not string or "\ufffd" in string:
            continue
        by_string.setdefault(string, token_id)
    mapping = []
    for token_id in range(len(teacher)):
        if token_id == teacher.eos_token_id:
            mapping.append(student.eos_token_id)
        elif token_id in teacher.all_special_ids:
            mapping.append(-1)
        else:
            mapping.append(by_string.get(teacher.decode([token_id]), -1))
    return np.asarray(mapping)


def test_exact_map_equals_decoding_every_id(tokenizers):
    teacher, student = tokenizers
    mapping = exact_token_map(teacher, student)
    np.testing.assert_array_equal(mapping, reference_exact_map(teacher, student))
    assert 0 < (mapping >= 0).sum() < len(teacher)


def teacher_top_k(rng, positions: int, k: int, vocabulary: int):
    """(logprobs (M, K) in rank order with some PAD slots, log tail (M,)) of random
    distributions over `vocabulary` outcomes."""
    probabilities = rng.dirichlet(np.full(vocabulary, 0.3), size=positions)
    order = np.argsort(-probabilities, axis=1)[:, :k]
    top = np.take_along_axis(probabilities, order, axis=1)
    logprobs = np.log(top)
    for row in range(0, positions, 3):
        logprobs[row, k - 1 - row % (k - 1) :] = -np.inf  # freed slots
    tail = np.log1p(-np.exp(logprobs).sum(1))
    return order, logprobs.astype(np.float32), tail.astype(np.float32)


def reference_uld(logits: np.ndarray, logprobs: np.ndarray, log_tail, tail: str) -> float:
    """ULD on sorted vectors, position by position."""
    total = 0.0
    for z, stored, stored_tail in zip(logits, logprobs, log_tail, strict=True):
        q = np.exp(z - z.max())
        q = np.sort(q / q.sum())[::-1]
        p = np.sort(np.exp(stored[np.isfinite(stored)]))[::-1]
        q = q[: len(p)]
        if tail == "bucket":
            p_tail = np.exp(stored_tail) if not np.isnan(stored_tail) else max(0, 1 - p.sum())
            total += np.abs(p - q).sum() + abs(p_tail - (1 - q.sum()))
        else:
            total += np.abs(p / p.sum() - q / q.sum()).sum()
    return total


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_uld_equals_sorted_vector_formula(tail):
    rng = np.random.default_rng(0)
    _, logprobs, log_tail = teacher_top_k(rng, positions=9, k=6, vocabulary=40)
    log_tail[1] = np.nan  # no stored tail: 1 - sum(p)
    logits = rng.normal(size=(9, 25)) * 2
    actual = uld_sum(
        torch.tensor(logits), torch.tensor(logprobs), torch.tensor(log_tail), tail=tail
    )
    assert actual.item() == pytest.approx(reference_uld(logits, logprobs, log_tail, tail), rel=1e-5)


def test_uld_with_the_whole_vocabulary_is_l1_of_sorted_distributions():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(12), size=4)
    logits = torch.tensor(rng.normal(size=(4, 12)))
    q = torch.softmax(logits, -1).numpy()
    expected = np.abs(np.sort(p, 1) - np.sort(q, 1)).sum()
    logprobs = torch.tensor(np.log(np.sort(p, 1)[:, ::-1].copy()))
    assert uld_sum(logits, logprobs).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert uld_sum(torch.log(torch.tensor(p)), logprobs).item() == pytest.approx(0, abs=1e-5)


def test_hybrid_is_kl_on_matched_plus_uld_on_the_rest():
    rng = np.random.default_rng(2)
    teacher_ids, logprobs, log_tail = teacher_top_k(rng, positions=7, k=5, vocabulary=30)
    token_map = np.where(rng.random(30) < 0.5, rng.permutation(30) % 20, -1)
    mapped = np.where(np.isfinite(logprobs), token_map[teacher_ids], -1)
    logits = rng.normal(size=(7, 20)) * 2
    expected = 0.0
    for z, stored, ids, stored_tail in zip(logits, logprobs, mapped, log_tail, strict=True):
        q = np.exp(z - z.max())
        q /= q.sum()
        real = np.isfinite(stored)
        matched = real & (ids >= 0)
        p = np.exp(np.where(real, stored, -np.inf))
        expected += (p[matched] * (stored[matched] - np.log(q[ids[matched]]))).sum()
        rest = q.copy()
        rest[ids[matched]] = 0.0
        p_rest = np.sort(p[real & ~matched])[::-1]
        q_rest = np.sort(rest)[::-1][: len(p_rest)]
        expected += np.abs(p_rest - q_rest).sum()
        expected += abs(np.exp(stored_tail) - (rest.sum() - q_rest.sum()))
    actual = hybrid_sum(
        torch.tensor(logits), torch.tensor(logprobs), torch.tensor(mapped), torch.tensor(log_tail)
    )
    assert actual.item() == pytest.approx(expected, rel=1e-5)


def test_cross_tokenizer_losses_have_gradients():
    rng = np.random.default_rng(3)
    teacher_ids, logprobs, log_tail = teacher_top_k(rng, positions=5, k=4, vocabulary=30)
    mapped = np.where(np.isfinite(logprobs), teacher_ids % 7 - 2, -1)
    for loss in (
        lambda z: uld_sum(z, torch.tensor(logprobs), torch.tensor(log_tail)),
        lambda z: hybrid_sum(
            z, torch.tensor(logprobs), torch.tensor(mapped), torch.tensor(log_tail)
        ),
    ):
        logits = torch.tensor(rng.normal(size=(5, 20)), requires_grad=True)
        loss(logits).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
