"""Turning examples (or raw text) into token-level dump requests, validated before the engine starts.

All of the input is rendered and checked up front (empty prompts, missing references, prompts
that do not fit the context) so that a bad record fails in seconds, not after the engine's
start-up, and the progress bar knows its exact total.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kd_shards.shared.errors import UserError
from kd_shards.shared.tasks import Example
from kd_shards.shared.tokenizer import chunk_text, render_prompt, render_target


@dataclass(frozen=True)
class DumpRequest:
    """One prompt to send to the teacher."""

    source_index: int
    """Index of the prompt (text mode: of the chunk); sample ids and resume key on it."""
    prompt_ids: np.ndarray
    """(P,) int32 tokens before the target."""
    target_ids: np.ndarray | None
    """(T,) int32 teacher-forced target (score and text modes); None in generate mode."""
    prompt_text: str
    references: tuple[str, ...]
    text_pair: str | None = None
    """Classify mode, sentence pairs: the second text (the shard's text_pair column)."""


def sample_seed(seed: int, source_index: int) -> int:
    """A per-prompt sampling seed, independent of batching, ranks and resumes."""
    digest = hashlib.blake2b(f"{seed}:{source_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def prompt_requests(
    examples: list[Example],
    tokenizer,
    *,
    use_chat_template: bool,
    stop_ids: list[int],
    with_targets: bool,
) -> list[DumpRequest]:
    """Render each example's prompt (and, `with_targets`, its first reference as the target the
    teacher is forced on)."""
    requests = []
    for example in examples:
        if not example.prompt.strip():
            raise UserError(
                f"record {example.index} has an empty prompt: fix or remove it (or check --prompt-column)"
            )
        prompt_ids = render_prompt(tokenizer, example.prompt, use_chat_template=use_chat_template)
        target_ids = None
        if with_targets:
            if not example.references or not example.references[0].strip():
                raise UserError(
                    f"record {example.index} has no reference answer, which score mode teacher-forces: "
                    "pass --target-column naming the answer column, or use --mode generate"
                )
            target_ids = np.asarray(
                render_target(
                    tokenizer,
                    example.prompt,
                    prompt_ids,
                    example.references[0],
                    use_chat_template=use_chat_template,
                    stop_ids=stop_ids,
                ),
                dtype=np.int32,
            )
        requests.append(
            DumpRequest(
                source_index=example.index,
                prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                target_ids=target_ids,
                prompt_text=example.prompt,
                references=example.references,
            )
        )
    return requests


def text_requests(
    texts: list[str], tokenizer, *, chunk_tokens: int, limit: int | None
) -> list[DumpRequest]:
    """Raw texts as chunks of `chunk_tokens` tokens (shared.tokenizer.chunk_text): each chunk's
    first token is its prompt and the rest its target, so every position but the first carries
    loss."""
    return [
        DumpRequest(
            source_index=index,
            prompt_ids=chunk[:1],
            target_ids=chunk[1:],
            prompt_text="",
            references=(),
        )
        for index, chunk in enumerate(
            chunk_text(texts, tokenizer, chunk_tokens=chunk_tokens, limit=limit)
        )
    ]


def check_lengths(
    requests: list[DumpRequest],
    *,
    context: int,
    new_tokens: int,
    skip_too_long: bool,
) -> tuple[list[DumpRequest], int]:
    """Drop or refuse requests that do not fit the context with the `new_tokens` the engine
    adds after them (a completion's most, or scoring's one throw-away token). Returns (kept,
    skipped count)."""

    def needed(request: DumpRequest) -> int:
        target = 0 if request.target_ids is None else len(request.target_ids)
        return len(request.prompt_ids) + target + new_tokens

    too_long = [request for request in requests if needed(request) > context]
    if too_long and not skip_too_long:
        first = too_long[0]
        what = (
            f"{len(first.prompt_ids)} prompt + {new_tokens} new tokens"
            if first.target_ids is None
            else f"{len(first.prompt_ids)} prompt + {len(first.target_ids)} target tokens + "
            f"{new_tokens}"
        )
        raise UserError(
            f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens "
            f"(first: record {first.source_index}, {what}): raise --max-model-len, lower "
            "--max-new-tokens/--chunk-tokens, or pass --skip-too-long to leave them out"
        )
    kept = [request for request in requests if needed(request) <= context]
    return kept, len(requests) - len(kept)
