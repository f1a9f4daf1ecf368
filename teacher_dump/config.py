"""The resolved configuration of one teacher-dump run (parsed once at the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kd_shards.schemas.shard import VALUE_SCALE, AdaptiveRule, Representation, Storage
from kd_shards.shared.classification import Pooling
from kd_shards.shared.config import check_choices
from kd_shards.shared.engine import ClassifierBackend, EngineDtype
from kd_shards.shared.errors import check_all
from kd_shards.teacher_dump.filters import FilterName

Executor = Literal["local", "ray"]
"""Who drives the engines: this process (one engine), or a Ray Data pipeline (several)."""

WriterPlace = Literal["process", "thread", "inline"]
"""Where the shards are encoded and written (teacher_dump.pipeline): a process beside the
engine's loop, a thread beside it, or on the loop itself."""

Mode = Literal["generate", "score", "text", "classify", "mlm", "rescore"]
"""generate: the teacher samples completions; score: it is teacher-forced on the reference;
text: every position of raw text; classify: class distributions of a classifier (or of an LLM
through label words); mlm: a masked LM's distributions at masked positions of raw text;
rescore: it is teacher-forced on the rows of an existing token dump."""

DEFAULT_VERBALIZER_PROMPT = (
    "Classify the text into one of these labels: {labels}.\n\nText: {text}\n\n"
    "Answer with the label only."
)

LOCAL_FIELDS = frozenset(
    {
        "rank",
        "world_size",
        "rows_per_shard",
        "max_in_flight",
        "progress",
        "executor",
        "ray_workers",
        "ray_address",
        "data_parallel_size",
        "writer",
        "encoding_processes",
    }
)
"""Fields that only say how this process works, not what the dump contains: a rerun may change
them. Every other field that applies to the dump's mode (TeacherMode.OWN_FIELDS) is part
of the dump's identity, and a rerun into the same --out with a different value is refused."""


