"""kd-eval: metrics against hand-computed values, real runs on tiny models over ../shared/data,
identical prompts and decoding for every model, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_shards.shared.errors import UserError
from kd_shards.shared.scoring import (
    bleu_score,
    language_model_metrics,
    language_model_sums,
    rouge_scores,
)
from kd_shards.shared.tasks.gsm8k import final_number, gsm8k_correct, normalize_number
from tests.conftest import SHARED_DATA

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("He pays 3*4=12.\n#### 12", "12"),
        ("#### 1,000", "1000"),
        ("#### $1,234.50", "1234.5"),
        ("#### -7", "-7"),
        ("#### 7.0", "7"),
        ("#### 5\nThen I kept talking about 9 more things", "5"),  # the marked answer wins
        ("so she has $15.", "15"),  # no marker: the last number, '$' and '.' stripped
        ("First 3 apples, then 4, total 1,024 apples", "1024"),
        ("The answer is 0.50", "0.5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_final_number_extraction(answer, expected):
    assert final_number(answer) == expected


def test_gsm8k_correctness_and_number_normalization():
    assert gsm8k_correct("I think it is 1,000 dollars", "so 10*100=1000\n#### 1000")
    assert gsm8k_correct("#### $18.00", "#### 18")
    assert not gsm8k_correct("#### 17", "#### 18")
    assert not gsm8k_correct("I do not know", "#### 18")
    assert normalize_number("abc") is None and normalize_number("-0") == "0"


def test_rouge_takes_the_best_reference_per_sample():
    prediction = "the cat sat on the mat"
    single = rouge_scores([prediction], [["a dog ran in the park"]])
    best = rouge_scores([prediction], [["a dog ran in the park", "the cat sat on the mat"]])
    assert best == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert single["rouge1"] == pytest.approx(2 * (1 / 6) * (1 / 6) / (1 / 6 + 1 / 6))  # "the"
    # Stemming: "cats sitting" matches "cat sits" on both unigrams.
    assert rouge_scores(["cats sitting"], [["cat sits"]])["rouge1"] == pytest.approx(1.0)
    # The mean over samples.
    both = rouge_scores([prediction, "x y"], [[prediction], ["z w"]])
    assert both["rouge1"] == pytest.approx(0.5)


def test_bleu_uses_every_reference():
    predictions = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    references = [
        ["the cat sat on the mat today"],
        ["nothing alike at all here now", predictions[1]],
    ]
    assert bleu_score(predictions, references) == pytest.approx(100.0)
    assert bleu_score(predictions, [["the cat sat on the mat today"], ["nothing alike"]]) < 60


def test_perplexity_and_accuracy_from_known_logprobs():
    # Three positions with probabilities 1/2, 1/4 and 1/8 of the actual token.
    target_ids = np.array([3, 5, 7])
    logprobs = np.log([0.5, 0.25, 0.125])
    topk = np.array([[3, 1, 2, 4, 6], [1, 5, 2, 3, 4], [1, 2, 3, 4, 6]])
    metrics = language_model_metrics(language_model_sums(target_ids, logprobs, topk))
    assert metrics["perplexity"] == pytest.approx(math.exp(-np.log([0.5, 0.25, 0.125]).mean()))
    assert metrics["perplexity"] == pytest.approx(4.0)
    assert metrics["acc@1"] == pytest.approx(1 / 3)
    assert metrics["acc@5"] == pytest.approx(2 / 3)


# --- real runs on tiny models ------------------------------------------------------------------

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data (GSM8K, SciTLDR, WikiText-2) is absent"
)


def eval_config(**values):
    from kd_shards.kd_eval.config import EvalConfig

    defaults = dict(
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        progress=False,
        max_new_tokens=16,
    )
    return EvalConfig(**{**defaults, **values})


@pytest.mark.engine
def test_text_perplexity_is_a_transformers_forwards_cross_entropy(tiny_model, engine, tmp_path):
    """The engine's perplexity on text windows against the dense reference: exp of the mean
    next-token cross-entropy of a plain transformers forward over the same windows (the session's
    engine: no engine start of its own)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd_shards.kd_eval.evaluation import run_evaluation

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    report = run_evaluation(
        eval_config(
            data="text", models=(f"teacher={tiny_model}",), data_path=str(text), chunk_tokens=64
        ),
        engines={"teacher": engine},
    )
    metrics = report["models"]["teacher"]["metrics"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for chunk in _chunks(tiny_model, text, 64):
        ids = torch.tensor([list(chunk)], dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += len(chunk) - 1
    assert metrics["tokens"] == tokens
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)


def _chunks(directory: Path, text: Path, chunk_tokens: int):
    from kd_shards.shared.tokenizer import chunk_text, load_tokenizer

    return chunk_text(
        [text.read_text()], load_tokenizer(directory), chunk_tokens=chunk_tokens, limit=None
    )


@requires_shared_data
@pytest.mark.engine
def test_gsm8k_two_models_share_prompts_and_decoding(
    tiny_model, student_model, text_shards, engine, tmp_path
):
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.kd_eval.report import markdown_table

    config = eval_config(
        data="gsm8k",
        models=(f"teacher={tiny_model}", f"student={student_model}"),
        data_path=str(SHARED_DATA / "gsm8k"),
        split="train",
        limit=6,
        teacher_shards=str(text_shards),
        fidelity_limit=8,
        out=str(tmp_path / "out"),
    )
    report = run_evaluation(config, engines={"teacher": engine})
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    teacher, student = saved["models"]["teacher"], saved["models"]["student"]
    assert teacher["prompt_ids_sha256"] == student["prompt_ids_sha256"]
    assert saved["settings"]["decoding"] == {"temperature": 0.0, "max_new_tokens": 16}
    assert teacher["metrics"]["samples"] == student["metrics"]["samples"] == 6
    assert teacher["fidelity"]["kl"] < 0.01 and teacher["fidelity"]["top1_agreement"] > 0.99
    assert student["fidelity"]["kl"] > 0.1
    assert teacher["parameters"] == student["parameters"] > 0
    assert teacher["cost"]["generated_tokens"] > 0 and teacher["cost"]["ms_per_sample"] > 0
    predictions = (tmp_path / "out" / "predictions-teacher.jsonl").read_text().splitlines()
    assert len(predictions) == 6
    rows = _jsonl(SHARED_DATA / "gsm8k" / "train.jsonl", 6)
    samples = [json.loads(line) for line in predictions]
    recomputed = [
        gsm8k_correct(sample["prediction"], row["answer"])
        for sample, row in zip(samples, rows, strict=True)
    ]
    assert teacher["metrics"]["correct"] == sum(recomputed)
    # Each line lets a user audit its score: id, reference, extracted answer, correctness.
    assert [sample["sample_id"] for sample in samples] == [str(i) for i in range(6)]
    assert [sample["correct"] for sample in samples] == recomputed
    assert [sample["expected_answer"] for sample in samples] == [
        final_number(row["answer"]) for row in rows
    ]
    assert [sample["extracted_answer"] for sample in samples] == [
        final_number(sample["prediction"]) for sample in samples
    ]
    table = markdown_table(report)
    assert table.splitlines()[0].startswith("| model | params | accuracy | KL to teacher")
    assert len(table.splitlines()) == 4
    assert (tmp_path / "out" / "chart.png").read_bytes()[:4] == b"\x89PNG"


def _jsonl(path: Path, limit: int) -> list[dict]:
    with open(path) as handle:
        return [json.loads(next(handle)) for _ in range(limit)]


@requires_shared_data
@pytest.mark.engine
def test_summ_on_scitldr_and_plain_document_summary_data(tiny_model, engine, tmp_path):
    from kd_shards.kd_eval.evaluation import run_evaluation

    # SciTLDR dev rows, shortened to each abstract's first sentence so that they fit the tiny
    # model's 512-token context; the references stay all of the dev set's 2-3 TLDRs.
    rows = [
        row for row in _jsonl(SHARED_DATA / "scitldr" / "dev.jsonl", 12) if len(row["target"]) >= 2
    ]
    rows = rows[:5]
    assert len(rows) == 5
    short = tmp_path / "dev.jsonl"
    short.write_text(
        "".join(json.dumps({**row, "source": row["source"][:1]}) + "\n" for row in rows)
    )
    report = run_evaluation(
        eval_config(data="summ", models=(f"teacher={tiny_model}",), data_path=str(short)),
        engines={"teacher": engine},
    )
    metrics = report["models"]["teacher"]["metrics"]
    assert set(metrics) >= {"rouge1", "rouge2", "rougeL", "bleu"} and metrics["samples"] == 5
    predictions = report["models"]["teacher"]["predictions"]
    texts = [sample["prediction"] for sample in predictions]
    references = [tuple(reference.strip() for reference in row["target"]) for row in rows]
    assert metrics["rougeL"] == pytest.approx(rouge_scores(texts, references)["rougeL"])
    # Each line lets a user audit its sample: id, references, the summary and its own ROUGE.
    assert [sample["sample_id"] for sample in predictions] == ["0", "1", "2", "3", "4"]
    assert [tuple(sample["references"]) for sample in predictions] == references
    assert predictions[0]["rougeL"] == pytest.approx(
        rouge_scores(texts[:1], references[:1])["rougeL"]
    )

    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"document": "The sun rose over the hills.", "summary": "Sunrise."}) + "\n"
    )
    report = run_evaluation(
        eval_config(data="summ", models=(f"teacher={tiny_model}",), data_path=str(plain)),
        engines={"teacher": engine},
    )
    assert report["models"]["teacher"]["metrics"]["samples"] == 1


