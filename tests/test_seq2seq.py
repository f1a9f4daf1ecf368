"""Encoder-decoder teachers and students (T5, BART) on tiny random models: the transformers
backend's dumps against a plain transformers forward, resume, bad input, the student's loss
against a dense computation, init-student's cut, resume of training, two-stage distillation and
kd-eval's greedy answers against transformers' generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd_shards.schemas.shard import PAD_ID
from kd_shards.shared.errors import UserError
from tests.conftest import REPO, dump_config, train_config
from tests.dump_comparison import assert_same_rows, read_rows

TOP_K = 8
PROMPTS = 4
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    from scripts.tiny_models import build_tiny_seq2seq

    return {
        kind: build_tiny_seq2seq(tmp_path_factory.mktemp(f"tiny-{kind}"), kind=kind)
        for kind in ("t5", "bart")
    }


@pytest.fixture(scope="module")
def engines(teachers):
    """One transformers backend per teacher, reused by the dumps of this module."""
    from kd_shards.shared.engine import EngineSettings
    from kd_shards.shared.seq2seq_engine import Seq2SeqEngine

    def engine(model: Path) -> Seq2SeqEngine:
        return Seq2SeqEngine(
            EngineSettings(
                model=str(model), dtype="float32", max_model_len=512, max_logprobs=2 * TOP_K,
                sampled_logprobs=False, tensor_parallel_size=1, gpu_memory_utilization=None,
                seed=0, enforce_eager=True, trust_remote_code=False,
            ),
            batch_rows=3,  # smaller than the dump, so that prompts of one batch are padded
        )  # fmt: skip

    return {kind: engine(model) for kind, model in teachers.items()}


def seq2seq_dump(teachers, engines, kind: str, mode: str, out: Path, **overrides) -> dict:
    from kd_shards.teacher_dump.run import run_dump

    config = dump_config(
        teachers[kind], overrides.pop("data_path"), out, mode=mode, limit=PROMPTS,
        max_new_tokens=NEW_TOKENS, **overrides,
    )  # fmt: skip
    return run_dump(config, engines[kind])


@pytest.fixture(scope="module")
def dumps(teachers, engines, gsm8k_file, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(kind, mode) -> a finished dump of the first prompts of the GSM8K file."""
    made = {}
    for kind in ("t5", "bart"):
        for mode in ("generate", "score"):
            out = tmp_path_factory.mktemp(f"dump-{kind}-{mode}")
            seq2seq_dump(teachers, engines, kind, mode, out, data_path=gsm8k_file)
            made[kind, mode] = out
    return made


