"""student-train across tokenizers on a generate-style dump with texts under a 500-token BPE:
a student with a 300-token BPE trains on the teacher's texts (sequence KD, ULD, hybrid), its
batches and losses equal a plain transformers forward with the formulas written here, resume
equals uninterrupted training, and bad input is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd_shards.schemas.manifest import TOKENIZER_FOLDER
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import TRAINING_COLUMNS, iterate_rows, open_dump
from kd_shards.shared.token_alignment import exact_token_map
from kd_shards.shared.tokenizer import load_tokenizer
from kd_shards.student_train.cross_tokenizer import (
    TEXT_COLUMNS,
    CrossTokenizerObjective,
    text_encoder,
)
from kd_shards.student_train.losses import LossOptions
from kd_shards.student_train.reporting import read_metrics
from kd_shards.student_train.train import run_training
from tests.conftest import train_config
from tests.test_cross_tokenizer import reference_uld
from tests.text_dumps import write_text_dump


@pytest.fixture(scope="module")
def generate_shards(tmp_path_factory) -> Path:
    """A generate-style dump under the tiny teacher's 500-token tokenizer, with texts."""
    from scripts.tiny_models import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("teacher-500")
    return write_text_dump(root / "dump", build_tiny_tokenizer(root / "tokenizer", 500))


@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory) -> Path:
    from scripts.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("student-300"), seed=2, tokenizer_size=300)


def cross_config(shards, student, out, **overrides):
    values = dict(max_steps=4, micro_batch=3, shuffle_buffer=6, alpha=0.5)
    return train_config(shards, student, out, **{**values, **overrides})


