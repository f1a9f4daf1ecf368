"""The teacher's tokenizer files beside a dump's manifest (schemas.manifest.TOKENIZER_FOLDER).

A few MB at most, and good provenance: a reader can decode the stored ids without the teacher's
model directory. Cross-tokenizer training (docs/cross-tokenizer.md) needs them to find where
each teacher token ends in the text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kd_shards.schemas.manifest import TOKENIZER_FOLDER
from kd_shards.shared.storage import Folder


def keep_tokenizer(directory: Folder, tokenizer) -> None:
    """Save `tokenizer` (save_pretrained) into TOKENIZER_FOLDER of the dump, once: a resumed
    dump already has it (its identity includes the tokenizer's fingerprint)."""
    if directory.is_file(f"{TOKENIZER_FOLDER}/tokenizer_config.json"):
        return
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        if directory.is_local:
            (directory.local / TOKENIZER_FOLDER).mkdir(exist_ok=True)
        # tokenizer_config.json last: its presence says the folder is complete.
        files = sorted(
            Path(scratch).iterdir(), key=lambda path: path.name == "tokenizer_config.json"
        )
        for path in files:
            if path.is_file():
                directory.write_bytes(f"{TOKENIZER_FOLDER}/{path.name}", path.read_bytes())
