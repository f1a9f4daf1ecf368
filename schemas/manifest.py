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

from schemas.shard import READABLE_VERSIONS, REPRESENTATIONS, SCHEMA_VERSION, Storage
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
    if manifest.get("schema_version") != 1:
        storage = manifest.get("storage")
        if not isinstance(storage, dict) or storage.get("representation") not in REPRESENTATIONS:
            raise UserError(
                f"{path} has no valid storage record (representation one of "
                f"{', '.join(REPRESENTATIONS)}): the manifest is corrupt; rerun the same "
                "teacher-dump command to rebuild it"
            )
    for entry in manifest.get("shards", []):
        if not is_safe_shard_name(entry.get("name")):
            raise UserError(
                f"{path} lists shard name {entry.get('name')!r}, which is not a plain file name "
                "in the dump directory: refusing to read it; regenerate the manifest"
            )
    return manifest


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
    """How a dump stores its distributions (None: schema v1, topk_ids/topk_logprobs)."""
    if manifest.get("schema_version") == 1:
        return None
    return Storage.from_dict(manifest["storage"])


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
