"""Classification KD end to end on tiny real models: classify dumps against a plain transformers
forward (transformers and vLLM's pooling runner, and an LLM verbalizer), the KD loss against a
formula written here, multi-teacher averaging, the hidden-state loss with a width projection,
resume, LoRA, init-student for encoders, kd-eval on a classification task, and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_shards.shared.errors import UserError
from scripts.tiny_models import build_tiny_bert
from tests.conftest import ENGINE_TOP_K, dump_config

TEXTS = [
    ("a charming and often affecting journey", "1"),
    ("unflinchingly bleak and desperate", "0"),
    ("the best film of the year, a true delight", "1"),
    ("a dull, lifeless mess of a movie", "0"),
    ("it is worth seeing for the performances alone", "1"),
    ("nothing in it works and the jokes fall flat", "0"),
    ("an intelligent, moving and funny picture", "1"),
    ("tedious and far too long", "0"),
    ("", "1"),  # replaced below: every text must be non-empty
    ("the plot is thin but the cast is great", "1"),
    ("a disaster from start to finish", "0"),
    ("warm, wise and wonderful", "1"),
]
TEXTS[8] = ("one of the most beautiful films about memory", "1")


@pytest.fixture(scope="session")
def sst2_like(tmp_path_factory) -> Path:
    """A directory with train.tsv/test.tsv in SST-2's format (header, label 0/1)."""
    directory = tmp_path_factory.mktemp("sst2")
    lines = "sentence\tlabel\n" + "".join(f"{text} \t{label}\n" for text, label in TEXTS)
    (directory / "train.tsv").write_text(lines)
    (directory / "test.tsv").write_text(lines)
    return directory


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-teacher"))


@pytest.fixture(scope="session")
def second_classifier(tmp_path_factory, tiny_classifier) -> Path:
    return build_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert-teacher-2"), seed=3, tokenizer_from=tiny_classifier
    )


@pytest.fixture(scope="session")
def tiny_encoder_student(tmp_path_factory, tiny_classifier) -> Path:
    """A narrower bare encoder (width 32 vs the teacher's 64) with the teacher's tokenizer."""
    return build_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert-student"),
        labels=None,
        seed=1,
        layers=1,
        hidden=32,
        tokenizer_from=tiny_classifier,
    )


def classify_dump(model: Path, data: Path, out: Path, engine=None, **overrides):
    """A classify-mode dump; `engine`, when given, is the session's vLLM engine over `model`."""
    from kd_shards.teacher_dump.run import run_dump

    values = dict(
        data="sst2",
        mode="classify",
        classify_backend="transformers",
        split="train",
        rows_per_shard=5,
    )
    values.update(overrides)
    return run_dump(dump_config(model, data, out, **values), engine)


@pytest.fixture(scope="session")
def class_shards(tiny_classifier, sst2_like, tmp_path_factory) -> Path:
    """Teacher A's classify dump with pooled last-layer [CLS] states (transformers)."""
    out = tmp_path_factory.mktemp("class-shards") / "dump"
    classify_dump(tiny_classifier, sst2_like, out, hidden_layer=-1)
    return out


