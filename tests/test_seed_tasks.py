"""The seed tasks (CoLA, MRPC, QQP, RTE, Financial PhraseBank, WinoGrande, Social IQa,
AQuA-RAT, TriviaQA): each metric against an independent computation written here, each loader
on the real files in ../shared/data (skipped without them) and on a local file, and one
kd-eval run per new kind on tiny random models (wiring, not accuracy)."""

from __future__ import annotations

import json
import math
import re
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kd_shards.shared.tasks import TASKS, examples_from_records, load_records
from kd_shards.shared.tasks.interface import Example
from tests.conftest import SHARED_DATA

needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data (the seed datasets) is not here"
)


def random_labels(seed: int, size: int = 200):
    generator = np.random.default_rng(seed)
    return generator.integers(0, 2, size), generator.integers(0, 2, size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matthews_correlation_is_the_pearson_correlation_of_the_two_labelings(seed):
    from kd_shards.shared.scoring import matthews_correlation

    predicted, gold = random_labels(seed)
    # For two binary variables, MCC equals their Pearson correlation (the phi coefficient).
    assert matthews_correlation(predicted, gold) == pytest.approx(
        np.corrcoef(predicted, gold)[0, 1]
    )
    assert matthews_correlation(np.ones(5, int), np.array([0, 1, 1, 0, 1])) == 0.0


def test_cola_reports_matthews_correlation_and_mrpc_the_f1_of_equivalent():
    predicted, gold = random_labels(5, 40)
    log_probabilities = np.log(np.where(np.eye(2)[predicted] == 1, 0.9, 0.1))
    for name, label_names in (("cola", ("unacceptable", "acceptable")), ("mrpc", None)):
        task = TASKS[name]
        examples = [Example(i, "t", (task.labels[g],), pair="p") for i, g in enumerate(gold)]
        metrics, records = task.score(log_probabilities, examples)
        assert metrics["accuracy"] == pytest.approx((predicted == gold).mean())
        if label_names:
            assert task.labels == label_names
            assert metrics["matthews"] == pytest.approx(np.corrcoef(predicted, gold)[0, 1])
        else:
            tp = int(((predicted == 1) & (gold == 1)).sum())
            precision, recall = tp / (predicted == 1).sum(), tp / (gold == 1).sum()
            assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
            assert records[0]["text_pair"] == "p"


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's evaluation script, written out again."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def test_triviaqa_exact_match_f1_precision_and_recall_take_the_best_alias():
    task = TASKS["triviaqa"]
    examples = [
        task.to_example({"question": "q1", "golden_answers": ["The Beatles", "Beatles, The"]}, 0),
        task.to_example({"question": "q2", "golden_answers": ["Mark Twain", "Samuel Clemens"]}, 1),
        task.to_example({"question": "q3", "answer": {"aliases": ["Paris"]}}, 2),
    ]
    predictions = ["beatles!\nmore text", "Samuel Langhorne Clemens wrote it", "London"]
    metrics, records = task.score(predictions, examples)
    # q1: "beatles" = normalized "The Beatles": EM 1, F1/P/R 1.
    # q2: against "samuel clemens": 2 shared tokens of 5 predicted, 2 of 2 gold: P 0.4, R 1,
    #     F1 2·0.4/1.4; against "mark twain": nothing shared.
    # q3: nothing shared.
    f1 = 2 * 0.4 * 1.0 / 1.4
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx((1 + f1) / 3)
    assert metrics["precision"] == pytest.approx((1 + 0.4) / 3)
    assert metrics["recall"] == pytest.approx((1 + 1) / 3)
    assert squad_normalize("The  Beatles!") == "beatles"
    assert [r["extracted_answer"] for r in records] == [
        "beatles!",
        "Samuel Langhorne Clemens wrote it",
        "London",
    ]
    assert records[1]["reference"] == ["Mark Twain", "Samuel Clemens"]


def test_multiple_choice_accuracy_for_each_scoring():
    task = TASKS["social-iqa"]
    rows = [
        {"context": "c", "question": "q?", "answerA": "a", "answerB": "b", "answerC": "c",
         "label": str(label)}
        for label in (1, 2, 3, 1)
    ]  # fmt: skip
    examples = [task.to_example(row, index) for index, row in enumerate(rows)]
    scores = {
        "mean": [np.array([0.0, -1, -2]), np.array([0.0, -1, -2]), np.array([-3.0, -2, -1]),
                 np.array([-1.0, -1, -2])],
        "sum": [np.array([-5.0, -1, -2])] * 4,
    }  # fmt: skip
    metrics, records = task.score(scores, examples)
    # mean picks A, A, C, A (a tie goes to the first) against gold A, B, C, A: 3 of 4.
    assert metrics["accuracy"] == metrics["accuracy_mean"] == 0.75
    assert metrics["accuracy_sum"] == 0.25 and metrics["scoring"] == "mean"
    assert [r["prediction"] for r in records] == ["A", "A", "C", "A"]
    assert records[1]["reference"] == "B" and records[1]["options"] == ["a", "b", "c"]


def test_aqua_rat_letter_extraction():
    from kd_shards.shared.tasks.aqua_rat import answer_letter

    assert answer_letter("so 5*6 = 30. The answer is (C).") == "C"
    assert answer_letter("Answer: B") == "B"
    assert answer_letter("I think D, no wait, E") == "E"
    assert answer_letter("no idea") is None


def load(name: str, folder: str, split: str):
    task = TASKS[name]
    return examples_from_records(task, load_records(task, name, SHARED_DATA / folder, split), None)


@needs_data
@pytest.mark.parametrize(
    ("name", "folder", "split", "count", "first"),
    [
        ("mrpc", "mrpc", "dev", 408, "equivalent"),
        ("mrpc", "mrpc", "train", 3668, None),
        ("rte", "rte", "validation", 277, "not_entailment"),
        ("cola", "cola", "dev", 527, "acceptable"),
        ("phrasebank", "financial_phrasebank", "test", 4846, "neutral"),
        ("phrasebank-allagree", "financial_phrasebank", "test", 2264, "neutral"),
        ("winogrande", "winogrande", "dev", 1267, "1"),
        ("winogrande", "winogrande", "train_s", 640, None),
        ("social-iqa", "social_iqa", "dev", 1954, "2"),
        ("aqua-rat", "aqua_rat", "dev", 254, "0"),
        ("aqua-rat-letter", "aqua_rat", "dev", 254, "A"),
        ("triviaqa", "triviaqa", "dev", 500, "Mark Twain"),
    ],
)
def test_the_seed_datasets_load_from_shared_data(name, folder, split, count, first):
    examples = load(name, folder, split)
    assert len(examples) == count and all(example.prompt for example in examples)
    if first is not None:
        assert examples[0].references[0] == first
    task = TASKS[name]
    if task.is_pair:
        assert all(example.pair for example in examples)
    if task.kind == "choice":
        gold = {int(example.references[0]) for example in examples}
        assert gold <= set(range(len(examples[0].choices))) and len(gold) > 1


@needs_data
def test_phrasebank_reads_as_classify_bench_reads_it():
    """scripts/classify_transfer.read_phrasebank (what make classify-bench cuts) and the task
    give the same sentences and labels, in the same order."""
    from scripts.classify_transfer import read_phrasebank

    for name, file_name in (
        ("phrasebank", "Sentences_50Agree.txt"),
        ("phrasebank-allagree", "Sentences_AllAgree.txt"),
    ):
        bench = read_phrasebank(SHARED_DATA / "financial_phrasebank" / file_name)
        task = [
            (example.prompt, example.references[0])
            for example in load(name, "financial_phrasebank", "test")
        ]
        assert task == bench


def test_each_task_loads_a_local_file(tmp_path):
    files = {
        "mrpc": ("dev.jsonl", {"sentence1": "a", "sentence2": "b", "label": 1}, "equivalent"),
        "qqp": ("dev.jsonl", {"question1": "a?", "question2": "b?", "label": 0}, "not_duplicate"),
        "rte": ("dev.jsonl", {"sentence1": "a", "sentence2": "b", "label": 0}, "entailment"),
        "cola": ("dev.jsonl", {"sentence": "a", "label": 0}, "unacceptable"),
        "phrasebank": ("dev.jsonl", {"text": "up", "label": "positive"}, "positive"),
        "winogrande": (
            "dev.jsonl",
            {"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"},
            "1",
        ),
        "aqua-rat": (
            "dev.jsonl",
            {"question": "q", "options": ["A)1", "B)2"], "correct": "B"},
            "1",
        ),
        "triviaqa": ("dev.jsonl", {"question": "q", "golden_answers": ["x"]}, "x"),
    }
    for name, (file_name, row, reference) in files.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / file_name).write_text(json.dumps(row) + "\n")
        task = TASKS[name]
        (example,) = examples_from_records(task, load_records(task, name, folder, "dev"), None)
        assert example.references[0] == reference, name
    # QQP's GLUE TSV names its label is_duplicate; Social IQa's labels sit in a .lst file.
    (tmp_path / "train.tsv").write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                        "0\t1\t2\tHow?\tWhy?\t1\n")  # fmt: skip
    (example,) = examples_from_records(
        TASKS["qqp"], load_records(TASKS["qqp"], "qqp", tmp_path / "train.tsv", "train"), None
    )
    assert (example.prompt, example.pair, example.references) == ("How?", "Why?", ("duplicate",))
    siqa = tmp_path / "siqa"
    siqa.mkdir()
    row = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}
    (siqa / "dev.jsonl").write_text(json.dumps(row) + "\n")
    (siqa / "dev-labels.lst").write_text("3\n")
    (example,) = examples_from_records(
        TASKS["social-iqa"], load_records(TASKS["social-iqa"], "x", siqa, "dev"), None
    )
    assert example.references == ("2",) and example.choices[2] == ("c q", " c")


