"""Shared fixtures: tiny local models, small data files, and one vLLM engine per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
ENGINE_TOP_K = 8

QUESTIONS = [
    ("What is two plus three?", "Two plus three is 2+3=5.\n#### 5"),
    (
        "A box holds 4 apples. How many apples are in 3 boxes?",
        "3 boxes hold 3*4=12 apples.\n#### 12",
    ),
    ("Tom had 10 coins and lost 4. How many are left?", "He has 10-4=6 coins left.\n#### 6"),
    ("What is 7 times 6?", "7*6=42.\n#### 42"),
    ("Half of 18 is?", "18/2=9.\n#### 9"),
    ("A class has 12 girls and 9 boys. How many pupils?", "12+9=21 pupils.\n#### 21"),
    ("What is 100 minus 45?", "100-45=55.\n#### 55"),
    ("Each week has 7 days. How many days in 3 weeks?", "3*7=21 days.\n#### 21"),
    ("If 5 pens cost $10, what does one cost?", "10/5=2 dollars.\n#### 2"),
    ("What is 9 squared?", "9*9=81.\n#### 81"),
    ("Sam reads 15 pages a day. Pages in 4 days?", "15*4=60 pages.\n#### 60"),
    ("What is 1000 divided by 8?", "1000/8=125.\n#### 125"),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from scripts.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gsm8k_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "train.txt"
    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[key] for key in sorted(topics)[:6]))
    return path


@pytest.fixture(scope="session")
def engine(tiny_model):
    """One real vLLM engine over the tiny model, reused by every in-process dump test."""
    from kd_shards.shared.engine import EngineSettings, TeacherEngine

    teacher = TeacherEngine(
        EngineSettings(
            model=str(tiny_model),
            dtype="float32",
            max_model_len=512,
            max_logprobs=2 * ENGINE_TOP_K,  # --store adaptive asks for k_max = 2 k
            sampled_logprobs=False,
            tensor_parallel_size=1,
            gpu_memory_utilization=None,
            seed=0,
            enforce_eager=True,
            trust_remote_code=False,
        )
    )
    yield teacher
    teacher.close()


def dump_config(model: Path, data_path: Path, out: Path, **overrides):
    """A DumpConfig for the tiny model, as the CLI would build it (exact top-k storage unless
    `store` is given)."""
    from kd_shards.teacher_dump.config import DumpConfig

    values = dict(
        model=str(model),
        data="gsm8k",
        data_path=str(data_path),
        out=str(out),
        store="topk",
        top_k=ENGINE_TOP_K,
        max_new_tokens=12,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        progress=False,
    )
    values.update(overrides)
    return DumpConfig(**values)


def train_config(shards, student, out, **overrides):
    """A TrainConfig on the tiny student, as the CLI would build it (no progress bar; each
    test file passes its own steps, batch and buffer)."""
    from kd_shards.student_train.config import TrainConfig

    values = dict(
        shards=str(shards), student=str(student), out=str(out), lr=3e-3, chunk_tokens=50,
        progress=False,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def torchrun_student_train(*arguments: str, timeout: int = 600):
    """student-train on 2 CPU processes under torchrun (gloo), output captured."""
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2",
        "-m", "kd_shards.student_train.cli", *arguments, "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO
    )


def cli_command(*arguments: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "kd_shards.teacher_dump.cli", *arguments]


@pytest.fixture(scope="session")
def student_model(tmp_path_factory) -> Path:
    """A differently initialized tiny Llama sharing the teacher's tokenizer."""
    from scripts.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-student"), seed=1)


@pytest.fixture(scope="session")
def text_shards(tiny_model, text_file, engine, tmp_path_factory) -> Path:
    """Real teacher-dump shards (text mode): 32 rows of 63 target tokens in 4 shards."""
    from kd_shards.teacher_dump.run import run_dump

    out = tmp_path_factory.mktemp("text-shards")
    config = dump_config(
        tiny_model,
        text_file,
        out,
        data="text",
        mode="text",
        chunk_tokens=64,
        limit=32,
        rows_per_shard=8,
    )
    run_dump(config, engine)
    return out


@pytest.fixture(scope="session")
def eval_text_shards(tiny_model, engine, tmp_path_factory) -> Path:
    """Held-out teacher-dump shards over different text than text_shards."""
    import pydoc_data.topics

    from kd_shards.teacher_dump.run import run_dump

    directory = tmp_path_factory.mktemp("eval-text")
    topics = pydoc_data.topics.topics
    text_path = directory / "held_out.txt"
    text_path.write_text("\n\n".join(topics[key] for key in sorted(topics)[6:9]))
    config = dump_config(
        tiny_model,
        text_path,
        directory / "shards",
        data="text",
        mode="text",
        chunk_tokens=64,
        limit=12,
    )
    run_dump(config, engine)
    return directory / "shards"


def pytest_terminal_summary(terminalreporter):
    """The fuzzed reader's figures (docs/reliability.md): corrupt dumps refused, by kind."""
    import sys

    fuzz = sys.modules.get("tests.test_reader_fuzz")  # only when this session ran it
    tried = getattr(fuzz, "TRIED", {})
    if tried:
        terminalreporter.write_line(
            f"fuzzed reader: {sum(tried.values())} corrupt dumps, each refused by both readers "
            f"({', '.join(f'{kind} {count}' for kind, count in sorted(tried.items()))})"
        )