def reference_log_probabilities(model_directory: Path, texts: list[str]):
    """A plain transformers forward, one text at a time: (N, L) log-probabilities and the last
    layer's [CLS] states."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_directory)
    model = AutoModelForSequenceClassification.from_pretrained(model_directory).eval()
    rows, states = [], []
    with torch.no_grad():
        for text in texts:
            output = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
            rows.append(torch.log_softmax(output.logits[0], -1).numpy())
            states.append(output.hidden_states[-1][0, 0].numpy())
    return np.stack(rows), np.stack(states)


def read_dump_rows(directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(Path(directory).glob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda row: row["source_index"])


def test_classify_dump_validates_and_equals_a_transformers_forward(class_shards, tiny_classifier):
    from kd_shards.teacher_dump.inspect import validate

    manifest = json.loads((class_shards / "manifest.json").read_text())
    assert manifest["mode"] == "classify" and manifest["complete"]
    assert manifest["classify"]["labels"] == ["negative", "positive"]
    assert manifest["classify"]["backend"] == "transformers"
    assert manifest["classify"]["hidden"] == {"layer": -1, "pooling": "cls", "width": 64}
    assert manifest["top_k"] == 2 and validate(class_shards) == []
    # Classify dumps keep schema v1's exact all-label layout, file metadata included.
    import pyarrow.parquet as pq

    from kd_shards.schemas.shard import schema_version_of

    assert manifest["schema_version"] == 1 and "storage" not in manifest
    for path in class_shards.glob("part-*.parquet"):
        assert schema_version_of(pq.read_schema(path)) == 1
    rows = read_dump_rows(class_shards)
    expected, states = reference_log_probabilities(tiny_classifier, [text for text, _ in TEXTS])
    for row, (_, label), reference, state in zip(rows, TEXTS, expected, states, strict=True):
        (ids,), (values,) = row["topk_ids"], row["topk_logprobs"]
        assert sorted(ids) == [0, 1] and values[0] >= values[1]  # all labels, rank order
        stored = np.empty(2)
        stored[ids] = values
        np.testing.assert_allclose(stored, reference, atol=5e-4)  # the 2^-10 storage grid
        assert row["target_ids"] == [int(label)] and row["prompt_ids"] == []
        assert row["target_text"] == ["negative", "positive"][int(label)]
        np.testing.assert_allclose(row["teacher_hidden"], state, rtol=2e-3, atol=2e-3)


@pytest.mark.engine
def test_vllm_pooling_runner_dump_equals_a_transformers_forward(
    tiny_classifier, sst2_like, tmp_path
):
    from kd_shards.teacher_dump.run import run_dump

    out = tmp_path / "vllm"
    manifest = run_dump(
        dump_config(
            tiny_classifier,
            sst2_like,
            out,
            data="sst2",
            mode="classify",
            classify_backend="vllm",
            split="train",
            max_model_len=128,
        )
    )
    assert manifest["classify"]["backend"] == "vllm" and manifest["engine"]["name"] == "vllm"
    expected, _ = reference_log_probabilities(tiny_classifier, [text for text, _ in TEXTS])
    for row, reference in zip(read_dump_rows(out), expected, strict=True):
        stored = np.empty(2)
        stored[row["topk_ids"][0]] = row["topk_logprobs"][0]
        np.testing.assert_allclose(stored, reference, atol=1e-3)


@pytest.mark.engine
def test_llm_verbalizer_teacher_equals_label_word_logprobs(tiny_model, sst2_like, engine, tmp_path):
    """A causal LM as the teacher: each label word's logprob as the reply, renormalized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_shards.shared.tokenizer import render_prompt
    from kd_shards.teacher_dump.config import DEFAULT_VERBALIZER_PROMPT

    words = ("bad", "good")
    out = tmp_path / "verbalizer"
    manifest = classify_dump(tiny_model, sst2_like, out, engine, label_words=words, limit=4)
    assert manifest["classify"]["teacher_kind"] == "verbalizer" and manifest["complete"]
    assert 0 < manifest["classify"]["verbalizer"]["mean_label_word_mass"] <= 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for row, (text, _) in zip(read_dump_rows(out), TEXTS, strict=False):
        prompt = DEFAULT_VERBALIZER_PROMPT.format(text=text, labels="bad, good")
        prompt_ids = render_prompt(tokenizer, prompt, use_chat_template=True)
        scores = []
        for word in words:
            word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + word_ids])).logits[0]
            log_probabilities = torch.log_softmax(logits.double(), -1)
            scores.append(
                sum(
                    log_probabilities[len(prompt_ids) - 1 + position, token].item()
                    for position, token in enumerate(word_ids)
                )
            )
        reference = np.asarray(scores) - np.logaddexp.reduce(scores)
        stored = np.empty(2)
        stored[row["topk_ids"][0]] = row["topk_logprobs"][0]
        np.testing.assert_allclose(stored, reference, atol=2e-3)
    assert ENGINE_TOP_K >= 1


