"""The resolved configuration of one kd-eval run (parsed once at the CLI, saved in
results.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kd_shards.shared.config import check_choices
from kd_shards.shared.engine import ClassifierBackend, EngineDtype
from kd_shards.shared.errors import UserError, check_all


@dataclass(frozen=True)
class EvalConfig:
    data: str
    """The task (`--data` or `--task`), by the name teacher-dump takes (its module in shared/tasks/ says how models are
    run and scored). gsm8k: greedy answers, the final number must equal the reference's
    (accuracy); summ: greedy one-sentence summaries, ROUGE-1/2/L F1 and corpus BLEU; text:
    perplexity and next-token acc@1/5 over raw-text windows; triviaqa: greedy short answers,
    exact match, token F1, precision and recall (best over the aliases); aqua-rat-letter:
    greedy answers, accuracy of the named letter; sst2, agnews, phrasebank,
    phrasebank-allagree, rte (accuracy, macro-F1), mrpc, qqp (accuracy, F1), cola (Matthews
    correlation), or a .jsonl/.tsv/... file with `text` and `label` columns (labels: the
    models' own names): sequence classifiers; winogrande, social-iqa, aqua-rat: multiple
    choice, a causal LM by option likelihood, an encoder as choices, accuracy."""
    models: tuple[str, ...]
    """NAME=PATH pairs (PATH: a local model directory with safetensors, or a hub id)."""
    data_path: str | None = None
    """Local data file or directory (else the task's hub dataset, which needs network)."""
    split: str = "test"
    """Split to read (the file name stem when --data-path is a directory)."""
    limit: int | None = None
    """Evaluate on the first N examples (text: N chunks)."""
    teacher_shards: str | None = None
    """A teacher-dump directory: adds KL(teacher ‖ model) on the teacher's top-k (tail
    bucketed) and top-1 agreement per model, as student-train reports them; a model whose
    tokenizer differs from the teacher's gets n/a. Classification: a classify dump of the same data gives
    KL(teacher ‖ model) over the labels (T = 1) and agreement with the teacher's label, for every
    model (class distributions need no shared tokenizer)."""
    fidelity_limit: int | None = None
    """Use at most this many rows of --teacher-shards."""
    max_new_tokens: int = 256
    """Generated answers (gsm8k, summ): the longest one."""
    chunk_tokens: int = 512
    """text: tokens per scored window."""
    chat_template: bool = True
    """Render prompts with each model's chat template when it has one (as teacher-dump does)."""
    out: str | None = None
    """Directory for results.json, the chart and per-model predictions (default: print only)."""
    dtype: EngineDtype = "auto"
    """Engine dtype for every model (use float32 on CPU)."""
    max_model_len: int | None = None
    """Engine context length for every model (default: each model's)."""
    gpu_memory_utilization: float | None = None
    """Fraction of accelerator memory per engine; default 0.9 on GPU, 0.1 on CPU."""
    enforce_eager: bool = False
    """Skip vLLM compilation (tiny models, tests)."""
    trust_remote_code: bool = False
    """Allow Python code shipped with a model/tokenizer to run."""
    max_in_flight: int = 256
    """Requests handed to each engine at once."""
    classify_backend: ClassifierBackend = "auto"
    """Classification: who runs the classifiers. auto: vLLM's pooling runner where it supports the model
    here, else transformers (recorded per model); pass one to force the same for every model."""
    batch_size: int = 32
    """Classification with transformers: texts per forward pass; multiple choice: option
    sequences (causal LM) or questions (encoder) per forward pass (the same for every model)."""
    seed: int = 0
    """Engine seed (decoding is greedy, so results do not depend on it)."""
    progress: bool = True
    """Print one progress line per model stage on stderr."""

    def __post_init__(self):
        check_choices(self)
        if not self.models:
            raise UserError("pass at least one --model NAME=PATH")
        names = [parse_model(text)[0] for text in self.models]
        if len(set(names)) != len(names):
            raise UserError(f"--model names must be unique, got {', '.join(names)}")
        checks = [
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.chunk_tokens >= 2, "--chunk-tokens must be at least 2"),
            (self.max_in_flight >= 1, "--max-in-flight must be at least 1"),
            (
                self.fidelity_limit is None or self.fidelity_limit >= 1,
                "--fidelity-limit must be at least 1",
            ),
        ]
        check_all(checks)


def parse_model(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its last component."""
    name, separator, path = text.partition("=")
    if not separator:
        path = text
        name = Path(text.rstrip("/")).name or text
    if not name or not path:
        raise UserError(f"--model {text!r}: write NAME=PATH, e.g. --model student=out/final")
    return name, path
