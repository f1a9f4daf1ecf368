"""Loss properties (design.md §4): zero on identical distributions, agreement with
torch.nn.functional.kl_div when k = V, JSD's limits, gradients that reach the student, chunked
equal to unchunked, and a step's gradient independent of the micro-batch split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_train.batches import collate
from student_train.losses import (
    LOSSES,
    chunked_loss_sums,
    fidelity_sums,
    kd_loss_sum,
    loss_sums,
    student_log_distribution,
    teacher_log_distribution,
)
from student_train.shard_stream import TrainingRow

KD_LOSSES = [loss for loss in LOSSES if loss != "ce"]
TAILS = ["renormalize", "bucket"]


def teacher_topk_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What teacher-dump stores for a teacher with these logits: top-k ids and raw logprobs."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values.float()


def random_logits(seed: int, positions: int, vocabulary: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(positions, vocabulary, generator=generator, dtype=torch.float64) * scale


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    vocabulary=st.integers(2, 40),
    k_fraction=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    loss=st.sampled_from(KD_LOSSES),
    tail=st.sampled_from(TAILS),
)
def test_identical_distributions_cost_nothing(
    seed, vocabulary, k_fraction, temperature, loss, tail
):
    logits = random_logits(seed, 5, vocabulary)
    k = max(1, min(vocabulary, round(k_fraction * vocabulary)))
    ids, logprobs = teacher_topk_from_logits(logits, k)
    value = kd_loss_sum(
        logits.float(), ids, logprobs, loss=loss, beta=0.3, temperature=temperature, tail=tail
    )
    # Stored logprobs are float32 and the student's tail is computed exactly: allow float noise.
    assert abs(value.item()) < 1e-4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), vocabulary=st.integers(2, 50), tail=st.sampled_from(TAILS))
def test_forward_kl_equals_torch_kl_div_when_k_is_the_vocabulary(seed, vocabulary, tail):
    teacher = random_logits(seed, 6, vocabulary)
    student = random_logits(seed + 1, 6, vocabulary).float()
    ids, logprobs = teacher_topk_from_logits(teacher, vocabulary)
    ours = kd_loss_sum(student, ids, logprobs, loss="fkl", beta=0.0, temperature=1.0, tail=tail)
    reference = F.kl_div(
        torch.log_softmax(student, -1),
        torch.log_softmax(teacher.float(), -1),
        log_target=True,
        reduction="sum",
    )
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-4)


def test_forward_kl_with_temperature_equals_kl_div_of_tempered_distributions():
    teacher = random_logits(3, 4, 12)
    student = random_logits(4, 4, 12).float()
    ids, logprobs = teacher_topk_from_logits(teacher, 12)
    temperature = 2.0
    ours = kd_loss_sum(
        student, ids, logprobs, loss="fkl", beta=0.0, temperature=temperature, tail="renormalize"
    )
    reference = (
        F.kl_div(
            torch.log_softmax(student / temperature, -1),
            torch.log_softmax(teacher.float() / temperature, -1),
            log_target=True,
            reduction="sum",
        )
        * temperature**2
    )
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4)


@pytest.mark.parametrize("tail", TAILS)
def test_jsd_reduces_to_forward_and_reverse_kl_on_full_support(tail):
    teacher = random_logits(5, 7, 16)
    student = random_logits(6, 7, 16).float()
    ids, logprobs = teacher_topk_from_logits(teacher, 16)

    def value(loss, beta):
        return kd_loss_sum(
            student, ids, logprobs, loss=loss, beta=beta, temperature=1.0, tail=tail
        ).item()

    assert value("jsd", 0.0) == pytest.approx(value("fkl", 0.0), rel=1e-6)
    assert value("jsd", 1.0) == pytest.approx(value("rkl", 0.0), rel=1e-6)
    reverse = F.kl_div(
        torch.log_softmax(teacher.float(), -1),
        torch.log_softmax(student, -1),
        log_target=True,
        reduction="sum",
    )
    assert value("rkl", 0.0) == pytest.approx(reverse.item(), rel=1e-4, abs=1e-4)
    # Between the ends the generalized JSD is bounded by both KLs' weights (it is a proper
    # divergence, positive here because the distributions differ).
    middle = value("jsd", 0.5)
    assert 0 < middle < max(value("fkl", 0.0), value("rkl", 0.0))
    assert middle <= math.log(2) * len(student) + 1e-6


def test_tvd_and_skew_kl_match_hand_computation():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q_logits = torch.log(torch.tensor([[0.2, 0.2, 0.6]]))
    ids = torch.tensor([[0, 1, 2]])
    logprobs = p.log()
    tvd = kd_loss_sum(
        q_logits, ids, logprobs, loss="tvd", beta=0, temperature=1, tail="renormalize"
    )
    assert tvd.item() == pytest.approx(0.5 * (0.3 + 0.1 + 0.4), abs=1e-6)
    skew = kd_loss_sum(
        q_logits, ids, logprobs, loss="skew-kl", beta=0.1, temperature=1, tail="renormalize"
    )
    q = torch.tensor([0.2, 0.2, 0.6])
    mixture = 0.1 * p[0] + 0.9 * q
    assert skew.item() == pytest.approx(float((p[0] * (p[0] / mixture).log()).sum()), abs=1e-6)


def test_bucket_tail_carries_the_mass_outside_the_top_k():
    # Teacher: 0.6 / 0.3 on ids 0 / 1, tail 0.1. A student matching the top-2 but with its tail
    # on other tokens in the same proportion is a perfect match under "bucket"; with
    # "renormalize" only the ratio 2:1 matters.
    logprobs = torch.log(torch.tensor([[0.6, 0.3]]))
    ids = torch.tensor([[0, 1]])
    student = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    bucket = kd_loss_sum(student, ids, logprobs, loss="fkl", beta=0, temperature=1, tail="bucket")
    assert abs(bucket.item()) < 1e-6
    other = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    renormalized = kd_loss_sum(
        other, ids, logprobs, loss="fkl", beta=0, temperature=1, tail="renormalize"
    )
    assert abs(renormalized.item()) < 1e-6
    assert (
        kd_loss_sum(other, ids, logprobs, loss="fkl", beta=0, temperature=1, tail="bucket") > 0.05
    )


def test_padding_slots_are_outside_the_support():
    logprobs = torch.tensor([[math.log(0.7), math.log(0.2), -math.inf]])
    ids = torch.tensor([[3, 1, -1]])
    log_p, valid = teacher_log_distribution(logprobs, 1.0, "bucket")
    assert valid.tolist() == [[True, True, False, True]]
    assert log_p.exp()[0, 3].item() == pytest.approx(0.1, abs=1e-6)
    log_q = student_log_distribution(torch.zeros(1, 5), ids, 1.0, "bucket")
    assert torch.isneginf(log_q[0, 2])
    assert log_q.exp()[0, 3].item() == pytest.approx(3 / 5, abs=1e-6)  # ids 0, 2, 4


@pytest.mark.parametrize("loss", KD_LOSSES)
@pytest.mark.parametrize("tail", TAILS)
def test_every_kd_loss_sends_gradient_to_the_student(loss, tail):
    teacher = random_logits(7, 6, 30)
    ids, logprobs = teacher_topk_from_logits(teacher, 5)
    ids[2, 3:] = -1  # freed padding slots must not break gradients
    logprobs[2, 3:] = -math.inf
    student = random_logits(8, 6, 30).float().requires_grad_()
    value = kd_loss_sum(student, ids, logprobs, loss=loss, beta=0.4, temperature=1.5, tail=tail)
    value.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum(-1).min() > 1e-6  # every position gets a signal


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_equals_unchunked_in_value_and_gradient(loss):
    torch.manual_seed(0)
    hidden_size, vocabulary, positions = 16, 40, 37
    head = torch.nn.Linear(hidden_size, vocabulary + 3, bias=False)  # padded rows sliced off
    hidden = torch.randn(positions, hidden_size)
    ids, logprobs = teacher_topk_from_logits(random_logits(9, positions, vocabulary), 6)
    targets = ids[:, 0].clone()
    options = dict(loss=loss, alpha=0.3, beta=0.4, temperature=2.0, tail="bucket")

    def run(chunk_tokens):
        head.zero_grad()
        leaf = hidden.clone().requires_grad_()
        sums = chunked_loss_sums(
            leaf,
            lambda h: head(h)[:, :vocabulary],
            targets,
            ids,
            logprobs,
            chunk_tokens=chunk_tokens,
            **options,
        )
        sums[0].backward()
        return sums.detach(), leaf.grad.clone(), head.weight.grad.clone()

    whole = run(positions)
    reference = loss_sums(head(hidden)[:, :vocabulary], targets, ids, logprobs, **options)
    torch.testing.assert_close(whole[0], reference.detach(), rtol=1e-5, atol=1e-5)
    for chunk in (1, 5, 16):
        chunked = run(chunk)
        for got, expected in zip(chunked, whole, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fidelity_sums_hand_example():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    ids = torch.tensor([[0, 1], [2, 0]])
    logprobs = torch.log(torch.tensor([[0.7, 0.2], [0.5, 0.4]]))
    targets = torch.tensor([0, 1])
    ce, kl, agreement, positions = fidelity_sums(logits, targets, ids, logprobs).tolist()
    assert ce == pytest.approx(-math.log(0.7) - math.log(0.3), abs=1e-6)
    second = 0.5 * math.log(0.5 / 0.6) + 0.4 * math.log(0.4 / 0.1) + 0.1 * math.log(0.1 / 0.3)
    assert kl == pytest.approx(second, abs=1e-5)  # the first position matches exactly
    assert agreement == 2 and positions == 2


def micro_batch_gradient(model, rows, groups, loss):
    """Gradient of one optimizer step over `rows` split into `groups` micro-batches."""
    from student_train.student import final_hidden_states

    model.zero_grad()
    size = len(rows) // groups
    batches = [collate(rows[start : start + size]) for start in range(0, len(rows), size)]
    step_tokens = sum(batch.target_tokens for batch in batches)
    head = model.get_output_embeddings()
    for batch in batches:
        hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)
        selected = hidden[batch.row_index, batch.position]
        sums = chunked_loss_sums(
            selected,
            lambda h: head(h)[:, :50],
            batch.target_ids,
            batch.topk_ids,
            batch.topk_logprobs,
            chunk_tokens=7,
            loss=loss,
            alpha=0.5,
            beta=0.5,
            temperature=1.0,
            tail="bucket",
        )
        (sums[0] / step_tokens).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["ce", "fkl", "jsd"])
def test_step_gradient_does_not_depend_on_the_micro_batch_split(loss):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.synthetic_dumps import synthetic_row

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=56,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).float()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(8):
        row = synthetic_row(index, rng, top_k=5, vocabulary=50)
        rows.append(
            TrainingRow(
                row.sample_id, row.prompt_ids, row.target_ids, row.topk_ids, row.topk_logprobs
            )
        )
    whole = micro_batch_gradient(model, rows, 1, loss)
    split = micro_batch_gradient(model, rows, 4, loss)
    assert whole.abs().max() > 1e-4
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