def reference_kd_loss(logits, gold, teacher, alpha, temperature):
    """α·CE(gold) + (1−α)·T²·KL(p_T ‖ q_T), summed over examples, written out by hand."""
    total = 0.0
    for row in range(len(logits)):
        z = [float(value) for value in logits[row]]
        t = [float(value) for value in teacher[row]]
        q = [math.exp(value) / sum(math.exp(v) for v in z) for value in z]
        q_t = [math.exp(v / temperature) for v in z]
        q_t = [value / sum(q_t) for value in q_t]
        p_t = [math.exp(v / temperature) for v in t]
        p_t = [value / sum(p_t) for value in p_t]
        kl = sum(p * math.log(p / r) for p, r in zip(p_t, q_t, strict=True))
        ce = -math.log(q[int(gold[row])]) if gold[row] >= 0 else 0.0
        total += alpha * ce + (1 - alpha) * temperature**2 * kl
    return total


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 5.0), (0.0, 1.0), (0.3, 2.0)])
def test_classification_kd_loss_equals_an_independent_reference(alpha, temperature):
    from kd_shards.student_train.losses import LossOptions, classification_loss_sums

    def options(loss: str, alpha: float, temperature: float) -> LossOptions:
        return LossOptions(loss, alpha=alpha, beta=0.0, temperature=temperature, tail="bucket")

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.log_softmax(torch.randn(5, 4, generator=generator) * 3, -1)
    gold = torch.tensor([0, 3, -1, 2, 1])  # one example without a gold label
    sums = classification_loss_sums(
        logits, gold, teacher, options=options("fkl", alpha, temperature)
    )
    expected = reference_kd_loss(logits.detach(), gold, teacher, alpha, temperature)
    assert sums[0].item() == pytest.approx(expected, rel=1e-5)
    sums[0].backward()
    assert logits.grad.abs().sum() > 0  # the teacher's signal reaches the student
    same = classification_loss_sums(
        teacher.clone(), gold, teacher, options=options("fkl", 0.0, temperature)
    )
    assert same[2].item() == pytest.approx(0.0, abs=1e-5)
    reverse = classification_loss_sums(
        logits.detach(), gold, teacher, options=options("rkl", 0.0, 1.0)
    )
    p, q = teacher.exp(), torch.softmax(logits.detach().float(), -1)
    assert reverse[2].item() == pytest.approx((q * (q.log() - p.log())).sum().item(), rel=1e-4)


def test_hidden_state_mse_with_a_width_projection():
    from kd_shards.student_train.losses import hidden_state_mse_sum

    projection = torch.nn.Linear(3, 5)
    student, teacher = torch.randn(4, 3), torch.randn(4, 5)
    value = hidden_state_mse_sum(projection(student), teacher)
    expected = sum(
        ((projection(student[row]) - teacher[row]) ** 2).mean().item() for row in range(4)
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)


def train(out: Path, **values):
    from kd_shards.student_train.config import TrainConfig
    from kd_shards.student_train.train import run_training

    defaults = dict(out=str(out), micro_batch=4, progress=False, lr=1e-3)
    return run_training(TrainConfig(**{**defaults, **values}))