@requires_shared_data
@pytest.mark.engine
def test_lm_on_wikitext(tiny_model, engine, tmp_path):
    from kd_shards.kd_eval.evaluation import run_evaluation

    report = run_evaluation(
        eval_config(
            data="text",
            models=(f"teacher={tiny_model}",),
            data_path=str(SHARED_DATA / "wikitext2_raw"),
            limit=3,
            chunk_tokens=128,
            out=str(tmp_path / "out"),
        ),
        engines={"teacher": engine},
    )
    metrics = report["models"]["teacher"]["metrics"]
    assert metrics["tokens"] == 3 * 127
    assert 1.0 < metrics["perplexity"] < 1e6
    assert 0.0 <= metrics["acc@1"] <= metrics["acc@5"] <= 1.0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["task"] == "text"
    windows = [
        json.loads(line)
        for line in (tmp_path / "out" / "predictions-teacher.jsonl").read_text().splitlines()
    ]
    assert [window["tokens"] for window in windows] == [127, 127, 127]
    mean_nll = sum(window["nll"] * window["tokens"] for window in windows) / (3 * 127)
    assert math.exp(mean_nll) == pytest.approx(metrics["perplexity"], rel=1e-6)


def kd_eval(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_shards.kd_eval.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENVIRONMENT,
    )


