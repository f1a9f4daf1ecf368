"""The resolved configuration of one teacher-dump run (parsed once at the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError, check_all

MODES = ("generate", "score", "text")
DTYPES = ("auto", "float32", "bfloat16", "float16")

LOCAL_FIELDS = frozenset({"rank", "world_size", "rows_per_shard", "max_in_flight", "progress"})
"""Fields that only say how this process works, not what the dump contains: a rerun may change
them. Every other field is part of the dump's identity, and a rerun into the same --out with a
different value is refused."""


@dataclass(frozen=True)
class DumpConfig:
    model: str
    """Teacher: a local Hugging Face model directory (safetensors) or a hub id (needs network)."""
    data: str
    """Built-in task (gsm8k, summ, text) or a local JSONL/JSON/Parquet/CSV/TSV file."""
    out: str
    """Output directory for shards and manifest.json (created; reruns resume it)."""
    mode: str = "generate"
    """generate: teacher samples completions; score: teacher-forced on the reference; text: every
    position of raw text."""
    data_path: str | None = None
    """Local file or directory for a built-in task (else the task's hub dataset is used)."""
    split: str = "train"
    """Dataset split (file name stem when --data-path is a directory)."""
    prompt_column: str | None = None
    """Column holding the prompt when --data is a file (or to remap a built-in task's)."""
    target_column: str | None = None
    """Column holding the reference answer (needed by score mode for custom files)."""
    limit: int | None = None
    """Use only the first N prompts (text mode: the first N chunks)."""
    top_k: int = 20
    """Teacher top-k logprobs stored per target position."""
    max_new_tokens: int = 256
    """Generate mode: the longest completion."""
    temperature: float = 1.0
    """Generate mode: sampling temperature (0 = greedy). Stored logprobs are raw (T=1) anyway."""
    top_p: float = 1.0
    """Generate mode: nucleus sampling threshold."""
    num_samples: int = 1
    """Generate mode: completions sampled per prompt."""
    seed: int = 0
    """Sampling seed; each prompt gets its own seed derived from it, so results do not depend on
    batching, ranks or resumes."""
    chunk_tokens: int = 512
    """Text mode: tokens per chunk (each chunk is one row; its first token is the prompt)."""
    chat_template: bool = True
    """Render prompts with the teacher's chat template when it has one."""
    skip_too_long: bool = False
    """Drop prompts that do not fit the context (counted in the manifest) instead of failing."""
    max_model_len: int | None = None
    """Engine context length; default: the model's."""
    dtype: str = "auto"
    """Teacher dtype: auto, float32, bfloat16, float16 (on CPU use float32)."""
    tensor_parallel_size: int = 1
    """GPUs per teacher engine."""
    gpu_memory_utilization: float | None = None
    """Fraction of accelerator memory for vLLM; default 0.9 on GPU, 0.1 on CPU."""
    enforce_eager: bool = False
    """Skip vLLM graph compilation (faster start for tiny models and tests)."""
    trust_remote_code: bool = False
    """Allow Python code shipped with the model/tokenizer to run."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when --model is a hub id."""
    rows_per_shard: int = 2048
    """Rows per Parquet shard: a crash loses at most the shard in flight."""
    max_in_flight: int = 256
    """Prompts handed to the engine at once (bounded memory; vLLM batches within)."""
    rank: int = 0
    """This process's index among --world-size independent writers into one --out."""
    world_size: int = 1
    """Independent processes (or machines) splitting the prompts; each runs with its --rank."""
    progress: bool = True
    """Show the progress bar on stderr."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        checks = [
            (self.top_k >= 1, "--top-k must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be >= 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.num_samples >= 1, "--num-samples must be at least 1"),
            (self.chunk_tokens >= 2, "--chunk-tokens must be at least 2"),
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.rows_per_shard >= 1, "--rows-per-shard must be at least 1"),
            (self.max_in_flight >= 1, "--max-in-flight must be at least 1"),
            (self.world_size >= 1, "--world-size must be at least 1"),
            (
                0 <= self.rank < self.world_size,
                f"--rank must be in [0, {self.world_size - 1}] for --world-size {self.world_size}",
            ),
            (self.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1"),
            (
                self.mode == "generate" or self.num_samples == 1,
                "--num-samples > 1 needs --mode generate",
            ),
        ]
        check_all(checks)
