"""make reasoning's own data handling (the runs themselves are real commands): the question
split, the references as prose, the kept completions read back from a filtered dump's shards,
the pass rate from its manifest, and the results table."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scripts.reasoning import (
    ReasoningConfig,
    filter_outcome,
    kept_completions,
    markdown,
    split_questions,
    without_annotations,
)


def test_calculator_annotations_are_removed_and_nothing_else():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"
    )
    assert without_annotations(solution) == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"
    )
    assert without_annotations("3 < 4 and 5 > 2\n#### 1") == "3 < 4 and 5 > 2\n#### 1"


def test_training_and_held_out_questions_are_disjoint_ends_of_the_file(tmp_path):
    source = tmp_path / "train.jsonl"
    rows = [{"question": f"q{index}", "answer": f"<<1+{index}>>a{index}\n#### {index}"}
            for index in range(10)]  # fmt: skip
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = ReasoningConfig(train_questions=3, test_questions=4)
    paths = split_questions(source, tmp_path / "data", config)

    def read(name):
        return [json.loads(line) for line in paths[name].read_text().splitlines()]

    assert [row["question"] for row in read("train")] == ["q0", "q1", "q2"]
    assert [row["question"] for row in read("test")] == ["q6", "q7", "q8", "q9"]
    assert read("references")[1] == {"question": "q1", "answer": "a1\n#### 1"}
    assert read("train")[1]["answer"] == "<<1+1>>a1\n#### 1"
    with pytest.raises(Exception, match="exceeds the 10 questions"):
        split_questions(source, tmp_path / "data", ReasoningConfig(train_questions=8))


def test_kept_completions_become_gsm8k_records_and_the_pass_rate_comes_from_the_manifest(
    tmp_path,
):
    questions = tmp_path / "train.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(3))
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    # two shards, out of order on purpose: question 2's sample 1, then question 0's sample 3
    pieces = [
        {"source_index": [2, 0], "completion_index": [1, 3], "target_text": ["c2-1", "c0-3"]},
        {"source_index": [0], "completion_index": [0], "target_text": ["c0-0"]},
    ]
    for number, piece in enumerate(pieces):
        pq.write_table(pa.table(piece), shards / f"shard-{number}.parquet")
    manifest = {
        "shards": [{"name": f"shard-{number}.parquet"} for number in range(2)],
        "filter": {"prompts_done": 3, "generated": 12, "kept": 3, "none_kept": [1],
                   "best_kept": []},
    }  # fmt: skip
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "cot.jsonl"
    assert kept_completions(shards, questions, out) == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"question": "q0", "answer": "c0-0"},
        {"question": "q0", "answer": "c0-3"},
        {"question": "q2", "answer": "c2-1"},
    ]
    outcome = filter_outcome(shards)
    assert outcome["pass_rate"] == pytest.approx(3 / 12)
    assert outcome["questions_none_kept"] == 1 and outcome["questions_with_a_kept_sample"] == 2


def test_results_md_reports_the_filter_each_model_and_the_paired_difference():
    results = {
        "teacher_filter": {"questions": 4, "generated": 16, "kept": 6, "pass_rate": 0.375,
                           "questions_none_kept": 1},
        "models": {
            "student-kd": {"accuracy": 0.05, "correct": 5, "questions": 100,
                           "parameters": 134_515_008, "ms_per_sample": 812.4},
            "student-sft": {"accuracy": 0.03, "correct": 3, "questions": 100,
                            "parameters": 134_515_008, "ms_per_sample": None},
        },
        "comparisons": {
            "student-kd - student-sft": {"difference": 0.02, "low": -0.01, "high": 0.05,
                                         "mcnemar": {"b": 4, "c": 2, "p_value": 0.6875}},
        },
    }  # fmt: skip
    text = markdown(results)
    assert "6 of 16 samples kept (pass rate 37.5%) over 4 questions; 1 questions" in text
    assert "| student-kd | 134.5M | 0.050 | 5/100 | 812 |" in text
    assert "| student-sft | 134.5M | 0.030 | 3/100 |  |" in text
    assert "| student-kd - student-sft | +0.020 | -0.010 to +0.050 | 4 / 2, 0.688 |" in text
