"""teacher-dump --mode rescore and student-train --more-shards on token dumps: re-scored rows equal
a transformers forward of teacher B on A's rows (same tokenizer: A's ids; another tokenizer:
A's texts re-tokenized), same sample ids, provenance, resume, an incomplete source refused, and
the per-position average of two teachers against a brute-force sum written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_shards.schemas.shard import PAD_ID
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import TrainingRow
from kd_shards.student_train.multi_teacher import average_teachers
from tests.conftest import ENGINE_TOP_K, QUESTIONS, dump_config, train_config
from tests.dump_comparison import read_rows
from tests.text_dumps import write_text_dump


def test_average_of_two_teachers_equals_a_brute_force_sum():
    rng = np.random.default_rng(0)
    rows = []
    for k in (3, 5):
        ids = np.stack([rng.choice(9, size=k, replace=False) for _ in range(4)]).astype(np.int32)
        p = rng.dirichlet(np.ones(k + 1), size=4)[:, :k]
        order = np.argsort(-p, axis=1)
        ids, p = np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1)
        logprobs = np.log(p).astype(np.float32)
        ids[1, -1], logprobs[1, -1] = PAD_ID, -np.inf  # a freed slot
        tail = None if k == 3 else np.log(1 - np.exp(logprobs).sum(1)).astype(np.float32)
        target = np.arange(4, dtype=np.int32)
        rows.append(TrainingRow("s", np.zeros(1, np.int32), target, ids, logprobs, tail))
    combined = average_teachers(rows, [0.25, 0.75])
    for position in range(4):
        expected: dict[int, float] = {}
        tail = 0.0
        for row, weight in zip(rows, [0.25, 0.75], strict=True):
            stored = {
                int(i): float(np.exp(v))
                for i, v in zip(row.topk_ids[position], row.topk_logprobs[position], strict=True)
                if i != PAD_ID
            }
            for token, probability in stored.items():
                expected[token] = expected.get(token, 0.0) + weight * probability
            tail += weight * (1 - sum(stored.values()))
        got = {
            int(i): float(np.exp(v))
            for i, v in zip(
                combined.topk_ids[position], combined.topk_logprobs[position], strict=True
            )
            if i != PAD_ID
        }
        assert got.keys() == expected.keys()
        for token in expected:
            assert got[token] == pytest.approx(expected[token], rel=1e-5)
        values = [got[int(i)] for i in combined.topk_ids[position] if i != PAD_ID]
        assert values == sorted(values, reverse=True)
        assert np.exp(combined.topk_log_tail[position]) == pytest.approx(tail, rel=1e-4)


def assert_rows_equal_a_transformers_forward(rows: dict, model_directory: Path) -> int:
    """Every stored top-k equals log_softmax of a plain transformers forward of the model on
    the row's prompt + target; returns the positions compared."""
    from transformers import AutoModelForCausalLM

    from scripts.tiny_models import TOKENIZER_SIZE

    model = AutoModelForCausalLM.from_pretrained(model_directory, dtype=torch.float32).eval()
    compared = 0
    for row in rows.values():
        prompt, target = row["prompt_ids"], row["target_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0]
        reference = torch.log_softmax(logits.double(), dim=-1)[len(prompt) - 1 : -1]
        stored_ids, stored_logprobs = np.array(row["topk_ids"]), np.array(row["topk_logprobs"])
        for position in range(len(target)):
            values, ids = torch.topk(reference[position], ENGINE_TOP_K)
            keep = ids < TOKENIZER_SIZE
            valid = stored_ids[position] != PAD_ID
            np.testing.assert_array_equal(stored_ids[position][valid], ids[keep].numpy())
            np.testing.assert_allclose(
                stored_logprobs[position][valid], values[keep].numpy(), atol=1e-3
            )
            compared += 1
    return compared


@pytest.fixture(scope="module")
def generate_shards(tiny_model, gsm8k_file, engine, tmp_path_factory) -> Path:
    from kd_shards.teacher_dump.run import run_dump

    out = tmp_path_factory.mktemp("generate-a")
    run_dump(dump_config(tiny_model, gsm8k_file, out, mode="generate", rows_per_shard=4), engine)
    return out


def rescore_config(source: Path, model: Path, out: Path, **overrides):
    return dump_config(model, source, out, mode="rescore", data=str(source), **overrides)


@pytest.mark.engine
def test_rescore_with_the_same_tokenizer_scores_the_sources_ids(
    generate_shards, tiny_model, engine, tmp_path
):
    from kd_shards.schemas.manifest import TOKENIZER_FOLDER
    from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kd_shards.teacher_dump.run import run_dump

    # teacher-dump keeps its tokenizer beside the manifest, the same tokenizer as the model's.
    kept = load_tokenizer(generate_shards / TOKENIZER_FOLDER)
    assert tokenizer_fingerprint(kept) == tokenizer_fingerprint(load_tokenizer(tiny_model))
    out = tmp_path / "b"
    manifest = run_dump(rescore_config(generate_shards, tiny_model, out, rows_per_shard=5), engine)
    assert manifest["complete"] and manifest["mode"] == "rescore"
    source = json.loads((generate_shards / "manifest.json").read_text())
    assert manifest["rescore"]["source"] == str(generate_shards)
    assert manifest["rescore"]["source_identity"] == source["identity"]
    assert manifest["rescore"]["same_tokenizer"] is True
    got, want = read_rows(out), read_rows(generate_shards)
    assert got.keys() == want.keys()
    for sample_id, row in want.items():
        for key in ("prompt_ids", "target_ids", "prompt_text", "finish_reason", "completion_index"):
            assert got[sample_id][key] == row[key], (sample_id, key)
    assert assert_rows_equal_a_transformers_forward(got, tiny_model) > 50
    # Resume: a lost shard is redone, the rows are the same.
    shard = sorted(out.glob("part-*.parquet"))[-1]
    shard.unlink()
    run_dump(rescore_config(generate_shards, tiny_model, out, rows_per_shard=5), engine)
    again = read_rows(out)
    assert again.keys() == got.keys()
    for sample_id, row in got.items():
        assert again[sample_id]["topk_ids"] == row["topk_ids"]
    # Identity: another --top-k into the same --out is refused.
    with pytest.raises(UserError, match="different config"):
        run_dump(rescore_config(generate_shards, tiny_model, out, top_k=4), engine)
    # --more-shards: the two teachers averaged per position train a student.
    from kd_shards.student_train.train import run_training

    summary = run_training(
        train_config(generate_shards, tiny_model, tmp_path / "train", more_shards=(str(out),),
                     max_steps=2, micro_batch=4, shuffle_buffer=4)
    )  # fmt: skip
    assert summary["steps"] == 2


@pytest.mark.engine
def test_rescore_across_tokenizers_retokenizes_the_texts(tiny_model, engine, tmp_path):
    from kd_shards.shared.tokenizer import load_tokenizer
    from kd_shards.teacher_dump.run import run_dump
    from scripts.tiny_models import build_tiny_tokenizer

    foreign = build_tiny_tokenizer(tmp_path / "tokenizer-300", 300)
    source = write_text_dump(tmp_path / "a", foreign)
    out = tmp_path / "b"
    manifest = run_dump(rescore_config(source, tiny_model, out), engine)
    assert manifest["complete"] and manifest["rescore"]["same_tokenizer"] is False
    teacher = load_tokenizer(tiny_model)
    rows = read_rows(out)
    assert sorted(rows) == sorted(f"{index}-0" for index in range(len(QUESTIONS)))
    for sample_id, row in rows.items():
        question, answer = QUESTIONS[int(sample_id.split("-")[0])]
        prompt = teacher.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        assert row["prompt_ids"] == prompt
        answer_ids = teacher(answer, add_special_tokens=False)["input_ids"]
        assert row["target_ids"] == answer_ids + [teacher.convert_tokens_to_ids("<|im_end|>")]
        assert row["target_text"] == answer
    assert assert_rows_equal_a_transformers_forward(rows, tiny_model) > 50


def test_an_incomplete_source_is_refused(tiny_model, tmp_path):
    from kd_shards.teacher_dump.run import run_dump
    from scripts.tiny_models import build_tiny_tokenizer

    source = write_text_dump(tmp_path / "a", build_tiny_tokenizer(tmp_path / "t", 300))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["complete"] = False
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the dump to re-score is incomplete") as refused:
        run_dump(rescore_config(source, tiny_model, tmp_path / "b"))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "b").exists()
    shutil.rmtree(source)