@dataclass(frozen=True)
class DumpConfig:
    model: str
    """Teacher: a local Hugging Face model directory (safetensors only) or a hub id (needs
    network; offline it fails at once). An encoder-decoder teacher (T5, Flan-T5, mT5, BART)
    runs in transformers, since vLLM serves none (generate and score modes; the manifest
    records teacher.architecture and engine.name)."""
    data: str
    """Data: a built-in task or a local file. gsm8k: question → worked answer ending `#### n`;
    summ: document → one-sentence summary (SciTLDR rows {source, target} or plain {document,
    summary}); text: raw text; sst2, agnews, cola, phrasebank, phrasebank-allagree: labelled
    texts, mrpc, rte, qqp: labelled sentence pairs (--mode classify); triviaqa,
    aqua-rat-letter: questions (generate, score); or a local
    .jsonl/.json/.parquet/.csv/.tsv file used with --prompt-column (and --target-column). The
    same names as kd-eval's --data (shared/tasks/). With --mode rescore: the directory of the
    finished token dump whose rows are re-scored."""
    out: str
    """Output directory for shards and manifest.json (created; reruns resume it)."""
    mode: Mode = "generate"
    """What the teacher does. generate: writes --num-samples completions per prompt
    (sequence-level KD data; greedy unless --temperature > 0); score: is teacher-forced on the data's reference answer; text:
    scores every position of raw text, cut into --chunk-tokens chunks; classify: stores the
    teacher's log-probabilities over all labels per example (--data sst2, mrpc, ... or a file with
    --prompt-column and --target-column) from a *ForSequenceClassification teacher, or from a
    causal LM scoring --label-words; mlm: a *ForMaskedLM teacher's distributions at the masked
    positions of raw text cut into --chunk-tokens windows, masked --masks-per-text times at
    dump time (BERT's 80/10/10 of --mask-rate of the tokens); rescore: is teacher-forced on exactly
    the rows of the token dump --data names (its prompts and targets, e.g. another teacher's
    samples; re-tokenized from their texts when the tokenizers differ), keeping its sample ids."""
    data_path: str | None = None
    """Local file or directory for a built-in task. A directory is searched for <split>.jsonl,
    <split>.parquet, <split>.txt and wiki.<split>.raw. Without it the task's hub dataset is
    loaded through `datasets` (online only)."""
    split: str = "train"
    """Dataset split (file name stem when --data-path is a directory)."""
    prompt_column: str | None = None
    """Column holding the prompt when --data is a file (or to remap a built-in task's)."""
    target_column: str | None = None
    """Column holding the reference answer (needed by score mode for custom files)."""
    limit: int | None = None
    """Use only the first N prompts (text mode: the first N chunks)."""
    store: Representation = "adaptive"
    """How the teacher's distribution at each target position is stored (docs/storage.md).
    adaptive: per row, the fewest entries whose two fidelity figures together are no worse
    than exact top-k (--top-k; at most --k-max per position; about 3x smaller than topk at that
    fidelity); topk: exactly the --top-k most likely ids and their logprobs; sampled: --draws
    draws from the teacher's full distribution, stored as distinct ids with hit counts
    (RS-KD; student-train's forward KL on them is unbiased). Token modes only: --mode classify
    stores every label exactly (docs/classification.md, "Classification shards")."""
    top_k: int = 20
    """topk: ids stored per target position. adaptive: the exact top-k whose fidelity each row
    matches (--adaptive-rule parity)."""
    k_max: int | None = None
    """adaptive: the most entries a position keeps, and how many the engine is asked for
    (default 2 x --top-k)."""
    adaptive_rule: AdaptiveRule = "parity"
    """adaptive: parity keeps entries in order of their KL gain until the row matches exact
    top-k (--top-k) on both fidelity figures; mass keeps the most likely entries of each position
    until they hold --mass-target of its mass."""
    mass_target: float = 0.9
    """adaptive with --adaptive-rule mass: the captured mass each position reaches (unless
    --k-max stops it)."""
    draws: int = 32
    """sampled: draws per target position from the teacher's full distribution."""
    codebook: bool = True
    """adaptive: code ids by their frequency in the shard (a table in the Parquet footer),
    which makes the id gaps smaller."""
    value_scale: int = VALUE_SCALE
    """adaptive: S of the stored values round(S·sqrt(p)); their error costs about
    entries / (6 S²) nats of KL per position."""
    zstd_level: int = 3
    """zstd level of the distribution columns (19: about 6 B per token smaller, the writer
    about 3x slower)."""
    max_new_tokens: int = 256
    """Generate mode: the longest completion."""
    temperature: float = 0.0
    """Generate mode: sampling temperature (0 = greedy, the default: sequence-level KD learns
    the teacher's mode, and on SciTLDR greedy summaries gave students 0.015-0.019 more ROUGE-2
    than T = 1 samples; docs/quality.md). Several --num-samples need
    T > 0. Stored logprobs are raw (T=1) anyway."""
    top_p: float = 1.0
    """Generate mode: nucleus sampling threshold."""
    num_samples: int = 1
    """Generate mode: completions sampled per prompt."""
    filter: FilterName = "none"
    """Generate mode: which completions reach the shards (docs/teacher-dump.md, "Filtering").
    answer-match: those whose final answer equals the reference's (GSM8K's extraction;
    rejection sampling); rouge-l: ROUGE-L F1 against the references at least
    --filter-threshold; column: those containing the row's --filter-column value; none: all."""
    filter_threshold: float | None = None
    """--filter rouge-l: the least ROUGE-L F1 (in [0, 1]) a kept completion has."""
    filter_column: str | None = None
    """--filter column: the data column whose value a kept completion contains."""
    keep_best_of: bool = False
    """With --filter: a prompt none of whose completions passes keeps its best-scoring one
    (else it gives no rows; either way the manifest lists it)."""
    seed: int = 0
    """Sampling seed; each prompt gets its own seed derived from it, so results do not depend on
    batching, ranks or resumes."""
    chunk_tokens: int = 512
    """Text mode: tokens per chunk (each chunk is one row; its first token is the prompt). Mlm
    mode: tokens per window, the tokenizer's special tokens ([CLS], [SEP]) included."""
    masks_per_text: int = 1
    """Mlm mode: differently masked copies of each window (static masking: each copy is one
    row, its masks drawn from a seed derived from --seed, the window and the copy)."""
    mask_rate: float = 0.15
    """Mlm mode: the share of a window's non-special tokens chosen (BERT's 15%: at least one
    per window); of those, 80% become [MASK], 10% a random non-special token, 10% stay."""
    classify_backend: ClassifierBackend = "auto"
    """Classify mode: who runs a classifier teacher. auto: vLLM's pooling runner where it
    supports the model here, else transformers (the manifest records which ran and why);
    vllm or transformers: only that one."""
    hidden_layer: int | None = None
    """Classify mode: also store the teacher's pooled hidden state of this layer (0: embeddings,
    i: after layer i, -1: the last) as float16, for student-train --hidden-weight. Runs the
    teacher in transformers. Mlm mode: store this layer's hidden state at every input token
    (float16; -1 for DistilBERT's cosine loss)."""
    hidden_pooling: Pooling = "cls"
    """Classify mode: how --hidden-layer's states are pooled: the first ([CLS]) token's, or the
    mean over the text's tokens."""
    label_words: tuple[str, ...] = ()
    """Classify mode with a causal LM teacher (a verbalizer): one word per label, in the task's
    label order. Each example's class distribution is the teacher's probability of each word as
    the reply to --verbalizer-prompt (teacher-forced, summed over the word's tokens),
    renormalized over the words."""
    verbalizer_prompt: str = DEFAULT_VERBALIZER_PROMPT
    """Classify mode with --label-words: the prompt, with {text} and {labels} (the label words,
    comma-separated) filled in; rendered with the chat template when the teacher has one."""
    chat_template: bool = True
    """Render prompts with the teacher's chat template when it has one."""
    skip_too_long: bool = False
    """Drop prompts that do not fit the context (counted in the manifest) instead of failing."""
    max_model_len: int | None = None
    """Engine context length; default: the model's."""
    dtype: EngineDtype = "auto"
    """The dtype vLLM runs the teacher in. On CPU use float32: with auto, vLLM runs a float32
    checkpoint in bfloat16 (the manifest records the dtype that actually ran, and a downcast is
    warned about)."""
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
    """Prompts handed to the engine at once: it is fed continuously up to this many (bounded
    memory; vLLM batches within)."""
    writer: WriterPlace = "thread"
    """Where the rows are encoded and the shards written, so that a fast (GPU) engine does not
    wait for them: thread (beside the engine's loop, through a bounded queue, sharing its GIL),
    process (the same in a process of its own, with --set encoding_processes), or inline (on
    the engine's loop). The shards are the same bytes in all three (docs/performance.md)."""
    encoding_processes: int = 0
    """--writer process: processes that encode the rows' distributions in front of the writer
    process, for an engine faster than one writer (the adaptive store's encoding is most of the
    writer's work; docs/performance.md); 0: the writer encodes them itself."""
    rank: int = 0
    """This process's index among --world-size writers into one --out. Prompts are split by
    index (index % W == rank); each rank writes shards named after it, and all share one
    manifest.json (updated under a file lock)."""
    world_size: int = 1
    """Independent processes (or machines) splitting the prompts; each runs with its --rank."""
    executor: Executor = "local"
    """Who runs the teacher. local: one vLLM engine in this process. ray: a Ray Data pipeline,
    prompts → --ray-workers actors each holding one vLLM engine (of --tensor-parallel-size
    GPUs) → this process, the only writer, with the same shards, manifest and resume (generate,
    score and text modes)."""
    ray_workers: int = 1
    """--executor ray: vLLM engines (Ray actors) running at once."""
    ray_address: str | None = None
    """--executor ray: the Ray cluster to join (e.g. auto, or ray://HOST:10001); default: a
    local one started for this run (one CPU per worker)."""
    progress: bool = True
    """Show the progress bar on stderr."""
    data_parallel_size: int = 1
    """--executor local: vLLM engines on this node, one child process each (of
    --tensor-parallel-size GPUs, or its share of the CPU cores), fed batches of --max-in-flight
    prompts; this process writes the same shards and manifest as with one engine (generate,
    score and text modes)."""

    def __post_init__(self):
        check_choices(self)
        checks = [
            (self.top_k >= 1, "--top-k must be at least 1"),
            (
                self.k_max is None or self.k_max >= self.top_k,
                f"--k-max must be at least --top-k ({self.top_k})",
            ),
            (0 < self.mass_target <= 1, "--mass-target must be in (0, 1]"),
            (self.draws >= 1, "--draws must be at least 1"),
            (1 <= self.value_scale <= 1 << 15, "--set value_scale must be in [1, 32768]"),
            (1 <= self.zstd_level <= 22, "--set zstd_level must be in [1, 22]"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be >= 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.num_samples >= 1, "--num-samples must be at least 1"),
            (
                self.num_samples == 1 or self.temperature > 0,
                f"--num-samples {self.num_samples} at --temperature 0 (greedy, the default) "
                "gives identical completions: pass --temperature 1 (or another T > 0)",
            ),
            (
                self.filter == "none" or self.mode == "generate",
                f"--filter {self.filter} needs --mode generate",
            ),
            (
                (self.filter == "rouge-l") == (self.filter_threshold is not None),
                "--filter-threshold goes with --filter rouge-l (and only with it): pass both",
            ),
            (
                self.filter_threshold is None or 0 <= self.filter_threshold <= 1,
                "--filter-threshold must be in [0, 1]",
            ),
            (
                (self.filter == "column") == (self.filter_column is not None),
                "--filter-column goes with --filter column (and only with it): pass both",
            ),
            (
                not self.keep_best_of or self.filter != "none",
                "--keep-best-of needs a --filter",
            ),
            (self.chunk_tokens >= 2, "--chunk-tokens must be at least 2"),
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.rows_per_shard >= 1, "--rows-per-shard must be at least 1"),
            (self.max_in_flight >= 1, "--max-in-flight must be at least 1"),
            (self.encoding_processes >= 0, "--set encoding_processes must be at least 0"),
            (self.world_size >= 1, "--world-size must be at least 1"),
            (
                0 <= self.rank < self.world_size,
                f"--rank must be in [0, {self.world_size - 1}] for --world-size {self.world_size}",
            ),
            (self.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1"),
            (self.ray_workers >= 1, "--ray-workers must be at least 1"),
            (
                self.executor == "local" or self.mode != "classify",
                "--executor ray runs token dumps (generate, score, text): use --executor local "
                "for --mode classify",
            ),
            (
                self.mode == "generate" or self.num_samples == 1,
                "--num-samples > 1 needs --mode generate",
            ),
            (
                self.mode == "classify" or not self.label_words,
                "--label-words needs --mode classify",
            ),
            (
                self.mode in ("classify", "mlm") or self.hidden_layer is None,
                "--hidden-layer needs --mode classify or mlm",
            ),
            (self.masks_per_text >= 1, "--masks-per-text must be at least 1"),
            (0 < self.mask_rate < 1, "--mask-rate must be in (0, 1)"),
            (
                self.mode != "mlm" or (self.executor == "local" and self.data_parallel_size == 1),
                "--mode mlm runs its teacher in this process: use --executor local and "
                "--data-parallel-size 1 (split the work with --rank/--world-size)",
            ),
            (
                not self.label_words or self.hidden_layer is None,
                "--hidden-layer needs a classifier teacher, not --label-words (a verbalizer)",
            ),
            (
                "{text}" in self.verbalizer_prompt,
                "--verbalizer-prompt must contain {text} where the example's text goes",
            ),
            (self.data_parallel_size >= 1, "--data-parallel-size must be at least 1"),
            (
                self.data_parallel_size == 1 or self.executor == "local",
                "--data-parallel-size runs engines without Ray: with --executor ray use "
                "--ray-workers for the number of engines",
            ),
            (
                self.data_parallel_size == 1 or self.mode != "classify",
                "--data-parallel-size runs token dumps (generate, score, text): use "
                "--data-parallel-size 1 for --mode classify",
            ),
        ]
        check_all(checks)

    def storage(self, vocabulary: int) -> Storage:
        """The dump's Storage (schemas.shard) for a teacher with `vocabulary` token ids."""
        if self.store == "topk":
            return Storage("topk", top_k=self.top_k, zstd_level=self.zstd_level)
        if self.store == "sampled":
            return Storage("sampled", top_k=0, draws=self.draws, zstd_level=self.zstd_level)
        return Storage(
            "adaptive",
            top_k=self.top_k,
            k_max=self.k_max or 2 * self.top_k,
            rule=self.adaptive_rule,
            mass_target=self.mass_target if self.adaptive_rule == "mass" else 0.0,
            value_scale=self.value_scale,
            codebook=self.codebook,
            codebook_dtype="<u2" if vocabulary <= 1 << 16 else "<u4",
            zstd_level=self.zstd_level,
        )

    @property
    def engine_logprobs(self) -> int:
        """Entries per position the engine is asked for (logprobs / prompt_logprobs)."""
        if self.store == "topk":
            return self.top_k
        if self.store == "sampled":
            return self.draws
        return self.k_max or 2 * self.top_k
