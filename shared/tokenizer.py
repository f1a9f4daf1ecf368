"""Tokenizer loading, the tokenizer fingerprint, and prompt/target rendering.

The fingerprint is how a reader proves its token ids mean what the teacher's meant: a hash of
the vocabulary (every token string with its id), the added/special tokens and the chat template.
Rendering turns a task's prompt (and, in score mode, its reference) into token ids the same way
for teacher-dump and kd-eval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from kd_shards.shared.errors import UserError, one_line


def load_tokenizer(model_dir: Path | str, *, trust_remote_code: bool = False):
    """Load a Hugging Face tokenizer from a local model directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = one_line(error)
        raise UserError(
            f"cannot load a tokenizer from {model_dir} ({reason}): pass a model directory "
            "that holds tokenizer files (tokenizer.json / tokenizer_config.json)"
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of vocabulary, added/special tokens and chat template; equal iff ids mean the same."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    added = sorted(
        (token_id, token.content, bool(token.special))
        for token_id, token in tokenizer.added_tokens_decoder.items()
    )
    payload = {
        "vocabulary": vocabulary,
        "added_tokens": added,
        "special_tokens": {
            key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())
        },
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def stop_token_ids(tokenizer, model_dir: Path | str | None = None) -> list[int]:
    """Token ids that end a completion: the tokenizer's eos plus the model's generation_config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        config_path = Path(model_dir) / "generation_config.json"
        if config_path.is_file():
            configured = json.loads(config_path.read_text()).get("eos_token_id")
            for token_id in configured if isinstance(configured, list) else [configured]:
                if token_id is not None and int(token_id) not in ids:
                    ids.append(int(token_id))
    return ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str, *, use_chat_template: bool) -> list[int]:
    """Token ids of a user prompt, ready for the model to continue with its answer."""
    if use_chat_template:
        return _as_ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def render_target(
    tokenizer,
    prompt: str,
    prompt_ids: Sequence[int],
    answer: str,
    *,
    use_chat_template: bool,
    stop_ids: Sequence[int],
) -> list[int]:
    """Token ids of `answer` as the model's reply to `prompt`, ending with a stop token.

    With a chat template the whole conversation is rendered and the reply is what follows the
    prompt's rendering, cut right after the first stop token (so the end-of-turn token carries
    loss but any trailing newline of the template does not). Templates whose conversation does
    not start with the prompt's rendering fall back to encoding the answer alone.
    """
    stop = stop_ids[0] if stop_ids else None
    if use_chat_template:
        conversation = _as_ids(
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                tokenize=True,
            )
        )
        if conversation[: len(prompt_ids)] == list(prompt_ids):
            reply = conversation[len(prompt_ids) :]
            for position, token_id in enumerate(reply):
                if token_id in stop_ids:
                    return reply[: position + 1]
            return reply + ([stop] if stop is not None else [])
    reply = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return reply + ([stop] if stop is not None else [])


def _as_ids(rendered) -> list[int]:
    # transformers 5 returns a BatchEncoding-like mapping from apply_chat_template(tokenize=True);
    # transformers 4 returned a plain list.
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(token_id) for token_id in rendered]


TEXT_BLOCK_CHARACTERS = 1 << 16
"""Raw text is tokenized in blocks of about this many characters, split at line ends."""

TEXT_BLOCKS_PER_BATCH = 4
"""Blocks tokenized per call when only the first chunks are wanted (a limit)."""


def chunk_text(texts: list[str], tokenizer, *, chunk_tokens: int, limit: int | None) -> list:
    """Tokenize raw texts as one stream and cut it into chunks of `chunk_tokens` tokens.

    Texts are joined with a blank line (no special tokens are inserted); a tokenizer that adds a
    BOS gets it at the start of every chunk. A last chunk shorter than 2 tokens is dropped.
    Used by teacher-dump's text mode and kd-eval's lm task, so both see the same windows.

    Returns:
        Up to `limit` (P,) int32 numpy arrays.
    """
    import numpy as np

    joined = "".join(text if text.endswith("\n") else text + "\n\n" for text in texts if text)
    if not joined.strip():
        raise UserError("the text data is empty: pass a file with text in it")
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        # Models trained with a BOS expect it at the start of every window.
        chunk_body = chunk_tokens - 1
        bos = np.asarray([tokenizer.bos_token_id], dtype=np.int32)
    else:
        chunk_body = chunk_tokens
        bos = np.zeros(0, dtype=np.int32)
    blocks = _split_into_blocks(joined, TEXT_BLOCK_CHARACTERS)
    # With a limit, only the blocks that the first `limit` chunks need are tokenized (blocks
    # are tokenized one by one anyway, so the chunks are the same): a short run on a long
    # text does not pay for all of it.
    needed = None if limit is None else limit * chunk_body
    batch = len(blocks) if limit is None else TEXT_BLOCKS_PER_BATCH
    encoded, count = [], 0
    for start in range(0, len(blocks), batch):
        for block in tokenizer(blocks[start : start + batch], add_special_tokens=False)[
            "input_ids"
        ]:
            encoded.append(block)
            count += len(block)
        if needed is not None and count >= needed:
            break
    tokens = np.fromiter((token for block in encoded for token in block), dtype=np.int32)
    chunks = []
    for start in range(0, len(tokens), chunk_body):
        chunk = np.concatenate([bos, tokens[start : start + chunk_body]])
        if len(chunk) < 2:
            break
        chunks.append(chunk)
        if limit is not None and len(chunks) >= limit:
            break
    return chunks


def _split_into_blocks(text: str, size: int) -> list[str]:
    """Split text into pieces of about `size` characters, each ending at a line end."""
    blocks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        blocks.append(text[start:end])
        start = end
    return blocks
