"""A token dump with texts, written without an engine: what cross-tokenizer training and
re-scoring read (prompt and target texts, ids under one tokenizer, the tokenizer kept beside the
manifest), with random teacher distributions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kd_shards.schemas.shard import Storage
from tests.conftest import QUESTIONS


def write_text_dump(directory: Path, tokenizer, *, rows_per_shard: int = 5) -> Path:
    """A finished generate-style dump of QUESTIONS under `tokenizer` (prompts in its chat
    template, the answers as targets ending in its eos, a random top-4 with a stored tail),
    written with teacher-dump's own writer in shards of `rows_per_shard`, its tokenizer kept
    beside the manifest."""
    from kd_shards.shared.storage import Folder
    from kd_shards.shared.tokenizer import tokenizer_fingerprint
    from kd_shards.teacher_dump.encoding import encode_row
    from kd_shards.teacher_dump.rows import ShardRow
    from kd_shards.teacher_dump.shards import describe_shard, rows_to_table, shard_name, write_table
    from kd_shards.teacher_dump.tokenizer_files import keep_tokenizer
    from tests.synthetic_dumps import synthetic_manifest

    rng = np.random.default_rng(1)
    storage = Storage("topk", top_k=4, zstd_level=3)
    vocabulary = len(tokenizer)
    rows = []
    for index, (question, answer) in enumerate(QUESTIONS):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = np.stack([rng.choice(vocabulary, 4, replace=False) for _ in target]).astype(np.int32)
        logprobs = np.log(np.sort(rng.dirichlet(np.ones(5), size=len(target))[:, :4])[:, ::-1])
        rows.append(
            ShardRow(
                sample_id=f"{index}-0", source_index=index, completion_index=0,
                prompt_ids=np.asarray(prompt, np.int32), target_ids=np.asarray(target, np.int32),
                target_logprobs=np.zeros(len(target), np.float32),
                entries=encode_row(ids, logprobs.astype(np.float32), storage, vocabulary),
                finish_reason="stop", prompt_text=question, target_text=answer,
                references=(answer,), padded_topk_entries=0,
            )
        )  # fmt: skip
    directory.mkdir(parents=True)
    entries = []
    for sequence, start in enumerate(range(0, len(rows), rows_per_shard)):
        path = directory / shard_name(0, 1, sequence)
        table, footer = rows_to_table(rows[start : start + rows_per_shard], storage, vocabulary)
        write_table(path, table, footer, storage)
        entries.append(describe_shard(path))
    fingerprint = tokenizer_fingerprint(tokenizer)
    manifest = synthetic_manifest(
        entries, len(rows), 0, vocabulary, fingerprint, complete=True, storage=storage
    )
    manifest["mode"] = "generate"
    manifest["tokenizer"].update(stop_token_ids=[tokenizer.eos_token_id], chat_template_used=True)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    keep_tokenizer(Folder(directory), tokenizer)
    return directory
