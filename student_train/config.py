"""The resolved configuration of one student-train run (parsed once at the CLI).

It is saved as `train_config.json` in the output directory and inside every checkpoint's
`meta.json`; `--resume` refuses a config that differs in anything but RESUMABLE_FIELDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kd_shards.shared.config import check_choices
from kd_shards.shared.distributions import TailPolicy
from kd_shards.shared.errors import check_all
from kd_shards.student_train.losses import DEFAULT_BETA, Loss, LossOptions
from kd_shards.student_train.student import LoraOptions

RESUMABLE_FIELDS = frozenset(
    {
        "resume",
        "stop_at_step",
        "progress",
        "keep_checkpoints",
        "log_every",
        "log_samples",
        "allow_incomplete",
        "save_every",
        "eval_every",
        "eval_limit",
        "follow_poll",
        "follow_timeout",
    }
)
"""Fields a resumed run may change: they say how this process runs, not what it trains."""

CrossTokenizer = Literal["none", "uld", "hybrid"]
"""Logit KD from a dump of another tokenizer (see TrainConfig.cross_tokenizer)."""
Parallel = Literal["ddp", "fsdp"]
"""How the ranks of a torchrun job share the student (see TrainConfig.parallel)."""

DEFAULT_MICRO_BATCH = 8
LANGUAGE_MODEL_DEFAULTS = {"alpha": 0.0, "temperature": 1.0}
CLASSIFICATION_DEFAULTS = {"alpha": 0.5, "temperature": 5.0}
MASKED_LM_TEMPERATURE = 2.0
"""A masked-LM student's --temperature when not given (DistilBERT's T = 2)."""
"""--alpha and --temperature when not given: token KD on the teacher's distribution alone at
T = 1; classification KD as in the classic recipe (Hinton et al.): 0.5 · CE(gold) +
0.5 · T² · KL at T = 5 (class distributions of a confident teacher are near one-hot at T = 1)."""


@dataclass(frozen=True)
class TrainConfig:
    student: str
    """Student: a local Hugging Face model directory (safetensors) or a hub id. A causal LM
    trains on token dumps: its tokenizer fingerprint must equal the dump's (refused with both
    fingerprints otherwise), unless it trains on the dump's texts (--loss ce or
    --cross-tokenizer: docs/cross-tokenizer.md), and its logits are sliced to len(tokenizer). An
    encoder-decoder (T5, BART: AutoModelForSeq2SeqLM) trains on token dumps the same way, the
    prompt its encoder's input and the target its decoder's tokens. A sequence classifier
    or a bare encoder (BertModel, ...: it gets a new head) trains on classify dumps or --data,
    with its own tokenizer."""
    out: str
    """Output directory: checkpoints/, final/, metrics.jsonl, curve.png, train_config.json."""
    shards: str | None = None
    """teacher-dump directory to train on (manifest.json + Parquet shards): token dumps for a
    causal LM student, a classify dump for a classifier student."""
    data: str | None = None
    """Classification without a teacher: train on the gold labels of a task (sst2, agnews, mrpc,
    rte, qqp, cola, phrasebank, ...; pairs tokenized as pairs) or a
    .jsonl/.tsv/... file with `text` and `label` columns (labels: their distinct values, sorted)
    instead of --shards; needs --loss ce. Used to fine-tune a teacher, and for the labels-only
    baseline (which can also be --shards with --loss ce: the same rows in the same order)."""
    data_path: str | None = None
    """With --data: the local file, or a directory holding <split>.tsv/.jsonl/.parquet."""
    split: str = "train"
    """With --data: the split to read."""
    limit: int | None = None
    """With --data: use only the first N examples."""
    more_shards: tuple[str, ...] = ()
    """Multi-teacher: further dumps of the same samples by other teachers. Classification:
    classify dumps with the same labels; each example's teacher distribution becomes the
    weighted average of every teacher's probabilities (--shards first, then these, weighted by
    --teacher-weights). Token dumps (a causal LM student): dumps of --shards' rows with its
    tokenizer (teacher-dump --mode rescore --data SHARDS); each position's distribution becomes
    the weighted average over the union of the stored ids (tails averaged too). Refused when
    the dumps hold different data, samples, labels, targets or tokenizers."""
    teacher_weights: tuple[float, ...] = ()
    """Weights of the teachers of --shards and --more-shards, in that order (normalized to sum
    to 1); default: uniform."""
    hidden_weight: float = 0.0
    """Classification: weight w of a hidden-state loss w · MSE(P h_student, h_teacher), between
    the student's pooled hidden state (the teacher's pooling, layer --student-hidden-layer)
    through a learned linear projection P (student width → teacher width) and the teacher's
    pooled state stored in the dump (teacher-dump --hidden-layer). 0: off."""
    masked_lm_weights: tuple[float, ...] = (5.0, 2.0, 1.0)
    """Masked-LM students (an mlm dump): DistilBERT's weights (α_kd, α_mlm, α_cos) of
    α_kd·T²·KL(p_T ‖ q_T) at the masked positions + α_mlm·CE of the original tokens there +
    α_cos·(1 − cos) between the student's and the teacher's last hidden states at every
    non-padding token (the dump needs teacher-dump --hidden-layer -1 unless α_cos is 0). The
    temperature defaults to 2 for them."""
    student_hidden_layer: int = -1
    """Classification with --hidden-weight: the student layer whose pooled state is compared
    (0: embeddings, i: after layer i, -1: the last)."""
    eval_shards: str | None = None
    """Held-out teacher-dump directory. Gives CE, KL(teacher ‖ student) on the teacher's
    top-k (tail bucketed, T=1) and top-1 agreement with the teacher, before the first step,
    every --eval-every steps and after the last."""
    loss: Loss = "fkl"
    """The loss. ce: cross-entropy on the stored target tokens (sequence-level KD; with
    generate-mode shards these are the teacher's samples). fkl KL(p‖q), rkl KL(q‖p), jsd
    generalized JSD(β) as in GKD (β=0 forward, β=1 reverse KL), skew-kl KL(p ‖ βp+(1−β)q) as in
    DistiLLM, tvd total variation."""
    alpha: float | None = None
    """Weight of CE: total = α·CE + (1−α)·KD (ignored for --loss ce). Default 0 for token
    dumps; 0.5 for classification (CE on the gold label, rows without one add no CE)."""
    beta: float | None = None
    """JSD's mixture weight β (default 0.5) or skew-KL's skew (default 0.1)."""
    temperature: float | None = None
    """Distillation temperature T: both compared distributions are raised to 1/T and
    renormalized; the KD loss is multiplied by T². Default 1 for token dumps, 5 for
    classification."""
    tail: TailPolicy = "bucket"
    """The teacher's mass outside its stored ids. bucket: compare k+1 outcomes, the stored ids
    plus "everything else" (the teacher's stored tail, exact to 0.8 %; schema-v1 dumps store
    none, so it is 1 − Σp there and tails below 10⁻³, the precision of their rounded logprobs,
    count as empty, 10⁻⁹) against the student's exact remaining mass. renormalize: compare
    both distributions restricted to the stored ids. Sampled (RS-KD) dumps need bucket, --loss
    fkl and --temperature 1: only then is their loss unbiased."""
    cross_tokenizer: CrossTokenizer = "none"
    """Logit KD across tokenizers (docs/cross-tokenizer.md): the dump's texts are re-tokenized by
    the student, student and teacher positions whose tokens end at the same character are
    aligned, and aligned positions get uld (Boizard et al. 2024: L1 between the sorted
    probability vectors, no vocabulary mapping) or hybrid (GOLD-style: forward KL on teacher
    ids that are exactly one student token, ULD on the rest); every student position gets
    α·CE. Needs --temperature 1 and the default --loss. none: a student whose tokenizer
    differs from the dump's trains only with --loss ce (sequence-level KD on the re-tokenized
    texts, no logits needed); others are refused."""
    max_steps: int | None = None
    """Optimizer steps to train (the stream cycles through epochs as needed). Give this or
    --epochs."""
    epochs: float | None = None
    """Whole passes over the shards instead of --max-steps; the step count is planned exactly
    from the row lengths."""
    micro_batch: int | None = None
    """Rows per micro-batch (default 8 unless --batch-tokens is given)."""
    batch_tokens: int | None = None
    """Pack each micro-batch with rows up to this many padded tokens (rows x longest row)
    instead of a fixed --micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW), reached after the warm-up, then cosine decay to
    lr × min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup: float = 0.03
    """Linear warm-up: a fraction of the total steps when < 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (applied to matrices only, not to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 0
    """Seed of the data order and of the student's random state (dropout, LoRA init)."""
    shuffle_buffer: int = 1024
    """Rows read and shuffled together; bounds the loader's memory."""
    max_length: int | None = None
    """Longest sequence (prompt + target) fed to the student; longer rows lose prompt tokens
    from the left, then target tokens from the end. Default: the student's context length."""
    chunk_tokens: int = 512
    """Target positions whose full-vocabulary logits exist at once in the loss."""
    teacher_top_k: int | None = None
    """Use only the teacher's N most likely stored ids per position (the rest of its mass joins
    the tail): a smaller-k ablation from the same dump, holding what a dump made with --top-k N
    stores (where padding-row ids were dropped, one more real id). Default: every entry."""
    bf16: bool = False
    """bfloat16 autocast for the student's forward, LM head included (weights stay float32; the
    log-softmax and the losses run in float32 on the bf16 logits, so the student's
    log-probabilities differ from float32 ones: docs/student-train.md, "--bf16 precision").
    Slow on CPUs without native bf16."""
    lora_r: int = 0
    """LoRA rank: train a peft LoRA adapter instead of all weights (0: full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with --rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_target: tuple[str, ...] = ("all-linear",)
    """Module names LoRA adapts (e.g. q_proj,v_proj; query,key,value for BERT-style
    encoders), or all-linear. A classifier's head always trains in full."""
    rslora: bool = False
    """Rank-stabilized LoRA scaling alpha / sqrt(r)."""
    merge_lora: bool = False
    """Also save the LoRA adapter merged into the base weights as a plain model in final/
    (the adapter itself in final/adapter/)."""
    eval_every: int = 0
    """Evaluate on --eval-shards every N steps (0: only before the first and after the last)."""
    eval_limit: int | None = None
    """Evaluate on at most this many rows of --eval-shards."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end); the last step is always saved."""
    keep_checkpoints: int = 2
    """Keep this many most recent checkpoints (older ones are deleted)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    log_samples: bool = False
    """Also write samples-rank{R}.jsonl: the sample ids each rank trained on at each step (to
    audit the data order)."""
    stop_at_step: int | None = None
    """Checkpoint and stop after this step, e.g. to fit a job time limit; continue with
    --resume."""
    resume: bool = False
    """Continue from the latest checkpoint in --out (a fresh start if there is none)."""
    trust_remote_code: bool = False
    """Allow Python code shipped with the student model/tokenizer to run."""
    allow_incomplete: bool = False
    """Train on a dump whose manifest says it is not complete (a dump still running or stopped)."""
    parallel: Parallel = "ddp"
    """How the ranks of a torchrun job share the student. ddp: each rank holds the whole
    student; gradients are summed over ranks once per step. fsdp: torch's FSDP2 shards weights,
    gradients and optimizer state over the ranks (one unit per decoder layer), for a student
    that does not fit one device; checkpoints hold the shards (torch.distributed.checkpoint)
    plus the full model gathered for final/. fsdp trains causal LM students in full (no LoRA)
    without --eval-shards."""
    follow: bool = False
    """Train while the --shards dump is still being written: start before it (even before its
    manifest exists), train on each shard as it is published, wait when caught up, and end when
    the manifest says complete. Epoch 0 reads shards in publication order, shuffled within
    windows of shuffle_buffer rows; later epochs as without --follow. With --epochs the step
    count is planned from the manifest's expected rows (needs --micro-batch)."""
    follow_poll: float = 5.0
    """--follow: seconds between reads of the manifest while waiting for shards."""
    follow_timeout: float | None = None
    """--follow: stop with an error after this many seconds without a new shard (a checkpoint
    is kept; --resume continues). Default: wait as long as it takes."""
    progress: bool = True
    """Show the progress bar on stderr."""

    @property
    def rows_per_micro_batch(self) -> int | None:
        """Fixed rows per micro-batch, or None when packing by --batch-tokens."""
        if self.batch_tokens is not None:
            return None
        return self.micro_batch if self.micro_batch is not None else DEFAULT_MICRO_BATCH

    def loss_options(self, classification: bool = False) -> LossOptions:
        """The loss settings, with the defaults of token KD or of classification KD."""
        defaults = CLASSIFICATION_DEFAULTS if classification else LANGUAGE_MODEL_DEFAULTS
        beta = self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss, 0.0)
        alpha = self.alpha if self.alpha is not None else defaults["alpha"]
        temperature = self.temperature if self.temperature is not None else defaults["temperature"]
        return LossOptions(self.loss, alpha, beta, temperature, self.tail)

    @property
    def lora_options(self) -> LoraOptions:
        return LoraOptions(
            self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target, self.rslora
        )

    def __post_init__(self):
        check_choices(self)
        check_all(
            [
                *self.source_and_batch_checks(),
                *self.value_checks(),
                *self.cross_tokenizer_checks(),
            ]
        )

    def cross_tokenizer_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for --cross-tokenizer."""
        if self.cross_tokenizer == "none":
            return []
        flag = f"--cross-tokenizer {self.cross_tokenizer}"
        return [
            (
                self.loss == "fkl",
                f"{flag} replaces the divergence (its KL part is forward KL): drop --loss "
                f"{self.loss} (--loss ce without {flag} is sequence-level KD)",
            ),
            (
                self.temperature in (None, 1.0),
                f"{flag} compares the stored distributions at temperature 1: drop --temperature",
            ),
            (
                self.teacher_top_k is None,
                f"{flag} compares every stored entry: drop --set teacher_top_k",
            ),
        ]

    def source_and_batch_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the data source, batching, follow and parallel settings."""
        return [
            (
                (self.max_steps is None) != (self.epochs is None),
                "pass exactly one of --max-steps N or --epochs E",
            ),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (
                self.epochs is None or float(self.epochs).is_integer(),
                "--epochs must be a whole number (use --max-steps for a partial pass)",
            ),
            (
                self.micro_batch is None or self.batch_tokens is None,
                "pass --micro-batch or --batch-tokens, not both",
            ),
            (self.micro_batch is None or self.micro_batch >= 1, "--micro-batch must be >= 1"),
            (self.batch_tokens is None or self.batch_tokens >= 2, "--batch-tokens must be >= 2"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (
                (self.shards is None) != (self.data is None),
                "pass exactly one of --shards DIR (a teacher dump) or --data TASK (labels only)",
            ),
            (
                self.data is None or self.loss == "ce",
                "--data trains on gold labels only: pass --loss ce (distillation needs a classify "
                "dump in --shards)",
            ),
            (
                not self.more_shards or self.shards is not None,
                "--more-shards adds teachers to --shards: pass --shards too",
            ),
            (
                not self.teacher_weights or len(self.teacher_weights) == 1 + len(self.more_shards),
                f"--teacher-weights needs one weight per teacher ({1 + len(self.more_shards)}: "
                "--shards, then each --more-shards)",
            ),
            (
                all(weight >= 0 for weight in self.teacher_weights)
                and (not self.teacher_weights or sum(self.teacher_weights) > 0),
                "--teacher-weights must be >= 0 and not all 0",
            ),
            (
                not self.follow or (self.shards is not None and not self.more_shards),
                "--follow trains on one dump being written: pass it as --shards (without "
                "--more-shards, which needs finished dumps)",
            ),
            (
                not self.follow or self.epochs is None or self.batch_tokens is None,
                "--follow with --epochs plans its steps from the expected row count, which "
                "--batch-tokens packing does not give: pass --micro-batch, or --max-steps",
            ),
            (self.follow_poll > 0, "--set follow_poll must be > 0"),
            (
                self.follow_timeout is None or self.follow_timeout > 0,
                "--set follow_timeout must be > 0",
            ),
            (
                self.parallel == "ddp" or (self.lora_r == 0 and self.eval_shards is None),
                "--parallel fsdp trains full weights without evaluation: drop --lora-r and "
                "--eval-shards (evaluate final/ with kd-eval --teacher-shards), or use ddp",
            ),
        ]

    def value_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the ranges of the numeric settings."""
        return [
            (self.hidden_weight >= 0, "--hidden-weight must be >= 0"),
            (
                len(self.masked_lm_weights) == 3 and min(self.masked_lm_weights) >= 0,
                "--masked-lm-weights takes three weights >= 0: α_kd, α_mlm, α_cos",
            ),
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.alpha is None or 0.0 <= self.alpha <= 1.0, "--alpha must be in [0, 1]"),
            (
                self.beta is None or 0.0 <= self.beta <= 1.0,
                "--beta must be in [0, 1]",
            ),
            (
                self.loss != "skew-kl" or self.beta is None or 0.0 < self.beta < 1.0,
                "skew-kl needs 0 < --beta < 1",
            ),
            (self.temperature is None or self.temperature > 0, "--temperature must be > 0"),
            (self.lr > 0, "--lr must be > 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (self.shuffle_buffer >= 1, "--shuffle-buffer must be at least 1"),
            (self.max_length is None or self.max_length >= 2, "--max-length must be >= 2"),
            (self.chunk_tokens >= 1, "--chunk-tokens must be at least 1"),
            (
                self.teacher_top_k is None or self.teacher_top_k >= 1,
                "--set teacher_top_k must be at least 1",
            ),
            (self.lora_r >= 0, "--lora-r must be >= 0"),
            (not self.merge_lora or self.lora_r > 0, "--merge-lora needs --lora-r > 0"),
            (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.eval_limit is None or self.eval_limit >= 1, "--eval-limit must be >= 1"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (
                self.stop_at_step is None or self.stop_at_step >= 1,
                "--stop-at-step must be at least 1",
            ),
        ]