def test_kd_eval_multiple_choice_with_a_causal_lm_and_an_encoder(tiny_model, tmp_path):
    """A tiny causal LM's option scores equal a plain forward of each (context + option) one
    at a time; a tiny encoder with a multiple-choice head is run as choices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.kd_eval.report import markdown_table
    from scripts.tiny_models import build_tiny_bert

    rows = [
        {"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
         "option2": "the table", "answer": "2"},
        {"sentence": "Ann thanked Mia because _ had helped her.", "option1": "Ann",
         "option2": "Mia", "answer": "2"},
        {"sentence": "The box did not fit in the car since _ was too big.", "option1": "the box",
         "option2": "the car", "answer": "1"},
    ]  # fmt: skip
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoder = build_tiny_bert(tmp_path / "encoder", labels=None)
    report = run_evaluation(
        EvalConfig(
            data="winogrande", data_path=str(data), models=(f"lm={tiny_model}", f"enc={encoder}"),
            batch_size=2, out=str(tmp_path / "eval"), progress=False,
        )
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [TASKS["winogrande"].to_example(row, index) for index, row in enumerate(rows)]
    expected_sum, expected_mean = [], []
    with torch.no_grad():
        for example in examples:
            sums, means = [], []
            for context, continuation in example.choices:
                prefix = tokenizer(context)["input_ids"]
                option = tokenizer(continuation, add_special_tokens=False)["input_ids"]
                logits = model(torch.tensor([prefix + option])).logits[0]
                logprobs = torch.log_softmax(logits, -1)
                total = sum(
                    float(logprobs[len(prefix) + i - 1, token]) for i, token in enumerate(option)
                )
                sums.append(total)
                means.append(total / len(option))
            expected_sum.append(sums)
            expected_mean.append(means)
    lines = (tmp_path / "eval" / "predictions-lm.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    np.testing.assert_allclose(
        [p["scores"]["sum"] for p in predictions], expected_sum, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        [p["scores"]["mean"] for p in predictions], expected_mean, rtol=1e-4, atol=1e-4
    )
    gold = np.asarray([1, 1, 0])
    lm = report["models"]["lm"]["metrics"]
    assert lm["accuracy"] == pytest.approx((np.argmax(expected_mean, 1) == gold).mean())
    assert lm["accuracy_sum"] == pytest.approx((np.argmax(expected_sum, 1) == gold).mean())
    # The encoder (a bare one, given a new multiple-choice head): one logit per option.
    enc = report["models"]["enc"]
    assert enc["backend"]["scorer"] == "encoder" and 0 <= enc["metrics"]["accuracy"] <= 1
    lines = (tmp_path / "eval" / "predictions-enc.jsonl").read_text().splitlines()
    assert [len(json.loads(line)["scores"]["choice"]) for line in lines] == [2, 2, 2]
    table = markdown_table(report).splitlines()
    assert table[0] == "| model | params | accuracy | ms/sample | samples/s |"


def test_kd_eval_triviaqa_table_has_f1_precision_recall_and_questions_per_second(
    tiny_model, tmp_path
):
    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.kd_eval.report import markdown_table
    from kd_shards.shared.tokenizer import load_tokenizer

    rows = [
        {"question": "Capital of France?", "golden_answers": ["Paris", "Paris, France"]},
        {"question": "Who wrote Hamlet?", "golden_answers": ["William Shakespeare"]},
    ]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tiny_model)
    answers = {0: " paris.\nAnd more", 1: " Shakespeare"}

    class ScriptedEngine:
        """Answers as scripted (kd-eval's engine door, without vLLM)."""

        def generate(self, requests, **settings):
            for index, _, _ in requests:
                ids = tokenizer.encode(answers[index], add_special_tokens=False)
                yield index, [SimpleNamespace(token_ids=np.asarray(ids))]

    report = run_evaluation(
        EvalConfig(
            data="triviaqa", models=(f"m={tiny_model}",), data_path=str(data),
            max_model_len=512, out=str(tmp_path / "eval"), progress=False,
        ),
        engines={"m": ScriptedEngine()},
    )  # fmt: skip
    metrics = report["models"]["m"]["metrics"]
    # "paris." = "Paris" after normalization; "shakespeare": P 1, R 1/2, F1 2/3.
    assert metrics["exact_match"] == 0.5 and metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(0.75) and metrics["f1"] == pytest.approx(5 / 6)
    assert report["models"]["m"]["cost"]["samples_per_second"] > 0
    header = markdown_table(report).splitlines()[0]
    assert header == (
        "| model | params | EM | F1 | precision | recall | ms/sample | tok/s | samples/s |"
    )
    lines = (tmp_path / "eval" / "predictions-m.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["extracted_answer"] == "paris."
    assert not math.isnan(float(markdown_table(report).splitlines()[2].split("|")[-2]))