def test_kd_with_hidden_states_through_a_projection_and_resume(
    class_shards, tiny_classifier, tiny_encoder_student, sst2_like, tmp_path
):
    """The student (width 32) learns the teacher's (64) pooled states through a projection;
    a run stopped and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    held_out = tmp_path / "held-out"  # without hidden states: evaluation does not need them
    classify_dump(tiny_classifier, sst2_like, held_out, split="test")

    settings = dict(
        shards=str(class_shards),
        student=str(tiny_encoder_student),
        max_steps=4,
        hidden_weight=1.0,
        eval_shards=str(held_out),
    )
    whole = train(tmp_path / "whole", **settings)
    assert whole["train"]["hidden_mse"] > 0 and whole["train"]["kd"] > 0
    assert whole["eval"]["eval_tokens"] == len(TEXTS)
    assert 0 <= whole["eval"]["eval_accuracy"] <= 1
    final = tmp_path / "whole" / "final"
    projection = load_file(final / "hidden_projection.safetensors")
    assert projection["weight"].shape == (64, 32)
    train(tmp_path / "split", **settings, stop_at_step=2)
    train(tmp_path / "split", **settings, resume=True)
    first, second = (
        load_file(final / "model.safetensors"),
        load_file(tmp_path / "split" / "final" / "model.safetensors"),
    )
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        projection["weight"],
        load_file(tmp_path / "split" / "final" / "hidden_projection.safetensors")["weight"],
    )
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_multi_teacher_targets_average_probabilities(
    class_shards, second_classifier, sst2_like, tmp_path
):
    from kd_shards.shared.shard_reader import open_dump
    from kd_shards.student_train.classify_data import combined_teacher_targets

    other = tmp_path / "teacher-b"
    classify_dump(second_classifier, sst2_like, other)
    combined = combined_teacher_targets(open_dump(class_shards), (str(other),), (3.0, 1.0), False)
    first, second = read_dump_rows(class_shards), read_dump_rows(other)
    for row_a, row_b in zip(first, second, strict=True):
        p = np.empty(2)
        p[row_a["topk_ids"][0]] = np.exp(row_a["topk_logprobs"][0])
        q = np.empty(2)
        q[row_b["topk_ids"][0]] = np.exp(row_b["topk_logprobs"][0])
        expected = np.log(0.75 * p + 0.25 * q)
        np.testing.assert_allclose(combined[row_a["sample_id"]], expected, atol=1e-5)
    # Two teachers train a student through the same loop.
    summary = train(
        tmp_path / "student",
        shards=str(class_shards),
        more_shards=(str(other),),
        student=str(second_classifier),
        max_steps=2,
    )
    assert summary["train"]["kd"] > 0

    fewer = tmp_path / "fewer"
    classify_dump(second_classifier, sst2_like, fewer, limit=6)
    with pytest.raises(UserError, match="covers 6 samples"):
        combined_teacher_targets(open_dump(class_shards), (str(fewer),), (), False)


def test_labels_only_lora_finetuning_with_rslora_and_merge(tiny_classifier, sst2_like, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = train(
        tmp_path / "lora",
        data="sst2",
        data_path=str(sst2_like),
        loss="ce",
        student=str(tiny_classifier),
        epochs=2,
        lora_r=4,
        rslora=True,
        lora_target=("query", "value"),
        merge_lora=True,
    )
    assert summary["steps"] == 6 and summary["train"]["kd"] == 0
    final = tmp_path / "lora" / "final"
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] and sorted(adapter["target_modules"]) == ["query", "value"]
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    original = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer(TEXTS[0][0], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(merged(**inputs).logits, original(**inputs).logits)
    assert not hasattr(merged, "peft_config")


def test_init_student_cuts_an_encoder_and_can_add_a_head(tiny_classifier, tmp_path):
    from safetensors.torch import load_file

    from kd_shards.shared.model_preparation import derive_student

    teacher = build_tiny_bert(
        tmp_path / "four", layers=4, labels=None, tokenizer_from=tiny_classifier
    )
    out = derive_student(teacher, 2, tmp_path / "cut", labels=("negative", "positive"))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["architectures"] == ["BertForSequenceClassification"]
    original, cut = load_file(teacher / "model.safetensors"), load_file(out / "model.safetensors")
    # Layers 0 and 3 of 4 are kept, as layers 0 and 1.
    for new, old in ((0, 0), (1, 3)):
        name = "encoder.layer.{}.attention.self.query.weight"
        torch.testing.assert_close(cut["bert." + name.format(new)], original[name.format(old)])


def test_kd_eval_cls_table_predictions_fidelity_and_chart(
    tiny_classifier, second_classifier, sst2_like, class_shards, tmp_path
):
    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.kd_eval.report import markdown_table
    from kd_shards.shared.scoring import classification_metrics

    test_dump = tmp_path / "test-dump"
    classify_dump(tiny_classifier, sst2_like, test_dump, split="test")
    config = EvalConfig(
        data="sst2",
        data_path=str(sst2_like),
        models=(f"teacher={tiny_classifier}", f"other={second_classifier}"),
        teacher_shards=str(test_dump),
        classify_backend="transformers",
        out=str(tmp_path / "eval"),
        progress=False,
    )
    report = run_evaluation(config)
    teacher, other = report["models"]["teacher"], report["models"]["other"]
    assert teacher["fidelity"]["kl"] < 1e-3 and teacher["fidelity"]["top1_agreement"] == 1.0
    assert other["fidelity"]["kl"] > 1e-3
    gold = np.asarray([int(label) for _, label in TEXTS])
    for name, result in report["models"].items():
        lines = (tmp_path / "eval" / f"predictions-{name}.jsonl").read_text().splitlines()
        predictions = [json.loads(line) for line in lines]
        assert [p["sample_id"] for p in predictions] == [str(i) for i in range(len(TEXTS))]
        assert [p["reference"] for p in predictions] == [
            ["negative", "positive"][label] for label in gold
        ]
        predicted = np.asarray(
            [["negative", "positive"].index(p["prediction"]) for p in predictions]
        )
        assert [p["correct"] for p in predictions] == list(predicted == gold)
        assert result["metrics"]["accuracy"] == pytest.approx((predicted == gold).mean())
        assert result["metrics"] == {**classification_metrics(predicted, gold, 2), "samples": 12}
        assert result["cost"]["samples_per_second"] > 0 and result["parameters"] > 0
    table = markdown_table(report).splitlines()
    assert table[0].startswith("| model | params | accuracy | macro-F1 | KL to teacher")
    assert (tmp_path / "eval" / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_macro_f1_and_accuracy_by_hand():
    from kd_shards.shared.scoring import classification_metrics

    gold = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    # F1 per label: 0: 2·1/(2·1+1+1) = 0.5; 1: 2·2/(2·2+1+0) = 0.8; 2: 2·1/(2·1+0+1) = 2/3.
    metrics = classification_metrics(predicted, gold, 4)  # label 3: absent, not averaged
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_chart_panel_spanning_decades_is_drawn_on_a_log_scale():
    import dataclasses

    from kd_shards.kd_eval.report import chart_panels
    from kd_shards.shared.tasks import TASKS

    def model(perplexity, kl):
        return {
            "metrics": {"perplexity": perplexity, "acc@1": 0.1},
            "fidelity": {"kl": kl, "top1_agreement": 0.5},
            "cost": {"ms_per_sample": 10.0},
        }

    report = {
        "task": "text",
        "kind": "text",
        "metric_columns": [dataclasses.asdict(column) for column in TASKS["text"].metrics],
        "models": {"teacher": model(15.4, 0.0), "init": model(4e6, 11.2), "kd": model(522, 3.3)},
    }
    panels = {title: (values, log) for title, values, log in chart_panels(report)}
    assert panels["perplexity (lower is better) (log scale)"][1]
    assert not panels["next-token acc@1"][1]
    # KL spans 3.3-11.2 among the positive values (the teacher's 0 cannot be drawn on a log
    # scale and does not count): a linear scale shows it well.
    assert panels["KL(teacher ‖ model)"] == ([0.0, 11.2, 3.3], False)
    assert "top-1 agreement with the teacher" in panels and "ms per sample" in panels


def test_bad_input_for_classification(
    tiny_classifier, tiny_model, class_shards, sst2_like, tmp_path
):
    from tests.synthetic_dumps import write_synthetic_dump

    text_shards = write_synthetic_dump(tmp_path / "tokens", 8)
    # A classifier with 3 labels for 2-label data.
    three = build_tiny_bert(
        tmp_path / "three", labels=("a", "b", "c"), tokenizer_from=tiny_classifier
    )
    with pytest.raises(UserError, match="has 3 output labels .* but the data has 2"):
        classify_dump(three, sst2_like, tmp_path / "three-dump")
    # A model without a classification head, and a causal LM without label words.
    bare = build_tiny_bert(tmp_path / "bare", labels=None, tokenizer_from=tiny_classifier)
    with pytest.raises(UserError, match="BertModel, not a sequence classifier"):
        classify_dump(bare, sst2_like, tmp_path / "bare-dump")
    with pytest.raises(UserError, match="causal LM, not a sequence classifier: pass --label-words"):
        classify_dump(tiny_model, sst2_like, tmp_path / "llm-dump")
    # A classify dump given to a causal LM student, and a token dump to a classifier.
    with pytest.raises(UserError, match="is a classify dump .* causal LM student"):
        train(tmp_path / "lm", shards=str(class_shards), student=str(tiny_model), max_steps=1)
    with pytest.raises(UserError, match="sequence-classification student needs class"):
        train(tmp_path / "cls", shards=str(text_shards), student=str(tiny_classifier), max_steps=1)
    # Labels only needs --loss ce; a KD loss without a teacher is refused at once.
    with pytest.raises(UserError, match="--data trains on gold labels only"):
        train(
            tmp_path / "x",
            data="sst2",
            data_path=str(sst2_like),
            student=str(tiny_classifier),
            max_steps=1,
        )


def test_unlabelled_texts_from_a_file_are_dumped_and_distilled(
    tiny_classifier, tiny_encoder_student, tmp_path
):
    """A data file without labels: rows carry NO_LABEL, validate, and train by KD alone."""
    from kd_shards.teacher_dump.inspect import validate

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"review": text}) + "\n" for text, _ in TEXTS[:6]))
    out = tmp_path / "unlabelled"
    from kd_shards.teacher_dump.run import run_dump

    config = dump_config(tiny_classifier, data, out, mode="classify", prompt_column="review")
    run_dump(replace(config, data=str(data), data_path=None, classify_backend="transformers"))
    assert validate(out) == []
    rows = read_dump_rows(out)
    assert {row["finish_reason"] for row in rows} == {"unlabelled"}
    assert all(row["target_ids"] == [-1] and row["references"] == [] for row in rows)
    summary = train(
        tmp_path / "student", shards=str(out), student=str(tiny_encoder_student), max_steps=2
    )
    assert summary["train"]["ce"] == 0.0 and math.isfinite(summary["train"]["kd"])
    assert summary["train"]["kd"] > 0


@pytest.mark.parametrize("saved_labels", ["default two", "num_labels only"])
def test_a_classifier_config_without_id2label_has_the_labels_transformers_gives_it(
    saved_labels, tiny_classifier, sst2_like, tmp_path
):
    """transformers 5 saves a classifier with the default two labels without id2label; an
    older config may state only num_labels. Both load in transformers with that many labels."""
    import shutil

    from transformers import AutoConfig

    from kd_shards.shared.classification import model_labels
    from kd_shards.teacher_dump.run import prepare

    directory = tmp_path / "teacher"
    shutil.copytree(tiny_classifier, directory)
    config = json.loads((directory / "config.json").read_text())
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    if saved_labels == "num_labels only":
        config["num_labels"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(directory).id2label
    expected = [loaded[index] for index in range(len(loaded))]
    assert model_labels(config) == expected
    assert len(expected) == (2 if saved_labels == "default two" else 3)
    settings = dump_config(
        directory, sst2_like, tmp_path / "out", data="sst2", mode="classify", split="train"
    )
    if saved_labels == "default two":
        # Unnamed outputs take the task's label names, in order.
        assert prepare(settings).planned.plan.labels == ["negative", "positive"]
    else:
        with pytest.raises(UserError, match="has 3 output labels"):
            prepare(settings)
