"""The manifest: `manifest.json` beside the shards, with provenance and per-shard checksums.

It is what readers open first. It records the schema version, the teacher and tokenizer (with a
fingerprint readers compare against their own), k, how the distributions are stored (schema v2:
`storage`, the representation and its parameters), the sampling and logprobs settings, the data,
the resolved dump config, and per shard: name, rows, target tokens, bytes, sha256. Readers refuse
a manifest whose schema version or tokenizer fingerprint they do not match, with a message that
names both values and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from kd_shards.schemas.errors import UserError
from kd_shards.schemas.shard import (
    CLASSIFY_MODE,
    MASKED_LM_MODE,
    READABLE_VERSIONS,
    REPRESENTATIONS,
    SCHEMA_VERSION,
    Storage,
)

MANIFEST_NAME = "manifest.json"
# The one fix for a manifest that cannot be used, given by the readers and by teacher-dump alike:
# teacher-dump rebuilds a missing manifest from the shards on disk, but refuses to overwrite one
# it cannot read (it may belong to another dump).
CORRUPT_MANIFEST_FIX = (
    "the manifest is corrupt; delete it and rerun the same teacher-dump command (it rebuilds "
    "the manifest from the shards)"
)
SHARD_SUFFIX = ".parquet"
TOKENIZER_FOLDER = "tokenizer"
"""The teacher's tokenizer files (save_pretrained), kept beside the manifest: provenance, and what
cross-tokenizer training decodes the teacher's ids with (docs/cross-tokenizer.md)."""


