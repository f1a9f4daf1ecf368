"""Masked-LM distillation (DistilBERT): teacher-dump --mode mlm on a tiny random
BertForMaskedLM, the masks, the triple loss, the masked-LM student, resume, init-student and
fine-tuning the distilled encoder. Every check is against a plain transformers forward, a
formula written here, or a rule written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from kd_shards.shared.errors import UserError
from kd_shards.shared.model_preparation import derive_student, kept_layers
from kd_shards.shared.shard_reader import MASKED_LM_COLUMNS, iterate_rows, open_dump
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.losses import masked_lm_distillation_sums
from kd_shards.student_train.train import run_training
from kd_shards.teacher_dump.masking import choose_masks, masking_generator
from kd_shards.teacher_dump.run import run_dump
from tests.conftest import dump_config, train_config

TOP_K = 8


@pytest.fixture(scope="module")
def masked_teacher(tmp_path_factory):
    from scripts.tiny_models import build_tiny_masked_lm

    return build_tiny_masked_lm(tmp_path_factory.mktemp("tiny-mlm"), layers=4)


def mlm_config(teacher, text_file, out, **overrides):
    values = dict(
        data="text", mode="mlm", chunk_tokens=40, limit=6, masks_per_text=2, hidden_layer=-1,
        rows_per_shard=4, seed=3,
    )  # fmt: skip
    return dump_config(teacher, text_file, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def mlm_dump(masked_teacher, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm-dump") / "shards"
    run_dump(mlm_config(masked_teacher, text_file, out))
    return out


def shard_table(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    tables = [pq.read_table(directory / entry["name"]) for entry in manifest["shards"]]
    return manifest, [row for table in tables for row in table.to_pylist()]


def test_mlm_dump_equals_a_transformers_forward_at_the_masked_positions(masked_teacher, mlm_dump):
    from transformers import AutoModelForMaskedLM

    manifest, rows = shard_table(mlm_dump)
    assert manifest["mode"] == "mlm" and manifest["complete"]
    assert manifest["mlm"]["backend"] == "transformers"
    assert manifest["mlm"]["architecture"] == "BertForMaskedLM"
    assert manifest["mlm"]["hidden"]["width"] == 64
    assert len(rows) == 12 and {row["completion_index"] for row in rows} == {0, 1}
    model = AutoModelForMaskedLM.from_pretrained(masked_teacher, dtype=torch.float32).eval()
    decoded = {
        row.sample_id: row for row in iterate_rows(open_dump(mlm_dump), columns=MASKED_LM_COLUMNS)
    }
    for row in rows:
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            output = model(input_ids=ids, output_hidden_states=True)
        log_p = torch.log_softmax(output.logits[0].double(), dim=-1)
        positions = row["mask_positions"]
        assert positions == sorted(positions) and len(positions) == len(row["target_ids"])
        assert 0 not in positions and len(row["prompt_ids"]) - 1 not in positions  # [CLS], [SEP]
        expected_targets = log_p[positions, row["target_ids"]].numpy()
        np.testing.assert_allclose(row["target_logprobs"], expected_targets, atol=2**-10)
        stored = decoded[row["sample_id"]]
        top = torch.topk(log_p[positions], TOP_K, dim=-1)
        np.testing.assert_array_equal(stored.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(stored.topk_logprobs, top.values.numpy(), atol=2**-9)
        hidden = np.asarray(row["teacher_token_hidden"], dtype=np.float32).reshape(len(ids[0]), -1)
        np.testing.assert_allclose(
            hidden, output.hidden_states[-1][0].numpy(), atol=2e-3, rtol=1e-3
        )


def test_masks_follow_bert_80_10_10_with_the_seed():
    length, windows, mask_id = 100, 3000, 4
    replacement_ids = np.arange(5, 400)
    special = np.zeros(length, dtype=bool)
    special[[0, length - 1]] = True
    counts = {"mask": 0, "random": 0, "same": 0}
    chosen_at = np.zeros(length)
    source = np.random.default_rng(0)
    for index in range(windows):
        ids = source.integers(5, 400, size=length)
        masked, positions = choose_masks(
            ids, special, rate=0.15, mask_id=mask_id, replacement_ids=replacement_ids,
            generator=masking_generator(7, index, 0),
        )  # fmt: skip
        assert len(positions) == round(0.15 * (length - 2))  # 15 of the 98 non-special tokens
        assert not special[positions].any()
        untouched = np.setdiff1d(np.arange(length), positions)
        np.testing.assert_array_equal(masked[untouched], ids[untouched])
        chosen_at[positions] += 1
        for position in positions:
            if masked[position] == mask_id:
                counts["mask"] += 1
            elif masked[position] == ids[position]:
                counts["same"] += 1
            else:
                assert masked[position] in replacement_ids
                counts["random"] += 1
    total = sum(counts.values())
    # a random replacement equal to the original counts as unchanged: 0.1/R of the positions
    hit = 1 / len(replacement_ids)
    for name, share in (("mask", 0.8), ("random", 0.1 * (1 - hit)), ("same", 0.1 + 0.1 * hit)):
        sigma = math.sqrt(share * (1 - share) / total)
        assert abs(counts[name] / total - share) < 5 * sigma, (name, counts)
    # every non-special position is chosen 15/98 of the time
    rates = chosen_at[1:-1] / windows
    assert abs(rates - 15 / 98).max() < 5 * math.sqrt(0.153 * 0.847 / windows)
    # the same seed, window and copy give the same masks; another copy or seed others
    ids = np.arange(5, 5 + length)

    def draw(seed, index, copy):
        return choose_masks(
            ids, special, rate=0.15, mask_id=mask_id, replacement_ids=replacement_ids,
            generator=masking_generator(seed, index, copy),
        )  # fmt: skip

    first, again = draw(7, 3, 1), draw(7, 3, 1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], draw(7, 3, 0)[1])
    assert not np.array_equal(first[1], draw(8, 3, 1)[1])


def test_mlm_dump_ranks_reproduce_the_single_run(masked_teacher, text_file, mlm_dump, tmp_path):
    out = tmp_path / "ranks"
    for rank in (0, 1):
        run_dump(mlm_config(masked_teacher, text_file, out, rank=rank, world_size=2))
    _, single = shard_table(mlm_dump)
    _, split = shard_table(out)
    by_id = {row["sample_id"]: row for row in split}
    assert by_id.keys() == {row["sample_id"] for row in single}
    for row in single:
        other = by_id[row["sample_id"]]
        for column in ("prompt_ids", "mask_positions", "target_ids", "target_logprobs"):
            assert other[column] == row[column], column


def test_an_interrupted_mlm_dump_resumes_to_the_uninterrupted_one(
    masked_teacher, text_file, mlm_dump, tmp_path, monkeypatch
):
    from kd_shards.teacher_dump.shards import ShardWriter

    out = tmp_path / "resumed"
    real_add = ShardWriter.add_prompt_rows
    calls = []

    def add_then_crash(writer, rows):
        calls.append(len(rows))
        if len(calls) == 5:  # the process dies before this text's masked copies are written
            raise RuntimeError("killed")
        real_add(writer, rows)

    monkeypatch.setattr(ShardWriter, "add_prompt_rows", add_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_dump(mlm_config(masked_teacher, text_file, out, rows_per_shard=1))
    monkeypatch.undo()
    _, partial = shard_table(out)
    _, single = shard_table(mlm_dump)
    assert 0 < len(partial) < len(single)
    run_dump(mlm_config(masked_teacher, text_file, out, rows_per_shard=1))
    _, resumed = shard_table(out)
    assert sorted(row["sample_id"] for row in resumed) == sorted(row["sample_id"] for row in single)
    by_id = {row["sample_id"]: row for row in resumed}
    for row in single:
        for column in ("prompt_ids", "mask_positions", "target_ids", "target_logprobs"):
            assert by_id[row["sample_id"]][column] == row[column], column


def test_kd_eval_refuses_an_mlm_dump_as_teacher_shards_before_any_engine(
    mlm_dump, tiny_model, text_file
):
    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation

    config = EvalConfig(
        data="text", data_path=str(text_file), models=(f"a={tiny_model}",),
        teacher_shards=str(mlm_dump), chunk_tokens=64, progress=False,
    )  # fmt: skip
    with pytest.raises(UserError, match="is a masked-LM dump \\(teacher-dump --mode mlm\\)"):
        run_evaluation(config)


def test_triple_loss_equals_the_formula():
    torch.manual_seed(0)
    positions, vocabulary, tokens, width, temperature = 5, 11, 9, 6, 2.0
    student = torch.randn(positions, vocabulary)
    teacher = torch.randn(positions, vocabulary) * 2
    targets = torch.randint(0, vocabulary, (positions,))
    teacher_log_p = torch.log_softmax(teacher, dim=-1)
    order = teacher_log_p.argsort(dim=-1, descending=True)  # every id stored: no tail
    stored = torch.gather(teacher_log_p, 1, order)
    h_student, h_teacher = torch.randn(tokens, width), torch.randn(tokens, width)
    weights = torch.rand(tokens)
    got = masked_lm_distillation_sums(
        student, targets, order, stored, torch.full((positions,), -math.inf),
        h_student, h_teacher, weights, weights=(5.0, 2.0, 1.0), temperature=temperature,
        tail="bucket",
    )  # fmt: skip
    p = torch.softmax(teacher / temperature, dim=-1)
    log_q = torch.log_softmax(student / temperature, dim=-1)
    kd = temperature**2 * (p * (torch.log(p) - log_q)).sum()
    ce = -torch.log_softmax(student, dim=-1)[torch.arange(positions), targets].sum()
    cosine = sum(
        weights[t]
        * (1 - (h_student[t] @ h_teacher[t]) / (h_student[t].norm() * h_teacher[t].norm()))
        for t in range(tokens)
    )
    expected = torch.stack([5 * kd + 2 * ce + cosine, ce, kd, cosine])
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)  # float32 sums


@pytest.fixture(scope="module")
def masked_student(masked_teacher, tmp_path_factory):
    return derive_student(masked_teacher, 2, tmp_path_factory.mktemp("cut") / "student")


def test_init_student_keeps_every_other_layer_and_the_mlm_head(masked_teacher, masked_student):
    assert kept_layers(12, 6, "evenly") == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice for BERT
    config = json.loads((masked_student / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["num_hidden_layers"] == 2
    teacher = load_file(masked_teacher / "model.safetensors")
    student = load_file(masked_student / "model.safetensors")
    for new, old in ((0, 0), (1, 3)):
        name = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(student[name.format(new)], teacher[name.format(old)])
    head = "cls.predictions.transform.dense.weight"
    assert torch.equal(student[head], teacher[head])


def mlm_train_config(shards, student, out, **overrides):
    values = dict(max_steps=4, micro_batch=3, grad_accum=1, shuffle_buffer=4, lr=1e-3)
    return train_config(shards, student, out, **{**values, **overrides})


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


def test_masked_lm_student_resume_equals_uninterrupted(mlm_dump, masked_student, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    summary = run_training(
        mlm_train_config(mlm_dump, masked_student, whole, eval_shards=str(mlm_dump))
    )
    assert summary["steps"] == 4
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_kl" in line for line in metrics)
    run_training(
        mlm_train_config(
            mlm_dump, masked_student, stopped, eval_shards=str(mlm_dump), stop_at_step=2
        )
    )
    run_training(
        mlm_train_config(mlm_dump, masked_student, stopped, eval_shards=str(mlm_dump), resume=True)
    )
    want, got = final_weights(whole), final_weights(stopped)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert any(
        not torch.equal(want[name], value)
        for name, value in load_file(masked_student / "model.safetensors").items()
    )


def test_distilled_encoder_fine_tunes_as_a_sequence_classifier(mlm_dump, masked_student, tmp_path):
    distilled = tmp_path / "distilled"
    run_training(mlm_train_config(mlm_dump, masked_student, distilled, max_steps=1))
    data = tmp_path / "labels.jsonl"
    texts = [("a fine and good day", "positive"), ("a bad and sad day", "negative")] * 4
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in texts))
    out = tmp_path / "classifier"
    run_training(
        TrainConfig(
            student=str(distilled / "final"),
            out=str(out),
            data=str(data),
            loss="ce",
            max_steps=2,
            micro_batch=4,
            shuffle_buffer=4,
            lr=1e-3,
            progress=False,
        )  # fmt: skip
    )
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    encoder = "bert.encoder.layer.0.attention.self.query.weight"
    mlm = final_weights(distilled)[encoder]
    classifier = final_weights(out)[encoder]
    assert mlm.shape == classifier.shape and not torch.equal(mlm, classifier)  # trained from it


def test_mlm_dump_refused_by_a_causal_student(mlm_dump, student_model, tmp_path):
    with pytest.raises(UserError, match="masked-LM dump .* only a \\*ForMaskedLM student"):
        run_training(mlm_train_config(mlm_dump, student_model, tmp_path / "causal"))


def test_mode_mlm_refuses_a_causal_teacher(tiny_model, text_file, tmp_path):
    with pytest.raises(UserError, match="not a masked LM: --mode mlm needs a \\*ForMaskedLM"):
        run_dump(mlm_config(tiny_model, text_file, tmp_path / "out", hidden_layer=None))
