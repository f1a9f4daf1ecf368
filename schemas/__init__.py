"""The contract between teacher-dump and its readers: the shard schema and the manifest."""

from schemas.manifest import (
    MANIFEST_NAME,
    check_schema_version,
    check_tokenizer_fingerprint,
    read_manifest,
    shard_paths,
)
from schemas.shard import COLUMNS, LOGPROB_STEP, PAD_ID, SCHEMA, SCHEMA_VERSION, round_logprobs

__all__ = [
    "COLUMNS",
    "LOGPROB_STEP",
    "MANIFEST_NAME",
    "PAD_ID",
    "SCHEMA",
    "SCHEMA_VERSION",
    "check_schema_version",
    "check_tokenizer_fingerprint",
    "read_manifest",
    "round_logprobs",
    "shard_paths",
]