def manifest_path(directory: Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def is_safe_shard_name(name: object) -> bool:
    """A shard name is a bare file name ending in .parquet: it cannot point outside its dir."""
    if not isinstance(name, str) or not name.endswith(SHARD_SUFFIX):
        return False
    pure = PurePosixPath(name)
    return (
        len(pure.parts) == 1
        and name not in (".", "..")
        and "\\" not in name
        and not name.startswith(".")
    )


def inside_directory(directory: Path, name: str) -> Path:
    """The real path of the file `name` in `directory`, refusing a link that leads elsewhere.

    `name` must already be a plain file name (see is_safe_shard_name); a symlink is followed
    only when its target is a file of `directory` itself, so neither a manifest nor a link
    planted among the shards can make a reader open a file outside the dump. The resolved
    path is returned so the file opened is the one checked (a link swapped later is not
    followed again).
    """
    directory = Path(directory)
    if not (is_safe_shard_name(name) or name == MANIFEST_NAME):
        raise UserError(
            f"{directory}: {name!r} is not a plain file name in the dump directory: refusing to "
            "read it; regenerate the manifest"
        )
    resolved = (directory / name).resolve()
    if resolved.parent != directory.resolve():
        raise UserError(
            f"{directory}: {name} is a link to {resolved}, outside the dump directory: refusing "
            "to read it; copy the file into the directory instead of linking it"
        )
    return resolved


def missing_manifest_message(directory: object) -> str:
    return (
        f"{directory} has no {MANIFEST_NAME}: it is not a teacher-dump output "
        "directory (run teacher-dump --out there first, or pass the right directory)"
    )


def corrupt_manifest(where: object, why: str) -> UserError:
    """The one message for a manifest that cannot be read (every reader and teacher-dump)."""
    return UserError(f"{where} {why}: {CORRUPT_MANIFEST_FIX}")


def parse_manifest(text: str, where: str) -> dict:
    """Check a manifest's text: JSON, an object, our schema version, a sound shard list.

    `where` names the file in messages. Reading the file (a local directory or object
    storage) is the reader's side: shared.shard_reader.read_manifest."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise corrupt_manifest(where, f"is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise corrupt_manifest(where, "is not a JSON object")
    check_schema_version(manifest.get("schema_version"), where)
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{where}: {problem}: refusing to read the dump; {CORRUPT_MANIFEST_FIX}")
    return manifest


def _is_count(value: object, least: int = 0) -> bool:
    # bool is an int in Python; a JSON true is not a count.
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable for reading (its fields, one entry per shard), or None."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "shards is not a list"
    names: set[str] = set()
    for entry in shards:
        if not isinstance(entry, dict):
            return f"a shard entry is {type(entry).__name__}, not an object"
        name = entry.get("name")
        if not is_safe_shard_name(name):
            return (
                f"shard name {name!r} is not a plain file name in the dump directory "
                "(a manifest may not point elsewhere)"
            )
        if name in names:
            return f"shard {name} is listed twice"
        names.add(name)
        for key in ("rows", "target_tokens", "bytes"):
            if not _is_count(entry.get(key)):
                return f"shard {name} has {key} {entry.get(key)!r}, not a count"
        sha256 = entry.get("sha256")
        if not (
            isinstance(sha256, str)
            and len(sha256) == 64
            and all(character in "0123456789abcdef" for character in sha256)
        ):
            return f"shard {name} has sha256 {sha256!r}, not 64 hex digits"
    if not _is_count(manifest.get("top_k"), 1):
        return f"top_k {manifest.get('top_k')!r} is not a positive integer"
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not _is_count(tokenizer.get("size"), 1):
        return "tokenizer.size is missing or not a positive integer"
    if not isinstance(tokenizer.get("fingerprint"), str):
        return "tokenizer.fingerprint is missing"
    if manifest.get("schema_version") != 1:
        if is_classify(manifest):
            version = manifest.get("schema_version")
            return f"a classify dump with schema version {version!r} (classify dumps are 1)"
        storage = manifest.get("storage")
        if not isinstance(storage, dict) or storage.get("representation") not in REPRESENTATIONS:
            return f"no valid storage record (representation one of {', '.join(REPRESENTATIONS)})"
    return None


def check_schema_version(found: object, where: str) -> None:
    """Refuse anything written with a schema version this release does not read, saying what
    to do."""
    if found not in READABLE_VERSIONS:
        readable = " and ".join(str(version) for version in READABLE_VERSIONS)
        raise UserError(
            f"{where} uses shard schema version {found!r} but this kd-shards reads versions "
            f"{readable} (it writes {SCHEMA_VERSION}): install the kd-shards release that wrote "
            "it, or redo the dump with this one"
        )


def storage_of_manifest(manifest: dict) -> Storage | None:
    """How a dump stores its distributions (None: schema v1, topk_ids/topk_logprobs, which
    classify dumps always are; read_manifest has checked every other version has a record)."""
    if manifest.get("schema_version") == 1 or is_classify(manifest):
        return None
    return Storage.from_dict(manifest["storage"])


def is_classify(manifest: dict) -> bool:
    """Whether a dump holds class distributions (mode "classify") rather than token top-k."""
    return manifest.get("mode") == CLASSIFY_MODE


def is_masked_lm(manifest: dict) -> bool:
    """Whether a dump holds masked-LM rows (mode "mlm": masked inputs, the teacher's
    distribution at the masked positions) rather than causal token rows."""
    return manifest.get("mode") == MASKED_LM_MODE


def check_dump_kind(manifest: dict, *, classify: bool, where: str, masked_lm: bool = False) -> None:
    """Refuse a classify dump where token shards are needed, and the other way round; and a
    masked-LM dump where causal token shards are needed, and the other way round."""
    if masked_lm and not is_masked_lm(manifest):
        raise UserError(
            f"{where} is a {manifest.get('mode')!r} dump, but a masked-LM student needs masked-LM "
            "rows: dump with teacher-dump --mode mlm, or pass a student of the dump's kind"
        )
    if not masked_lm and not classify and is_masked_lm(manifest):
        raise UserError(
            f"{where} is a masked-LM dump (teacher-dump --mode mlm), which only a *ForMaskedLM "
            "student trains on: pass a masked-LM student, or a dump made with --mode "
            "generate/score/text"
        )
    if classify and not is_classify(manifest):
        raise UserError(
            f"{where} is a {manifest.get('mode')!r} dump of token distributions, but a "
            "sequence-classification student needs class distributions: dump with "
            "teacher-dump --mode classify, or train a causal LM student on it"
        )
    if not classify and is_classify(manifest):
        raise UserError(
            f"{where} is a classify dump (class distributions over {len(classify_labels(manifest))} "
            "labels), but a causal LM student needs token distributions: pass a "
            "*ForSequenceClassification (or encoder) student, or a dump made with --mode "
            "generate/score/text"
        )


ENCODER_DECODER_ARCHITECTURE = "encoder-decoder"
"""teacher.architecture of a dump whose teacher is an encoder-decoder model (optional: absent
in a decoder teacher's dump and in dumps written before it existed)."""


def is_encoder_decoder_dump(manifest: dict) -> bool:
    """Whether the dump's teacher was an encoder-decoder model: its prompts were the encoder's
    input, and its targets the decoder's tokens."""
    return (manifest.get("teacher") or {}).get("architecture") == ENCODER_DECODER_ARCHITECTURE


def classify_labels(manifest: dict) -> list[str]:
    """A classify dump's label names; label index i of the shards is labels[i]."""
    return list((manifest.get("classify") or {}).get("labels") or [])


def check_tokenizer_fingerprint(manifest: dict, fingerprint: str, who: str) -> None:
    """Refuse a reader whose tokenizer differs from the teacher's (ids would mean other tokens)."""
    expected = manifest["tokenizer"]["fingerprint"]
    if fingerprint != expected:
        raise UserError(
            f"tokenizer mismatch: the shards were written with tokenizer {expected[:16]} "
            f"but {who} has tokenizer {fingerprint[:16]}: use a {who} that shares the "
            "teacher's tokenizer, or redo the dump with a teacher whose tokenizer matches"
        )


def totals(shards: list[dict]) -> dict:
    """Sum of rows, target tokens and bytes over shard entries."""
    return {
        "shards": len(shards),
        "rows": sum(entry["rows"] for entry in shards),
        "target_tokens": sum(entry["target_tokens"] for entry in shards),
        "bytes": sum(entry["bytes"] for entry in shards),
    }