def test_sequence_kd_trains_on_the_teachers_text_in_the_students_tokens(
    generate_shards, foreign_student, tmp_path
):
    out = tmp_path / "sequence"
    summary = run_training(cross_config(generate_shards, foreign_student, out, loss="ce"))
    assert summary["steps"] == 4 and (out / "final" / "model.safetensors").is_file()
    report = json.loads((out / "alignment.json").read_text())
    assert report["kind"] == "sequence" and report["student_positions"] > 0
    # Each row as the student sees it: its chat template around the prompt text, then the
    # target text in its own tokens and its eos (the teacher's sample ended with a stop token).
    student = load_tokenizer(foreign_student)
    dump = open_dump(generate_shards)
    encoder = text_encoder(dump, student, kd="sequence", max_length=4096, trust_remote_code=False)
    objective = CrossTokenizerObjective(
        None, encoder, LossOptions("ce", 0, 0, 1, "bucket"), "sequence", 50
    )
    rows = list(iterate_rows(dump, columns=(*TRAINING_COLUMNS, *TEXT_COLUMNS)))
    stops = set(dump.manifest["tokenizer"]["stop_token_ids"])
    assert any(int(row.target_ids[-1]) in stops for row in rows)
    batch = objective.batch(rows)
    for index, row in enumerate(rows):
        prompt = student.apply_chat_template(
            [{"role": "user", "content": row.text}], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        target = student(row.target_text, add_special_tokens=False)["input_ids"]
        if int(row.target_ids[-1]) in stops:
            target = target + [student.eos_token_id]
        length = int(batch.attention_mask[index].sum())
        assert batch.input_ids[index, :length].tolist() == prompt + target
        assert batch.target_ids[batch.row_index == index].tolist() == target


def completions(tokenizer, ids: list[int], text: str) -> list[int | None]:
    """Per token, e when it completes the text up to character e: its decoded prefix IS
    text[:e] and no earlier token's prefix already was; else None."""
    seen, ends = set(), []
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        complete = prefix and text[: len(prefix)] == prefix and prefix not in seen
        ends.append(len(prefix) if complete else None)
        seen.add(prefix)
    return ends


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_logit_kd_loss_equals_a_transformers_forward_with_the_formula(
    generate_shards, foreign_student, kind
):
    from transformers import AutoModelForCausalLM

    student = load_tokenizer(foreign_student)
    teacher = load_tokenizer(generate_shards / TOKENIZER_FOLDER)
    dump = open_dump(generate_shards)
    encoder = text_encoder(
        dump, student, kd=kind, max_length=4096, trust_remote_code=False,
        token_map_of=lambda tokenizer: exact_token_map(tokenizer, student),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(foreign_student, dtype=torch.float32)
    vocabulary = len(student)
    objective = CrossTokenizerObjective(
        lambda hidden: model.lm_head(hidden)[..., :vocabulary], encoder,
        LossOptions("fkl", 0.5, 0, 1, "bucket"), kind, 7,
    )  # fmt: skip
    rows = list(iterate_rows(dump, columns=(*TRAINING_COLUMNS, *TEXT_COLUMNS)))[:4]
    batch = objective.batch(rows)
    with torch.no_grad():
        total, ce, kd, _ = objective.sums(model, batch, torch.device("cpu")).tolist()
    # The reference: the whole sequences through the model, the aligned positions by hand.
    expected_ce = expected_kd = 0.0
    aligned = 0
    mapping = exact_token_map(teacher, student)
    for index, row in enumerate(rows):
        length = int(batch.attention_mask[index].sum())
        with torch.no_grad():
            logits = model(batch.input_ids[index : index + 1, :length]).logits[0, :, :vocabulary]
        target = batch.target_ids[batch.row_index == index]
        predicting = logits[length - len(target) - 1 : length - 1].double().numpy()
        log_q = predicting - np.logaddexp.reduce(predicting, axis=1, keepdims=True)
        expected_ce -= log_q[np.arange(len(target)), target.numpy()].sum()
        # Student target i aligns with teacher target j when both end at one character.
        text = row.target_text

        student_ids, teacher_ids = target.tolist(), row.target_ids.tolist()
        student_ends = completions(student, student_ids, text)
        teacher_ends = completions(teacher, teacher_ids, text)
        for i, end in enumerate(student_ends):
            stop = i == len(target) - 1 and int(target[-1]) == student.eos_token_id
            if stop:
                candidates = [len(teacher_ids) - 1]
            else:
                candidates = [j for j, other in enumerate(teacher_ends) if end and other == end]
            if not candidates:
                continue
            aligned += 1
            stored = row.topk_logprobs[candidates[0]][None]
            stored_tail = np.full(1, np.nan, dtype=np.float32)
            if row.topk_log_tail is not None:
                stored_tail = row.topk_log_tail[candidates[0]][None]
            if kind == "uld":
                expected_kd += reference_uld(predicting[i : i + 1], stored, stored_tail, "bucket")
            else:
                q = np.exp(log_q[i])
                real = np.isfinite(stored[0])
                ids = np.where(real, mapping[np.clip(row.topk_ids[candidates[0]], 0, None)], -1)
                matched = real & (ids >= 0)
                p = np.exp(np.where(real, stored[0], -np.inf))
                expected_kd += (p[matched] * (stored[0][matched] - log_q[i][ids[matched]])).sum()
                rest = q.copy()
                rest[ids[matched]] = 0
                p_rest = np.sort(p[real & ~matched])[::-1]
                q_rest = np.sort(rest)[::-1][: len(p_rest)]
                p_tail = (
                    np.exp(stored_tail[0]) if not np.isnan(stored_tail[0]) else max(0, 1 - p.sum())
                )
                expected_kd += np.abs(p_rest - q_rest).sum() + abs(
                    p_tail - (rest.sum() - q_rest.sum())
                )
    assert aligned == int(batch.aligned.sum()) > 0
    assert ce == pytest.approx(expected_ce, rel=1e-4)
    assert kd == pytest.approx(expected_kd, rel=1e-4)
    assert total == pytest.approx(0.5 * expected_ce + 0.5 * expected_kd, rel=1e-4)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def train_losses(out: Path) -> list:
    return [
        (line["step"], line["loss"])
        for line in read_metrics(out / "metrics.jsonl")
        if "loss" in line
    ]


def test_hybrid_reports_alignment_and_resume_equals_uninterrupted(
    generate_shards, foreign_student, tmp_path
):
    whole = tmp_path / "whole"
    run_training(
        cross_config(generate_shards, foreign_student, whole, cross_tokenizer="hybrid",
                     eval_shards=str(generate_shards))
    )  # fmt: skip
    report = json.loads((whole / "alignment.json").read_text())
    assert report["kind"] == "hybrid"
    assert 0 < report["aligned_share"] <= 1 and 0 < report["mapped_mass"] <= 1
    evals = [line for line in read_metrics(whole / "metrics.jsonl") if "eval_ce" in line]
    assert evals and 0 < evals[-1]["eval_aligned_share"] <= 1 and evals[-1]["eval_kd"] > 0
    stopped = tmp_path / "stopped"
    config = dict(cross_tokenizer="hybrid", eval_shards=str(generate_shards))
    run_training(cross_config(generate_shards, foreign_student, stopped, stop_at_step=2, **config))
    run_training(cross_config(generate_shards, foreign_student, stopped, resume=True, **config))
    assert train_losses(stopped) == train_losses(whole)
    got, want = final_weights(stopped), final_weights(whole)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_bad_cross_tokenizer_input_is_refused(generate_shards, foreign_student, tmp_path):
    from tests.synthetic_dumps import write_synthetic_dump_for

    with pytest.raises(UserError, match="pass --cross-tokenizer uld or hybrid"):
        run_training(cross_config(generate_shards, foreign_student, tmp_path / "a"))
    with pytest.raises(UserError, match="drop --loss rkl"):
        cross_config(
            generate_shards, foreign_student, tmp_path / "b", loss="rkl", cross_tokenizer="uld"
        )
    with pytest.raises(UserError, match="drop --temperature"):
        cross_config(
            generate_shards, foreign_student, tmp_path / "b", temperature=2.0, cross_tokenizer="uld"
        )
    # A dump without texts (rows written without them) cannot be re-tokenized.
    textless = write_synthetic_dump_for(
        generate_shards / TOKENIZER_FOLDER, tmp_path / "textless", 12
    )
    with pytest.raises(UserError, match="stores no target texts") as refused:
        run_training(cross_config(textless, foreign_student, tmp_path / "c", loss="ce"))
    assert "\n" not in str(refused.value)
