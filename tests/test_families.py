"""Student families: --student picks the right one, and each family's objective computes on its
batch what a plain transformers forward gives (CE on the targets, by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_shards.shared.collation import collate
from kd_shards.shared.shard_reader import TrainingRow
from kd_shards.student_train.families import FAMILIES, family_of
from kd_shards.student_train.families.causal_lm import CAUSAL_LM, LanguageModelObjective
from kd_shards.student_train.families.sequence_classifier import (
    SEQUENCE_CLASSIFIER,
    ClassificationObjective,
)
from kd_shards.student_train.losses import LossOptions
from scripts.tiny_models import TOKENIZER_SIZE, build_tiny_bert, build_tiny_llama

CE_ONLY = LossOptions(loss="ce", alpha=1.0, beta=0.0, temperature=1.0, tail="bucket")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), seed=2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_each_student_is_given_its_family(llama, classifier, tmp_path):
    encoder = build_tiny_bert(tmp_path / "encoder", labels=None, tokenizer_from=classifier)
    assert family_of(str(llama)) is CAUSAL_LM
    assert family_of(str(classifier)) is SEQUENCE_CLASSIFIER
    assert family_of(str(encoder)) is SEQUENCE_CLASSIFIER  # a bare encoder gets a head
    assert len({family.name for family in FAMILIES}) == len(FAMILIES)


def token_row(index: int, prompt: list[int], target: list[int]) -> TrainingRow:
    top_k = 3
    ids = np.stack([np.array([token, 7, 9]) for token in target]).astype(np.int32)
    logprobs = np.log(np.full((len(target), top_k), 0.3, dtype=np.float32))
    return TrainingRow(
        f"s{index}", np.array(prompt, np.int32), np.array(target, np.int32), ids, logprobs
    )


def test_causal_lm_objective_ce_equals_a_plain_forward(llama):
    from transformers import AutoModelForCausalLM

    from kd_shards.shared.causal_lm import output_logits_function

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    rows = [token_row(0, [5, 6, 7], [8, 9]), token_row(1, [11], [12, 13, 14, 15])]
    objective = LanguageModelObjective(
        output_logits_function(model, TOKENIZER_SIZE), CE_ONLY, chunk_tokens=2
    )
    with torch.no_grad():
        sums = objective.sums(model, objective.batch(rows), torch.device("cpu"))
        expected = 0.0
        for row in rows:  # one row at a time, each predicted target by hand
            sequence = torch.tensor([[*row.prompt_ids, *row.target_ids]])
            logits = model(input_ids=sequence).logits[0, :, :TOKENIZER_SIZE].double()
            for offset, token in enumerate(row.target_ids):
                position = len(row.prompt_ids) + offset - 1
                expected -= torch.log_softmax(logits[position], -1)[int(token)].item()
    assert sums.shape == (4,)
    assert sums[1].item() == pytest.approx(expected, rel=1e-5)
    assert sums[0].item() == pytest.approx(expected, rel=1e-5)
    assert sums[3].item() == 0.0
    assert collate(rows).target_tokens == 6


def test_sequence_classifier_objective_ce_equals_a_plain_forward(classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    texts, gold = ["a fine film", "dull and far too long", "warm"], [1, 0, 1]
    rows = [
        TrainingRow(f"s{i}", np.zeros(0, np.int32), np.array([g], np.int32), None, None, text=t)
        for i, (t, g) in enumerate(zip(texts, gold, strict=True))
    ]
    objective = ClassificationObjective(
        tokenizer=tokenizer,
        max_length=64,
        loss_options=CE_ONLY,
        teacher_targets=None,
        hidden_loss=None,
    )
    batch = objective.batch(rows)
    with torch.no_grad():
        sums = objective.sums(model, batch, torch.device("cpu"))
        expected = 0.0
        for text, label in zip(texts, gold, strict=True):
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double()
            expected -= torch.log_softmax(logits, -1)[label].item()
    assert batch.target_tokens == 3  # the step's divisor: examples
    assert sums[1].item() == pytest.approx(expected, rel=1e-5)
    assert sums[0].item() == pytest.approx(expected, rel=1e-5)
    assert objective.extra_weights() == {}
