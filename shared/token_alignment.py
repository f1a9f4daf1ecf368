"""Token alignment across tokenizers: where two tokenizations of one text meet, and which teacher
ids are exactly one student token.

Cross-tokenizer distillation (docs/cross-tokenizer.md) re-tokenizes a dump's texts with the
student's tokenizer. A stored teacher distribution can only be compared with a student
distribution at a point of the text where both tokenizations have a token boundary: a student
position whose token ends at the character where a teacher token ends takes that teacher
position's distribution; every other student position carries CE only. The character ends are
recomputed from the token ids with each side's tokenizer (the dump keeps the teacher's tokenizer
files beside its manifest), so the shards need no span column.

Used by student-train (collation, reporting) and teacher-dump's rescore mode; nothing here reads
shards or configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_shards.schemas.manifest import TOKENIZER_FOLDER
from kd_shards.shared.storage import as_folder
from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint

NO_END = -1
"""A token that completes no character of the text: part of a multi-byte character, a special
token (skipped in the text), or a token whose decoding does not match the text there."""


def character_ends(tokenizer, token_ids: Sequence[int], text: str) -> np.ndarray:
    """The character of `text` at which each token ends, or NO_END.

    Token j ends at len(decode(ids[: j + 1])) when that decoded prefix is a prefix of `text`
    and longer than every earlier token's end (decoding skips special tokens, as the dump's
    target_text does). Decoding whole prefixes rather than single tokens is what makes this
    right for tokenizers whose pieces decode differently in context (a leading space, a byte
    of a multi-byte character); it costs O(T²) decoded tokens per row, in the tokenizer's Rust
    code (batch_decode).

    Args:
        tokenizer: a Hugging Face tokenizer.
        token_ids: (T,) ids whose decoding (special tokens skipped) is `text`.
        text: the decoded text.
    Returns:
        (T,) int64: ends strictly increasing over the tokens that have one, NO_END elsewhere.
    """
    ids = [int(token_id) for token_id in token_ids]
    ends = np.full(len(ids), NO_END, dtype=np.int64)
    if not ids:
        return ends
    prefixes = tokenizer.batch_decode(
        [ids[: index + 1] for index in range(len(ids))], skip_special_tokens=True
    )
    last = 0
    for index, prefix in enumerate(prefixes):
        if len(prefix) > last and text.startswith(prefix):
            ends[index] = last = len(prefix)
    return ends


def aligned_positions(
    student_ends: np.ndarray, teacher_ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (student position, teacher position) whose tokens end at the same character.

    Args:
        student_ends: (S,) int, strictly increasing where not NO_END (character_ends).
        teacher_ends: (T,) int, likewise.
    Returns:
        (student_index (M,), teacher_index (M,)) int64, in increasing order of both.
    """
    student_valid = np.flatnonzero(student_ends != NO_END)
    teacher_valid = np.flatnonzero(teacher_ends != NO_END)
    _, in_student, in_teacher = np.intersect1d(
        student_ends[student_valid],
        teacher_ends[teacher_valid],
        assume_unique=True,
        return_indices=True,
    )
    return student_valid[in_student].astype(np.int64), teacher_valid[in_teacher].astype(np.int64)


def token_strings(tokenizer) -> list[str]:
    """Each id's decoded string (special tokens included), index = id."""
    return tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])


def exact_token_map(
    teacher_tokenizer, student_tokenizer, teacher_stop_ids: Sequence[int] = ()
) -> np.ndarray:
    """For each teacher id, the student id whose decoded string is exactly the teacher id's
    decoded string, or -1 (the exact-match half of the GOLD-style hybrid loss).

    A string counts once it decodes to something, without U+FFFD (a lone byte of a multi-byte
    character decodes to it, and such pieces of different tokenizers need not be the same
    bytes); special tokens are left out on both sides, except that the teacher's eos and
    `teacher_stop_ids` map to the student's eos (all end the reply). Where several student
    ids decode to one string, the smallest id is taken.

    Returns:
        (len(teacher_tokenizer),) int64.
    """
    student_special = set(student_tokenizer.all_special_ids)
    by_string: dict[str, int] = {}
    for token_id, string in enumerate(token_strings(student_tokenizer)):
        if token_id in student_special or not string or "\ufffd" in string:
            continue
        by_string.setdefault(string, token_id)
    teacher_special = set(teacher_tokenizer.all_special_ids)
    mapping = np.full(len(teacher_tokenizer), -1, dtype=np.int64)
    for token_id, string in enumerate(token_strings(teacher_tokenizer)):
        if token_id not in teacher_special:
            mapping[token_id] = by_string.get(string, -1)
    if student_tokenizer.eos_token_id is not None:
        stops = {*teacher_stop_ids, teacher_tokenizer.eos_token_id} - {None}
        mapping[sorted(stops)] = student_tokenizer.eos_token_id
    return mapping


def dump_tokenizer(dump, *, trust_remote_code: bool = False):
    """The teacher's tokenizer of `dump` (a shared.shard_reader.Dump): the files it keeps beside
    its manifest (TOKENIZER_FOLDER), or for a dump written before it kept them, the teacher's
    directory its manifest names; only a tokenizer with the dump's fingerprint. None if
    neither is there."""
    folder = as_folder(dump.directory)
    candidates = []
    if folder.is_local:
        candidates.append(Path(folder.local) / TOKENIZER_FOLDER)
    recorded = dump.manifest.get("teacher", {}).get("directory")
    if recorded:
        candidates.append(Path(recorded))
    expected = dump.manifest["tokenizer"]["fingerprint"]
    for candidate in candidates:
        if (candidate / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(candidate, trust_remote_code=trust_remote_code)
            if tokenizer_fingerprint(tokenizer) == expected:
                return tokenizer
    return None
