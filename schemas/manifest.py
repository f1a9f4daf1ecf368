"""The manifest: `manifest.json` beside the shards, with provenance and per-shard checksums.

It is what readers open first. It records the schema version, the teacher and tokenizer (with a
fingerprint readers compare against their own), k, the sampling and logprobs settings, the data,
the resolved dump config, and per shard: name, rows, target tokens, bytes, sha256. Readers refuse
a manifest whose schema version or tokenizer fingerprint they do not match, with a message that
names both values and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from schemas.shard import CLASSIFY_MODE, SCHEMA_VERSION
from shared.errors import UserError

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".parquet"


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


def read_manifest(directory: Path) -> dict:
    """Read and check a dump's manifest: present, JSON, our schema version, safe shard names."""
    path = manifest_path(directory)
    if not path.is_file():
        raise UserError(
            f"{directory} has no {MANIFEST_NAME}: it is not a teacher-dump output "
            "directory (run teacher-dump --out there first, or pass the right directory)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}): the manifest is corrupt; rerun the same "
            "teacher-dump command to rebuild it from the shards"
        ) from None
    check_schema_version(manifest.get("schema_version"), str(path))
    for entry in manifest.get("shards", []):
        if not is_safe_shard_name(entry.get("name")):
            raise UserError(
                f"{path} lists shard name {entry.get('name')!r}, which is not a plain file name "
                "in the dump directory: refusing to read it; regenerate the manifest"
            )
    return manifest


def check_schema_version(found: object, where: str) -> None:
    """Refuse anything written with another schema version, saying what to do."""
    if found != SCHEMA_VERSION:
        raise UserError(
            f"{where} uses shard schema version {found!r} but this kd-shards reads version "
            f"{SCHEMA_VERSION}: install the kd-shards release that wrote it, or redo the dump "
            "with this one"
        )


def is_classify(manifest: dict) -> bool:
    """Whether a dump holds class distributions (mode "classify") rather than token top-k."""
    return manifest.get("mode") == CLASSIFY_MODE


def check_dump_kind(manifest: dict, *, classify: bool, where: str) -> None:
    """Refuse a classify dump where token shards are needed, and the other way round."""
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
