"""Every bad input that applies to the dump gets a one-line error naming the cause
and the fix (acceptance 6). Most fail before the engine starts; none leaves a partial shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kd_shards.shared.errors import UserError
from tests.conftest import dump_config


def dump_error(config, engine=None) -> str:
    from kd_shards.teacher_dump.run import run_dump

    with pytest.raises(UserError) as caught:
        run_dump(config, engine)
    message = str(caught.value)
    assert "\n" not in message, "errors must be one line"
    return message


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_named_with_its_number(tiny_model, tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        ['{"question": "a?", "answer": "b"}', "", '{"question": "c?", "answer": '],
    )
    message = dump_error(dump_config(tiny_model, data, tmp_path / "out"))
    assert "bad.jsonl line 3 is not valid JSON" in message and "fix or remove that line" in message
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


def test_missing_column(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a?", "answer": "b"}'])
    message = dump_error(dump_config(tiny_model, data, tmp_path / "out"))
    assert "record 0 has no column question" in message and "--prompt-column" in message


def test_empty_prompt(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.csv", [])
    data.write_text("q,a\nhello,world\n   ,x\n")
    message = dump_error(
        dump_config(tiny_model, data, tmp_path / "out", data=str(data), prompt_column="q")
    )
    assert "record 1 has an empty prompt" in message


def test_prompt_longer_than_the_context(tiny_model, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"question": "why " * 600, "answer": "x"})]
    )
    message = dump_error(dump_config(tiny_model, data, tmp_path / "out"))
    assert "do not fit the model's context of 512 tokens" in message
    assert "--skip-too-long" in message and "--max-model-len" in message


def test_context_beyond_the_model_and_k_beyond_the_vocabulary(tiny_model, gsm8k_file, tmp_path):
    message = dump_error(dump_config(tiny_model, gsm8k_file, tmp_path / "o", max_model_len=4096))
    assert "exceeds the model's context of 512" in message
    message = dump_error(dump_config(tiny_model, gsm8k_file, tmp_path / "o", top_k=600))
    assert "--top-k 600 is above the vocabulary size 500" in message


def test_score_mode_without_a_reference(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"q": "a?"}'])
    message = dump_error(
        dump_config(
            tiny_model, data, tmp_path / "out", data=str(data), prompt_column="q", mode="score"
        )
    )
    assert "no reference answer" in message and "--target-column" in message


def test_unknown_task_and_missing_files(tiny_model, gsm8k_file, tmp_path):
    assert "unknown --data 'gsm9k'" in dump_error(
        dump_config(tiny_model, gsm8k_file, tmp_path / "o", data="gsm9k")
    )
    assert "does not exist" in dump_error(
        dump_config(tiny_model, tmp_path / "missing.jsonl", tmp_path / "o")
    )
    assert "no such directory" in dump_error(
        dump_config(tmp_path / "no-model", gsm8k_file, tmp_path / "o")
    )


def test_hub_model_offline_fails_fast(gsm8k_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = dump_error(dump_config("kd-shards-test/not-a-model", gsm8k_file, tmp_path / "o"))
    assert "cannot get model kd-shards-test/not-a-model from the Hugging Face hub" in message
    assert "pass a local model directory" in message


def test_pickle_weights_are_refused(tmp_path, gsm8k_file):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80")
    message = dump_error(dump_config(model, gsm8k_file, tmp_path / "o"))
    assert "no .safetensors weights" in message and "pytorch_model.bin" in message


def test_rerun_with_a_different_config_is_refused(tiny_model, gsm8k_file, engine, tmp_path):
    from kd_shards.teacher_dump.run import run_dump

    run_dump(dump_config(tiny_model, gsm8k_file, tmp_path / "out", limit=2), engine)
    message = dump_error(dump_config(tiny_model, gsm8k_file, tmp_path / "out", limit=2, top_k=4))
    assert "already holds a dump made with a different config (top_k: 8 -> 4)" in message
    # A process-local setting is not part of the identity: this resumes (nothing left to do).
    manifest = run_dump(
        dump_config(tiny_model, gsm8k_file, tmp_path / "out", limit=2, rows_per_shard=7), engine
    )
    assert manifest["complete"]


def test_a_field_of_another_mode_does_not_refuse_a_resume(tiny_model, text_file, engine, tmp_path):
    import json

    from kd_shards.teacher_dump.config import LOCAL_FIELDS
    from kd_shards.teacher_dump.run import identity_hash, run_dump

    out = tmp_path / "out"
    text = dict(data="text", mode="text", chunk_tokens=64, limit=2)
    first = run_dump(dump_config(tiny_model, text_file, out, temperature=1.0, **text), engine)
    # --temperature cannot change a text dump's rows: another value resumes it
    again = run_dump(dump_config(tiny_model, text_file, out, temperature=0.0, **text), engine)
    assert again["complete"] and again["identity"] == first["identity"]
    message = dump_error(dump_config(tiny_model, text_file, out, **{**text, "chunk_tokens": 32}))
    assert "different config (chunk_tokens: 64 -> 32)" in message
    # A dump written before identities left other modes' fields out (every field hashed, the
    # files' fingerprints the same) still resumes; one whose files changed does not.
    manifest = json.loads((out / "manifest.json").read_text())
    fields = {key: value for key, value in manifest["config"].items() if key not in LOCAL_FIELDS}
    fingerprints = {
        "weights": manifest["teacher"]["weights_fingerprint"],
        "data": manifest["data"]["fingerprint"],
        "tokenizer": manifest["tokenizer"]["fingerprint"],
    }
    for recorded, resumes in ((fingerprints, True), ({**fingerprints, "data": "other"}, False)):
        manifest["identity"] = identity_hash(fields, recorded)
        (out / "manifest.json").write_text(json.dumps(manifest))
        config = dump_config(tiny_model, text_file, out, temperature=0.0, **text)
        if resumes:
            assert run_dump(config, engine)["complete"]
        else:
            assert "the model weights, tokenizer or data files changed" in dump_error(config)


def test_k_above_a_reused_engines_cap(tiny_model, gsm8k_file, engine, tmp_path):
    message = dump_error(dump_config(tiny_model, gsm8k_file, tmp_path / "o", top_k=17), engine)
    assert "asks the engine for 17 logprobs per position, above its max_logprobs of 16" in message


def test_corrupt_shard_is_named_on_resume(tiny_model, gsm8k_file, engine, tmp_path):
    from kd_shards.teacher_dump.run import run_dump

    config = dump_config(tiny_model, gsm8k_file, tmp_path / "out", limit=4, rows_per_shard=2)
    run_dump(config, engine)
    shard = sorted((tmp_path / "out").glob("part-*.parquet"))[1]
    shard.write_bytes(b"not parquet at all")
    message = dump_error(config, engine)
    assert f"shard {shard.name} is unreadable" in message and "delete it and rerun" in message


def test_schema_version_mismatch_and_unsafe_shard_names(tmp_path):
    from kd_shards.shared.shard_reader import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99, "shards": []}))
    with pytest.raises(
        UserError, match="shard schema version 99 but this kd-shards reads versions 1 and 2"
    ):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "shards": [{"name": "../../etc/passwd.parquet"}]})
    )
    with pytest.raises(UserError, match="not a plain file name"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match="has no manifest.json"):
        read_manifest(tmp_path / "elsewhere")


def test_tokenizer_mismatch_names_both_fingerprints():
    from kd_shards.schemas.manifest import check_tokenizer_fingerprint

    manifest = {"tokenizer": {"fingerprint": "a" * 64}}
    with pytest.raises(UserError) as caught:
        check_tokenizer_fingerprint(manifest, "b" * 64, "student")
    assert "a" * 16 in str(caught.value) and "b" * 16 in str(caught.value)
    check_tokenizer_fingerprint(manifest, "a" * 64, "student")


def test_nan_or_inf_teacher_logprobs_are_refused():
    from kd_shards.schemas.shard import Storage
    from kd_shards.teacher_dump.requests import DumpRequest
    from kd_shards.teacher_dump.rows import ScoredTarget, make_row

    logprobs = np.full((2, 3), -1.0, dtype=np.float32)
    logprobs[1, 2] = np.nan
    with pytest.raises(UserError, match="NaN/inf logprobs for sample 7-0"):
        make_row(
            DumpRequest(7, np.array([1]), None, prompt_text="", references=()),
            ScoredTarget(
                sample_id="7-0",
                completion_index=0,
                target_ids=np.array([4, 5]),
                position_ids=np.array([[4, 4, 9], [5, 5, 9]]),
                position_logprobs=logprobs,
                finish_reason="stop",
                target_text="",
            ),
            tokenizer_size=100,
            storage=Storage("topk", top_k=2),
        )


def test_config_errors(tmp_path):
    from kd_shards.shared.config import build_config
    from kd_shards.teacher_dump.config import DumpConfig

    base = {"model": "m", "data": "gsm8k", "out": "o"}
    (tmp_path / "c.toml").write_text('top_k = 4\ncolour = "red"\n')
    with pytest.raises(UserError, match="unknown key\\(s\\) colour"):
        build_config(DumpConfig, config_file=tmp_path / "c.toml", flags=base)
    with pytest.raises(UserError, match="unknown key\\(s\\) topk"):
        build_config(DumpConfig, config_file=None, flags=base, assignments=("topk=3",))
    with pytest.raises(UserError, match="not a valid int"):
        build_config(DumpConfig, config_file=None, flags=base, assignments=("top_k=many",))
    with pytest.raises(UserError, match="--rank must be in \\[0, 1\\]"):
        build_config(DumpConfig, config_file=None, flags={**base, "rank": 2, "world_size": 2})
    with pytest.raises(UserError, match="--num-samples 4 at --temperature 0 .* --temperature 1"):
        build_config(DumpConfig, config_file=None, flags={**base, "num_samples": 4})
    sampled = {**base, "num_samples": 4, "temperature": 1.0}
    assert build_config(DumpConfig, config_file=None, flags=sampled).num_samples == 4
    (tmp_path / "c.toml").write_text("top_k = 4\ntemperature = 0.5\n")
    config = build_config(
        DumpConfig,
        config_file=tmp_path / "c.toml",
        flags={**base, "top_k": 6},
        assignments=("temperature=0.25",),
    )
    # file < flags < --set
    assert (config.top_k, config.temperature) == (6, 0.25)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    from kd_shards.teacher_dump.cli import main

    result = CliRunner().invoke(
        main,
        ["--model", str(tmp_path), "--data", "gsm8k", "--out", str(tmp_path / "o"), "--top-k", "0"],
    )
    assert result.exit_code == 2
    assert result.output.strip() == "error: --top-k must be at least 1"
    result = CliRunner().invoke(main, ["--data", "gsm8k"])
    assert result.exit_code == 2 and "--model, --out required" in result.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "is not a directory" in result.output


def test_a_corrupt_manifest_gets_one_fix_from_readers_and_teacher_dump(
    tiny_model, gsm8k_file, tmp_path
):
    from kd_shards.shared.shard_reader import read_manifest

    out = tmp_path / "out"
    out.mkdir()
    fixes = []
    for content in ('{"schema_version": 2, "shards": [', "[1, 2]"):
        (out / "manifest.json").write_text(content)
        with pytest.raises(UserError) as caught:
            read_manifest(out)
        reader = str(caught.value)
        writer = dump_error(dump_config(tiny_model, gsm8k_file, out, limit=2))  # before any engine
        fixes += [reader.split(": ")[-1], writer.split(": ")[-1]]
        assert fixes[-2] == fixes[-1]  # the same words from both
    assert "delete it and rerun the same teacher-dump command" in fixes[0]
    assert len(set(fixes)) == 1


def test_a_deleted_manifest_is_rebuilt_by_the_rerun(tiny_model, gsm8k_file, engine, tmp_path):
    from kd_shards.shared.shard_reader import read_manifest
    from kd_shards.teacher_dump.run import run_dump

    config = dump_config(tiny_model, gsm8k_file, tmp_path / "out", limit=2)
    run_dump(config, engine)
    before = read_manifest(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    assert run_dump(config, engine)["complete"]
    after = read_manifest(tmp_path / "out")
    assert after["shards"] == before["shards"] and after["totals"] == before["totals"]


def test_an_adaptive_dump_stored_without_top_1_first_is_not_resumed(
    tiny_model, text_file, tmp_path
):
    from kd_shards.teacher_dump.run import manifest_header, prepare

    out = tmp_path / "out"
    text = dict(data="text", mode="text", chunk_tokens=64, limit=2, store="adaptive")
    config = dump_config(tiny_model, text_file, out, **text)
    header = manifest_header(config, prepare(config))
    del header["storage"]["top_first"]  # as the manifest of an adaptive dump written before it
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(header))
    message = dump_error(config)  # refused before any engine starts
    assert "holds shards stored as adaptive" in message and "top-1 first" in message
    assert "use a new --out directory" in message