def reference_logprobs(model_dir: Path, prompt: list[int], target: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of a plain transformers forward of the decoder on [start] + target[:-1]
    (V: every embedding row, as the teacher's raw logits)."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([prompt]),
            decoder_input_ids=torch.tensor([[start, *target[:-1]]]),
        ).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_a_dump_equals_a_transformers_forward_at_every_target_position(teachers, dumps, kind, mode):
    from transformers import AutoTokenizer

    out = dumps[kind, mode]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["rows"] == PROMPTS
    assert manifest["teacher"]["architecture"] == "encoder-decoder"
    assert manifest["engine"]["name"] == "transformers"
    size = len(AutoTokenizer.from_pretrained(teachers[kind]))
    rows = read_rows(out)
    assert len(rows) == PROMPTS
    for row in rows.values():
        target = row["target_ids"]
        if not target:  # the teacher's first sample was a padding row: nothing to keep
            assert mode == "generate" and row["finish_reason"] == "invalid_token"
            continue
        logprobs = reference_logprobs(teachers[kind], row["prompt_ids"], target)
        assert len(target) == len(logprobs) > 0
        # Column 0: the target token's own logprob, stored rounded to 1/2048 nats.
        want = logprobs[torch.arange(len(target)), torch.tensor(target)].numpy()
        np.testing.assert_allclose(row["target_logprobs"], want, atol=1e-3)
        for position, (ids, values) in enumerate(
            zip(row["topk_ids"], row["topk_logprobs"], strict=True)
        ):
            top = torch.topk(logprobs[position], TOP_K)
            valid = top.indices < size  # padding-row ids are never stored
            stored = [token for token in ids if token != PAD_ID]
            assert stored == top.indices[valid].tolist(), (row["sample_id"], position)
            np.testing.assert_allclose(values[: len(stored)], top.values[valid].numpy(), atol=1e-3)
        if mode == "score":
            assert row["finish_reason"] == "reference"
        else:
            assert row["finish_reason"] in ("stop", "length") and len(target) <= NEW_TOKENS


def test_an_interrupted_dump_resumes_to_the_uninterrupted_one(
    teachers, engines, dumps, gsm8k_file, tmp_path, monkeypatch
):
    from kd_shards.teacher_dump.shards import ShardWriter

    out = tmp_path / "resumed"
    real_add = ShardWriter.add_prompt_rows
    calls = []

    def add_then_crash(writer, rows):
        calls.append(len(rows))
        if len(calls) == 3:  # the third prompt: the process dies before its rows are written
            raise RuntimeError("killed")
        real_add(writer, rows)

    monkeypatch.setattr(ShardWriter, "add_prompt_rows", add_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        seq2seq_dump(
            teachers, engines, "t5", "generate", out, data_path=gsm8k_file, rows_per_shard=1
        )
    monkeypatch.undo()
    assert 0 < len(read_rows(out)) < PROMPTS
    seq2seq_dump(teachers, engines, "t5", "generate", out, data_path=gsm8k_file, rows_per_shard=1)
    assert_same_rows(read_rows(out), read_rows(dumps["t5", "generate"]))
    with pytest.raises(UserError, match="different config"):
        seq2seq_dump(
            teachers, engines, "t5", "generate", out, data_path=gsm8k_file, rows_per_shard=1,
            temperature=0.5,
        )  # fmt: skip


def test_a_sampled_dump_holds_draws_from_the_teacher(teachers, engines, gsm8k_file, tmp_path):
    from kd_shards.shared.engine import EngineSettings
    from kd_shards.shared.seq2seq_engine import Seq2SeqEngine
    from kd_shards.teacher_dump.run import run_dump

    settings = EngineSettings(
        model=str(teachers["bart"]), dtype="float32", max_model_len=512, max_logprobs=32,
        sampled_logprobs=True, tensor_parallel_size=1, gpu_memory_utilization=None, seed=0,
        enforce_eager=True, trust_remote_code=False,
    )  # fmt: skip
    config = dump_config(
        teachers["bart"], gsm8k_file, tmp_path / "sampled", mode="score", store="sampled",
        draws=32, limit=2,
    )  # fmt: skip
    manifest = run_dump(config, Seq2SeqEngine(settings))
    assert manifest["storage"]["representation"] == "sampled" and manifest["complete"]
    assert "transformers backend" in manifest["engine"]["draws"]
    # Draws land mostly on the teacher's likely tokens: their stored weights track its top-1.
    for row in read_rows(tmp_path / "sampled").values():
        logprobs = reference_logprobs(teachers["bart"], row["prompt_ids"], row["target_ids"])
        top1 = logprobs.argmax(-1).tolist()
        first = [ids[0] for ids in row["topk_ids"]]
        assert np.mean([a == b for a, b in zip(first, top1, strict=True)]) > 0.5


def test_an_encoder_only_model_given_to_generate_is_refused_in_one_line(gsm8k_file, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from kd_shards.teacher_dump.run import run_dump
    from scripts.tiny_models import build_tiny_bert_tokenizer, redraw_weights

    model_dir = tmp_path / "bert-mlm"
    tokenizer = build_tiny_bert_tokenizer(model_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    redraw_weights(BertForMaskedLM(config), 0.3).save_pretrained(model_dir)
    with pytest.raises(UserError) as refused:
        run_dump(dump_config(model_dir, gsm8k_file, tmp_path / "out", mode="generate"))
    message = str(refused.value)
    assert "BertForMaskedLM, an encoder with no decoder" in message and "\n" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_encoder_decoder_teacher_is_refused_raw_text(teachers, text_file, tmp_path):
    from kd_shards.teacher_dump.run import run_dump

    config = dump_config(teachers["t5"], text_file, tmp_path / "out", mode="text", data="text")
    with pytest.raises(UserError, match="encoder-decoder model .* no distribution over raw text"):
        run_dump(config)


def test_a_causal_student_refuses_an_encoder_decoder_dump(dumps, student_model, tmp_path):
    from kd_shards.student_train.train import run_training

    shards = dumps["t5", "score"]
    with pytest.raises(UserError) as refused:
        run_training(train_config(shards, student_model, tmp_path / "out", max_steps=1))
    message = str(refused.value)
    assert "encoder-decoder teacher" in message and "is a causal LM" in message
    assert "\n" not in message
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.fixture(scope="module")
def t5_student(teachers, tmp_path_factory) -> Path:
    """The T5 teacher cut to 1 encoder and 1 decoder layer (init-student)."""
    from kd_shards.shared.model_preparation import derive_student

    return derive_student(teachers["t5"], 1, tmp_path_factory.mktemp("cut") / "student")


@pytest.mark.parametrize(("loss", "alpha"), [("fkl", 0.5), ("rkl", 0.0), ("ce", 0.0)])
def test_the_student_loss_on_a_batch_equals_a_dense_computation(
    dumps, t5_student, loss, alpha, tmp_path
):
    from kd_shards.shared.shard_reader import iterate_rows, open_dump
    from kd_shards.student_train.distributed import Distributed
    from kd_shards.student_train.families.seq2seq import setup

    dump = open_dump(dumps["t5", "generate"])
    config = train_config(
        dumps["t5", "generate"], t5_student, tmp_path, loss=loss, alpha=alpha, tail="renormalize",
        temperature=2.0, chunk_tokens=5, max_steps=1,
    )  # fmt: skip
    alone = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    loaded = setup(config, alone, dump, None, None)
    rows = list(iterate_rows(dump))
    batch = loaded.objective.batch(rows)
    model = loaded.student.model
    sums = loaded.objective.sums(model, batch, torch.device("cpu"))

    # Dense: each row alone through the whole model, every position's loss written out.
    total = ce_sum = kd_sum = 0.0
    vocabulary = loaded.student.vocabulary
    start = model.config.decoder_start_token_id
    for row in rows:
        target = row.target_ids.tolist()
        with torch.no_grad():
            logits = (
                model(
                    input_ids=torch.tensor([row.prompt_ids.tolist()]),
                    decoder_input_ids=torch.tensor([[start, *target[:-1]]]),
                )
                .logits[0, :, :vocabulary]
                .double()
            )
        for position, token in enumerate(target):
            z = logits[position]
            ce = -torch.log_softmax(z, -1)[token].item()
            valid = row.topk_ids[position] != PAD_ID
            ids = torch.tensor(row.topk_ids[position][valid], dtype=torch.long)
            teacher = torch.tensor(row.topk_logprobs[position][valid], dtype=torch.float64)
            log_p = torch.log_softmax(teacher / 2.0, -1)  # T = 2, renormalized on the top-k
            log_q = torch.log_softmax(z[ids] / 2.0, -1)
            if loss == "fkl":
                kd = (log_p.exp() * (log_p - log_q)).sum().item() * 4.0
            else:
                kd = (log_q.exp() * (log_q - log_p)).sum().item() * 4.0
            ce_sum += ce
            kd_sum += kd
            total += ce if loss == "ce" else alpha * ce + (1 - alpha) * kd
    assert sums[1].item() == pytest.approx(ce_sum, rel=1e-4)
    assert sums[0].item() == pytest.approx(total, rel=1e-4)
    if loss != "ce":
        assert sums[2].item() == pytest.approx(kd_sum, rel=1e-4)


def test_init_student_keeps_the_chosen_encoder_and_decoder_layers(tmp_path):
    from kd_shards.student_train.cli import init_student
    from scripts.tiny_models import build_tiny_seq2seq

    teacher = build_tiny_seq2seq(tmp_path / "teacher", kind="t5", layers=4)
    out = tmp_path / "student"
    arguments = ["--teacher", str(teacher), "--layers", "1", "--decoder-layers", "3"]
    init_student.main([*arguments, "--out", str(out)], standalone_mode=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_layers"] == 1 and config["num_decoder_layers"] == 3
    student, original = (
        load_file(out / "model.safetensors"),
        load_file(teacher / "model.safetensors"),
    )
    # 1 of 4 encoder layers: the last (evenly); 3 of 4 decoder layers: 0, 2 and 3.
    kept = {"encoder": [3], "decoder": [0, 2, 3]}
    for side, layers in kept.items():
        for new, old in enumerate(layers):
            prefix = f"{side}.block.{new}."
            names = [name for name in student if name.startswith(prefix)]
            assert names
            for name in names:
                source = name.replace(prefix, f"{side}.block.{old}.")
                if "relative_attention_bias" in name:  # T5 keeps it in its first layer only
                    source = name.replace(prefix, f"{side}.block.0.")
                assert torch.equal(student[name], original[source]), name
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(student[bias], original[bias])
    assert torch.equal(student["shared.weight"], original["shared.weight"])


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


def test_a_stopped_seq2seq_training_resumes_to_the_uninterrupted_one(dumps, t5_student, tmp_path):
    from kd_shards.student_train.train import run_training

    def config(out: Path, **overrides):
        return train_config(
            dumps["t5", "generate"], t5_student, out, max_steps=3, micro_batch=2, loss="fkl",
            alpha=0.5, eval_shards=str(dumps["t5", "score"]), eval_every=0, **overrides,
        )  # fmt: skip

    whole = run_training(config(tmp_path / "whole"))
    assert whole["eval"]["eval_tokens"] > 0 and whole["eval"]["eval_kl"] > 0
    stopped = tmp_path / "stopped"
    assert run_training(config(stopped, stop_at_step=1))["stopped_early"]
    run_training(config(stopped, resume=True))
    assert losses(stopped) == losses(tmp_path / "whole") and len(losses(stopped)) == 3
    got = load_file(stopped / "final" / "model.safetensors")
    want = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_lora_on_a_seq2seq_student_trains_only_the_adapter(dumps, t5_student, tmp_path):
    from kd_shards.student_train.train import run_training

    summary = run_training(
        train_config(
            dumps["t5", "score"],
            t5_student,
            tmp_path / "lora",
            max_steps=2,
            micro_batch=2,
            lora_r=4,
            merge_lora=True,
        )  # fmt: skip
    )
    described = json.loads((tmp_path / "lora" / "train_config.json").read_text())
    student = described["student"]
    assert student["lora"] and student["trainable_parameters"] < student["parameters"] / 4
    assert Path(summary["final"], "model.safetensors").is_file()


def test_two_stage_distillation_continues_from_the_first_students_final(
    dumps, t5_student, tmp_path
):
    """Stage 1 on the T5 teacher's outputs (sequence-level KD), stage 2 from its final/ on the
    BART teacher's scored references (logit KD), through the CLI."""
    from kd_shards.student_train.train import run_training

    first = run_training(
        train_config(dumps["t5", "generate"], t5_student, tmp_path / "stage1", max_steps=2,
                     micro_batch=2, loss="ce")
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "kd_shards.student_train.cli", "--shards",
         str(dumps["bart", "score"]), "--student", first["final"], "--out",
         str(tmp_path / "stage2"), "--max-steps", "2", "--micro-batch", "2", "--loss", "fkl",
         "--lr", "3e-3", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    described = json.loads((tmp_path / "stage2" / "train_config.json").read_text())
    assert described["student"]["reference"] == first["final"]
    assert described["shards"]["directory"] == str(dumps["bart", "score"])
    before = load_file(Path(first["final"]) / "model.safetensors")
    after = load_file(tmp_path / "stage2" / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_kd_eval_greedy_answers_equal_transformers_generate(teachers, dumps, gsm8k_file, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import load_task_inputs, run_evaluation
    from kd_shards.shared.tasks import TASKS

    config = EvalConfig(
        data="gsm8k", data_path=str(gsm8k_file), models=(f"t5={teachers['t5']}",), limit=3,
        max_new_tokens=NEW_TOKENS, dtype="float32", progress=False, chat_template=False,
        out=str(tmp_path / "eval"), teacher_shards=str(dumps["t5", "score"]),
    )  # fmt: skip
    report = run_evaluation(config)
    result = report["models"]["t5"]
    assert result["metrics"]["samples"] == 3 and result["cost"]["generated_tokens"] > 0
    # The teacher against its own top-8: agreement everywhere, KL only the storage's rounding
    # (as for a causal teacher in test_evaluation).
    assert result["fidelity"]["top1_agreement"] == 1.0 and result["fidelity"]["kl"] < 0.01
    assert (
        result["fidelity"]["tokens"]
        == json.loads((dumps["t5", "score"] / "manifest.json").read_text())["totals"][
            "target_tokens"
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(teachers["t5"])
    model = AutoModelForSeq2SeqLM.from_pretrained(str(teachers["t5"])).eval()
    examples = load_task_inputs(config, TASKS["gsm8k"]).examples
    for example, prediction in zip(examples, result["predictions"], strict=True):
        prompt = tokenizer(example.prompt)["input_ids"]
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
        )[0, 1:]  # after the decoder start
        answer = [token for token in generated.tolist() if token != tokenizer.eos_token_id]
        assert prediction["prediction"] == tokenizer.decode(answer, skip_special_tokens=True)


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(teachers):
    from kd_shards.shared.engine import EngineSettings
    from kd_shards.shared.seq2seq_engine import Seq2SeqEngine

    settings = EngineSettings(
        model=str(teachers["bart"]), dtype="float32", max_model_len=512, max_logprobs=4,
        sampled_logprobs=False, tensor_parallel_size=1, gpu_memory_utilization=None, seed=0,
        enforce_eager=True, trust_remote_code=False,
    )  # fmt: skip
    prompts = [(index, list(range(5, 9 + 3 * index)), 100 + index) for index in range(3)]

    def sampled(batch_rows: int, top_p: float) -> dict:
        engine = Seq2SeqEngine(settings, batch_rows=batch_rows)
        stream = engine.generate(
            prompts, num_samples=2, temperature=1.0, top_p=top_p, max_new_tokens=6, top_k=4,
            max_in_flight=8,
        )  # fmt: skip
        return {key: [c.token_ids.tolist() for c in completions] for key, completions in stream}

    alone, together = sampled(2, 1.0), sampled(6, 1.0)
    assert alone == together
    assert any(first != second for first, second in alone.values())  # two samples, not one
    # A tiny nucleus keeps only the most likely token: top-p 1e-6 is greedy decoding.
    nucleus = sampled(6, 1e-6)
    engine = Seq2SeqEngine(settings)
    greedy = engine.generate(
        prompts, num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=6, top_k=4,
        max_in_flight=8,
    )  # fmt: skip
    for key, completions in greedy:
        assert nucleus[key] == [completions[0].token_ids.tolist()] * 2
