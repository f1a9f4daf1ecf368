"""Sentence-pair classification (MRPC, RTE, QQP) through dump, train and eval on a tiny BERT:
pair tokenization against the tokenizer's own pair call, the classify dump against a plain
transformers forward of each pair, the student's batches, kd-eval's probabilities and F1
against a formula written here, and a pair task without its second column refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_shards.shared.errors import UserError
from scripts.tiny_models import build_tiny_bert
from tests.conftest import dump_config

PAIRS = [
    ("the company raised its profit forecast", "profits are expected to rise", "1"),
    ("he left the meeting early", "the meeting ended before he came", "0"),
    ("shares fell sharply on monday", "the stock dropped a lot on monday", "1"),
    ("the court rejected the appeal", "the appeal was accepted by the judges", "0"),
    ("rain is expected tomorrow", "tomorrow it will probably rain", "1"),
    ("she sold the house last year", "the house was built last year", "0"),
    ("the team won the final", "they lost in the first round", "0"),
    ("prices rose by two percent", "prices went up 2 percent", "1"),
]


@pytest.fixture(scope="module")
def mrpc_folder(tmp_path_factory) -> Path:
    """train.tsv / test.tsv in GLUE's MRPC layout (byte-order mark, quotes kept as text)."""
    folder = tmp_path_factory.mktemp("mrpc")
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    lines = "".join(
        f'{label}\t{i}\t{i + 100}\t{a}\t"{b}\n' for i, (a, b, label) in enumerate(PAIRS)
    )
    for split in ("train", "test"):
        (folder / f"{split}.tsv").write_text(header + lines, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def pair_teacher(tmp_path_factory) -> Path:
    from kd_shards.shared.tasks import mrpc

    return build_tiny_bert(tmp_path_factory.mktemp("pair-teacher"), labels=mrpc.LABELS)


def test_pair_tokenization_equals_the_tokenizers_pair_call(pair_teacher):
    from transformers import AutoTokenizer

    from kd_shards.shared.classification import classifier_input_ids, encode_texts

    tokenizer = AutoTokenizer.from_pretrained(pair_teacher)
    firsts, seconds = [a for a, _, _ in PAIRS], [b for _, b, _ in PAIRS]
    encoded = encode_texts(tokenizer, firsts, 512, pairs=seconds)
    for row, (first, second) in enumerate(zip(firsts, seconds, strict=True)):
        expected = tokenizer(first, text_pair=second)["input_ids"]
        ids, truncated = classifier_input_ids(tokenizer, first, second, 512)
        assert ids == expected and not truncated
        length = int(encoded["attention_mask"][row].sum())
        assert encoded["input_ids"][row, :length].tolist() == expected
    # Cut to 8 ids: still [CLS] a [SEP] b [SEP], with both texts kept, the longer one cut first.
    ids, truncated = classifier_input_ids(tokenizer, firsts[0], seconds[0], 8)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert truncated and len(ids) == 8 and ids[0] == cls and ids[-1] == sep
    assert ids.count(sep) == 2 and ids.index(sep) > 1 and ids.index(sep) < 6
    # A single text is cut as before: its start and its closing token.
    whole = tokenizer(firsts[0])["input_ids"]
    assert classifier_input_ids(tokenizer, firsts[0], None, 4)[0] == whole[:3] + whole[-1:]
    with pytest.raises(UserError, match="mixes single texts and text pairs"):
        encode_texts(tokenizer, firsts[:2], 512, pairs=[seconds[0], None])


def test_a_pair_dump_trains_and_evaluates_and_equals_a_forward_of_each_pair(
    pair_teacher, mrpc_folder, tmp_path
):
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.schemas.shard import PAIR_COLUMN, max_rounding_error
    from kd_shards.shared.classification import label_order
    from kd_shards.shared.shard_reader import CLASSIFY_COLUMNS, iterate_rows, open_dump
    from kd_shards.student_train.config import TrainConfig
    from kd_shards.student_train.families.sequence_classifier import ClassificationObjective
    from kd_shards.student_train.train import run_training
    from kd_shards.teacher_dump.run import run_dump

    out = tmp_path / "dump"
    run_dump(
        dump_config(
            pair_teacher, mrpc_folder, out, data="mrpc", mode="classify",
            classify_backend="transformers", split="train", rows_per_shard=5,
        )
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(pair_teacher)
    model = AutoModelForSequenceClassification.from_pretrained(pair_teacher).eval()
    reference = []
    with torch.no_grad():
        for a, b, _ in PAIRS:
            encoded = tokenizer(a, f'"{b}', return_tensors="pt")
            # Every stage reads token type 0 (shared.classification.classifier_input_ids).
            logits = model(encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            reference.append(torch.log_softmax(logits[0], -1).numpy())
    reference = np.stack(reference)
    dump = open_dump(out)
    assert dump.manifest["classify"]["text_pairs"] is True
    rows = sorted(
        iterate_rows(dump, columns=(*CLASSIFY_COLUMNS, PAIR_COLUMN)), key=lambda r: int(r.sample_id)
    )
    assert [(row.text, row.text_pair) for row in rows] == [(a, f'"{b}') for a, b, _ in PAIRS]
    stored = np.concatenate([label_order(row.topk_ids, row.topk_logprobs) for row in rows])
    np.testing.assert_allclose(stored, reference, atol=max_rounding_error() + 1e-5)
    assert PAIR_COLUMN in pq.read_schema(next(out.glob("part-*.parquet"))).names

    # The student reads each example as the same pair.
    objective = ClassificationObjective(
        tokenizer=tokenizer, max_length=512, loss_options=None, teacher_targets=None,
        hidden_loss=None,
    )  # fmt: skip
    batch = objective.batch(rows[:3])
    for row, (a, b, _) in enumerate(PAIRS[:3]):
        length = int(batch.attention_mask[row].sum())
        assert batch.input_ids[row, :length].tolist() == tokenizer(a, f'"{b}')["input_ids"]

    common = dict(student=str(pair_teacher), micro_batch=4, progress=False, lr=1e-3, max_steps=2)
    distilled = run_training(TrainConfig(shards=str(out), out=str(tmp_path / "kd"), **common))
    labels_only = run_training(
        TrainConfig(
            data="mrpc", data_path=str(mrpc_folder), split="train", loss="ce",
            out=str(tmp_path / "ce"), **common,
        )
    )  # fmt: skip
    assert distilled["steps"] == labels_only["steps"] == 2 and distilled["train"]["kd"] > 0

    report = run_evaluation(
        EvalConfig(
            data="mrpc", data_path=str(mrpc_folder), models=(f"teacher={pair_teacher}",),
            classify_backend="transformers", out=str(tmp_path / "eval"), progress=False,
        )
    )  # fmt: skip
    metrics = report["models"]["teacher"]["metrics"]
    lines = (tmp_path / "eval" / "predictions-teacher.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["text_pair"] for p in predictions] == [f'"{b}' for _, b, _ in PAIRS]
    probabilities = np.asarray(
        [
            [p["probabilities"][name] for name in ("not_equivalent", "equivalent")]
            for p in predictions
        ]
    )
    np.testing.assert_allclose(probabilities, np.exp(reference), atol=1e-5)
    predicted = reference.argmax(1)
    gold = np.asarray([int(label) for _, _, label in PAIRS])
    true_positive = int(((predicted == 1) & (gold == 1)).sum())
    precision = true_positive / max(int((predicted == 1).sum()), 1)
    recall = true_positive / int((gold == 1).sum())
    f1 = 2 * precision * recall / (precision + recall) if true_positive else 0.0
    assert metrics["f1"] == pytest.approx(f1) and metrics["accuracy"] == pytest.approx(
        (predicted == gold).mean()
    )


def test_a_pair_task_without_its_second_column_is_refused_in_one_line(pair_teacher, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"sentence1": "only one text", "label": 1}) + "\n")
    with pytest.raises(UserError, match="has no column sentence2") as caught:
        from kd_shards.teacher_dump.run import run_dump

        run_dump(
            dump_config(
                pair_teacher, data, tmp_path / "dump", data="mrpc", mode="classify",
                classify_backend="transformers",
            )
        )  # fmt: skip
    assert "\n" not in str(caught.value)


def test_a_verbalizer_puts_both_texts_of_a_pair_into_its_prompt(tiny_model, tmp_path):
    from kd_shards.shared.tasks import Example
    from kd_shards.teacher_dump.modes.classify import verbalizer_prompt

    config = dump_config(
        tiny_model, tmp_path, tmp_path / "out", mode="classify", label_words=("no", "yes")
    )
    example = Example(0, "A cat sat.", ("equivalent",), pair="A cat was sitting.")
    prompt = verbalizer_prompt(config, example)
    assert "Text 1: A cat sat.\nText 2: A cat was sitting." in prompt and "no, yes" in prompt
    both = dump_config(
        tiny_model, tmp_path, tmp_path / "out", mode="classify", label_words=("no", "yes"),
        verbalizer_prompt="Does '{text}' mean '{pair}'? {labels}",
    )  # fmt: skip
    assert (
        verbalizer_prompt(both, example) == "Does 'A cat sat.' mean 'A cat was sitting.'? no, yes"
    )


def test_a_dump_of_single_texts_has_no_pair_column_and_reads_as_before(pair_teacher, tmp_path):
    import pyarrow.parquet as pq

    from kd_shards.schemas.shard import PAIR_COLUMN, SCHEMA_V1
    from kd_shards.shared.shard_reader import CLASSIFY_COLUMNS, iterate_rows, open_dump
    from kd_shards.teacher_dump.run import run_dump

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": a, "label": int(g)}) + "\n" for a, _, g in PAIRS))
    out = tmp_path / "dump"
    run_dump(
        dump_config(
            pair_teacher, data, out, data=str(data), prompt_column="text", target_column="label",
            mode="classify", classify_backend="transformers",
        )
    )  # fmt: skip
    assert "text_pairs" not in open_dump(out).manifest["classify"]
    for path in out.glob("part-*.parquet"):
        assert pq.read_schema(path).names == SCHEMA_V1.names and PAIR_COLUMN not in SCHEMA_V1.names
    rows = list(iterate_rows(open_dump(out), columns=CLASSIFY_COLUMNS))
    assert len(rows) == len(PAIRS) and all(row.text_pair is None for row in rows)