def test_bad_input_is_one_line(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_reference = tmp_path / "no_reference.jsonl"
    no_reference.write_text(json.dumps({"document": "A text without a summary."}) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    cases = [
        (("--data", "translation", "--model", f"a={tiny_model}"), "unknown --data 'translation'"),
        (
            ("--data", "lm", "--model", f"a={tiny_model}"),
            "--data lm is not a task name: use --data text",
        ),
        (
            ("--task", "lm", "--model", f"a={tiny_model}"),
            "--task lm is not a task name: use --task text",
        ),
        (("--task", "summ", "--data", "gsm8k", "--model", f"a={tiny_model}"), "disagree: pass one"),
        (
            ("--data", "gsm8k", "--model", f"a={tmp_path / 'missing'}", "--data-path", str(good)),
            "no such directory",
        ),
        (("--data", "gsm8k", "--model", f"a={tiny_model}", "--data-path", str(empty)), "empty"),
        (
            ("--data", "summ", "--model", f"a={tiny_model}", "--data-path", str(no_reference)),
            "no reference",
        ),
        (
            (
                "--data",
                "sst2",
                "--data-path",
                str(good),
                "--model",
                f"a={tiny_model}",
            ),
            "has no column",
        ),
        (("--data", "gsm8k", "--data-path", str(good)), "--models required"),
    ]
    from click.testing import CliRunner

    from kd_shards.kd_eval.cli import main

    # The first case runs as its own process, so nothing else (a library's warning) may reach
    # stderr; the rest run in this one through click's runner, a process start (seconds) each
    # fewer, on the same code path from argument parsing to the exit status.
    first = kd_eval(*cases[0][0])
    lines = [line for line in first.stderr.splitlines() if line.strip()]
    assert first.returncode == 2 and len(lines) == 1, first.stderr[-2000:]
    assert lines[0].startswith("error: ") and cases[0][1] in lines[0], first.stderr[-2000:]
    for arguments, expected in cases[1:]:
        result = CliRunner().invoke(main, list(arguments))
        assert result.exit_code == 2, (arguments, result.stderr[-2000:], result.exception)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert expected in lines[-1], (arguments, result.stderr[-2000:])
        assert len(lines) == 1, (arguments, result.stderr[-2000:])


def test_config_refuses_duplicate_names():
    with pytest.raises(UserError, match="unique"):
        eval_config(data="text", models=("a=x", "a=y"))
