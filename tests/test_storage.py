"""Storage v2 (schema version 2): every representation written by teacher-dump's writer and read
by the trainer's reader, checked against dense computations over the teacher's FULL
distribution (synthetic teachers whose whole vocabulary is known), never against the codec
itself. Also: v1 dumps still read, validate and train; `inspect --validate` and the trainer's
reader refuse corrupt v2 shards; the numpy decoding in docs/shard-format.md is what the reader
decodes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kd_shards.schemas.shard import CODEBOOK_KEY, LOGPROB_STEP, TAIL_STEP, Storage, round_logprobs
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import iterate_rows, open_dump
from tests.synthetic_dumps import write_v1_dump, write_v2_dump

VOCABULARY = 1000
ENGINE_K = 96  # entries per position the "engine" hands the writer


def teacher(positions: int, seed: int) -> np.ndarray:
    """(positions, V) float64 full log-distributions, Zipf-like with random bumps: some peaked,
    some flat (as a language model's)."""
    rng = np.random.default_rng(seed)
    sharpness = rng.uniform(0.5, 3.0, size=(positions, 1))
    logits = sharpness * rng.standard_normal((positions, VOCABULARY)) - np.log(
        np.arange(1, VOCABULARY + 1)
    )
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def synthetic_rows(full: np.ndarray, row_lengths: list[int], k: int) -> list[dict]:
    """Rows holding the engine's view of `full`: the top-k ids (rank order) and float32 values."""
    ids = np.argsort(-full, axis=1, kind="stable")[:, :k].astype(np.int32)
    values = np.take_along_axis(full, ids, axis=1).astype(np.float32)
    rows, start = [], 0
    for index, length in enumerate(row_lengths):
        part = slice(start, start + length)
        rows.append(
            {
                "sample_id": str(index),
                "source_index": index,
                "prompt_ids": np.array([1], dtype=np.int32),
                "target_ids": ids[part, 0].copy(),
                "target_logprobs": round_logprobs(values[part, 0]),
                "topk_ids": ids[part],
                "topk_logprobs": values[part],
            }
        )
        start += length
    return rows


def read_back(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trainer's view of a dump, rows in sample-id order: ids (N, W), logprobs, log tails."""
    rows = sorted(iterate_rows(open_dump(directory)), key=lambda row: int(row.sample_id))
    width = max(row.topk_ids.shape[1] for row in rows)

    def widened(array, fill):
        return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=fill)

    return (
        np.concatenate([widened(row.topk_ids, -1) for row in rows]),
        np.concatenate([widened(row.topk_logprobs, -np.inf) for row in rows]),
        np.concatenate([row.topk_log_tail for row in rows]),
    )


def fidelity_figures(full: np.ndarray, ids, logprobs, log_tail) -> tuple[np.ndarray, np.ndarray]:
    """Both storage-v2 fidelity figures per position, densely over the whole vocabulary:
    KL(p || p_hat) with p_hat = the stored values on the stored ids and the stored tail spread
    evenly over the other V - n ids, normalized; and -log(captured mass)."""
    p = np.exp(full)
    kl, neg_log_mass = np.empty(len(full)), np.empty(len(full))
    for position in range(len(full)):
        stored = ids[position] >= 0
        q = np.full(VOCABULARY, np.exp(float(log_tail[position])) / (VOCABULARY - stored.sum()))
        q[ids[position][stored]] = np.exp(logprobs[position][stored].astype(np.float64))
        q /= q.sum()
        kl[position] = np.sum(p[position] * (full[position] - np.log(q)))
        neg_log_mass[position] = -np.log(p[position, ids[position][stored]].sum())
    return kl, neg_log_mass


def exact_top_k_figures(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same figures for exact top-k: exact values, exact tail."""
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(full, order, axis=1)
    tail = np.log1p(-np.exp(values).sum(axis=1))
    return fidelity_figures(full, order, values, tail)


def test_topk_round_trips_exactly_and_stores_the_exact_tail(tmp_path):
    full = teacher(120, seed=1)
    rows = synthetic_rows(full, [50, 40, 30], k=32)
    # padding-row ids dropped by the writer leave fewer real entries at some positions
    rows[1]["topk_ids"][:5, -3:] = -1
    rows[1]["topk_logprobs"][:5, -3:] = -np.inf
    write_v2_dump(tmp_path, rows, Storage("topk", top_k=32), vocabulary=VOCABULARY, fingerprint="f")
    ids, logprobs, log_tail = read_back(tmp_path)
    engine_ids = np.concatenate([row["topk_ids"] for row in rows])
    engine_values = np.concatenate([row["topk_logprobs"] for row in rows])
    np.testing.assert_array_equal(ids, engine_ids)
    # exactly what schema v1 stored: the values rounded to 2^-10
    np.testing.assert_array_equal(logprobs, round_logprobs(engine_values))
    assert np.isneginf(logprobs[engine_ids < 0]).all()
    # the tail: everything outside the stored ids, from the full distribution
    stored_mass = np.array(
        [np.exp(full[t, engine_ids[t][engine_ids[t] >= 0]]).sum() for t in range(len(full))]
    )
    np.testing.assert_allclose(log_tail, np.log1p(-stored_mass), atol=TAIL_STEP / 2 + 1e-6)


def test_v1_and_v2_topk_hand_the_trainer_the_same_arrays(tmp_path):
    full = teacher(60, seed=2)
    rows = synthetic_rows(full, [30, 30], k=16)
    write_v1_dump(tmp_path / "v1", rows, top_k=16, vocabulary=VOCABULARY, fingerprint="f")
    write_v2_dump(
        tmp_path / "v2", rows, Storage("topk", top_k=16), vocabulary=VOCABULARY, fingerprint="f"
    )
    v1, v2 = read_back(tmp_path / "v1"), read_back(tmp_path / "v2")
    np.testing.assert_array_equal(v1[0], v2[0])
    np.testing.assert_array_equal(v1[1], v2[1])
    assert np.isnan(v1[2]).all() and np.isfinite(v2[2]).all()  # v1 stores no tail


@pytest.mark.parametrize(
    "storage",
    [
        Storage("topk", top_k=16),
        Storage("adaptive", top_k=16, k_max=32),
        Storage("adaptive", top_k=16, k_max=32, rule="mass", mass_target=0.9, codebook=True),
        Storage("sampled", draws=16),
    ],
    ids=lambda storage: f"{storage.representation}-{storage.rule}-{storage.codebook}",
)
def test_a_row_without_target_positions_is_written_and_read_back_empty(tmp_path, storage):
    # A completion can end before its first token (a stop token at once): its row has T = 0
    # between rows that have positions.
    full = teacher(40, seed=8)
    rows = synthetic_rows(full, [20, 0, 20], k=32)
    if storage.representation == "sampled":
        draws = np.random.default_rng(8).choice(32, size=(40, 16))
        for row, part in zip(rows, (slice(0, 20), slice(20, 20), slice(20, 40)), strict=True):
            row["topk_ids"] = np.take_along_axis(
                np.argsort(-full, axis=1)[part, :32], draws[part], axis=1
            ).astype(np.int32)
    write_v2_dump(tmp_path, rows, storage, vocabulary=VOCABULARY, fingerprint="f")
    read = {row.sample_id: row for row in iterate_rows(open_dump(tmp_path))}
    assert [len(read[str(index)].target_ids) for index in range(3)] == [20, 0, 20]
    assert read["1"].topk_ids.shape[0] == 0 and read["1"].topk_log_tail.shape == (0,)
    from kd_shards.teacher_dump.inspect import validate

    assert validate(tmp_path) == []


@pytest.mark.parametrize("codebook", [True, False])
def test_adaptive_mass_rule_respects_its_target_and_cap_on_every_position(tmp_path, codebook):
    full = teacher(200, seed=3)
    storage = Storage(
        "adaptive", top_k=8, k_max=24, rule="mass", mass_target=0.8, codebook=codebook
    )
    write_v2_dump(
        tmp_path, synthetic_rows(full, [100, 100], k=ENGINE_K), storage,
        vocabulary=VOCABULARY, fingerprint="f",
    )  # fmt: skip
    ids, logprobs, log_tail = read_back(tmp_path)
    ranked = np.argsort(-full, axis=1, kind="stable")
    counts = (ids >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 24
    assert (counts == 24).any() and (counts < 24).any()  # both cases occur
    for position in range(len(full)):
        count = counts[position]
        # the stored ids are the `count` most likely ones
        assert set(ids[position, :count]) == set(ranked[position, :count])
        mass = np.exp(full[position, ranked[position, :count]]).sum()
        fewer = np.exp(full[position, ranked[position, : count - 1]]).sum()
        if count < 24:
            assert mass >= 0.8 > fewer  # reached the target with the fewest entries
        else:
            assert fewer < 0.8  # the cap stopped it
        # values: sqrt levels on S = 24, |sqrt(q) - sqrt(p)| <= 1 / (2 S) above level 0
        q = np.exp(logprobs[position, :count].astype(np.float64))
        p = np.exp(full[position, ids[position, :count]])
        above = q > 1 / (16 * 24**2)
        assert np.abs(np.sqrt(q) - np.sqrt(p))[above].max() <= 1 / 48 + 1e-6
        assert abs(log_tail[position] - np.log1p(-mass)) <= TAIL_STEP / 2 + 1e-5
    # entries reach the trainer in rank order
    assert (np.diff(np.where(ids >= 0, logprobs, -1e30), axis=1) <= 0).all()


@pytest.mark.parametrize("top_first", [True, False])  # False: adaptive v2 shards written before
def test_an_adaptive_row_decodes_the_same_whatever_shard_it_was_written_into(tmp_path, top_first):
    # The codebook numbers ids by their frequency in the shard, and quantized levels tie often:
    # the order of equal values must come from the token ids, not from the shard's codes (a
    # killed and resumed dump groups rows into other shards than an uninterrupted one).
    full = teacher(240, seed=9)
    rows = synthetic_rows(full, [20] * 12, k=ENGINE_K)
    storage = Storage("adaptive", top_k=8, k_max=24, codebook=True, top_first=top_first)
    write_v2_dump(tmp_path / "a", rows, storage, vocabulary=VOCABULARY, fingerprint="f")
    write_v2_dump(
        tmp_path / "b", rows[::-1], storage, vocabulary=VOCABULARY, fingerprint="f",
        rows_per_shard=3,
    )  # fmt: skip
    first, second = read_back(tmp_path / "a"), read_back(tmp_path / "b")
    ties = 0
    for ids, logprobs in zip(first[0], first[1], strict=True):
        kept = ids >= 0
        ties += len(logprobs[kept]) - len(np.unique(logprobs[kept]))
        # equal values come in ascending id order (after the exact top-1, with top_first)
        after = kept & (np.arange(len(ids)) >= int(top_first))
        for value in np.unique(logprobs[after]):
            assert (np.diff(ids[after][logprobs[after] == value]) > 0).all()
    assert ties > 100  # the case this test is about occurs
    for one, other in zip(first, second, strict=True):
        np.testing.assert_array_equal(one, other)


@pytest.mark.parametrize("codebook", [True, False])
def test_an_adaptive_row_stores_the_teachers_top_1_first_among_equal_levels(tmp_path, codebook):
    full = teacher(240, seed=9)
    storage = Storage("adaptive", top_k=8, k_max=24, codebook=codebook)
    write_v2_dump(
        tmp_path, synthetic_rows(full, [20] * 12, k=ENGINE_K), storage,
        vocabulary=VOCABULARY, fingerprint="f",
    )  # fmt: skip
    ids, logprobs, _ = read_back(tmp_path)
    tied = logprobs[:, 1] == logprobs[:, 0]
    assert tied.sum() >= 10  # the top level is shared at these positions
    np.testing.assert_array_equal(ids[:, 0], full.argmax(axis=1))
    # a storage record written before the flag existed decodes the old way
    assert not Storage.from_dict({"representation": "adaptive", "top_k": 8, "k_max": 24}).top_first


def test_adaptive_parity_rule_matches_exact_top_k_on_both_figures_per_row(tmp_path):
    full = teacher(240, seed=4)
    lengths = [80, 60, 100]
    storage = Storage("adaptive", top_k=16, k_max=48, codebook=True)
    write_v2_dump(
        tmp_path, synthetic_rows(full, lengths, k=ENGINE_K), storage,
        vocabulary=VOCABULARY, fingerprint="f",
    )  # fmt: skip
    ids, logprobs, log_tail = read_back(tmp_path)
    kl, neg_log_mass = fidelity_figures(full, ids, logprobs, log_tail)
    reference_kl, reference_mass = exact_top_k_figures(full, 16)
    counts = (ids >= 0).sum(axis=1)
    assert counts.max() <= 48
    starts = np.cumsum([0, *lengths[:-1]])
    # per row, both figures no worse than exact top-16 (tolerance: float64 summation order)
    assert (np.add.reduceat(kl - reference_kl, starts) <= 1e-9).all()
    assert (np.add.reduceat(neg_log_mass - reference_mass, starts) <= 1e-9).all()
    assert counts.mean() < 16  # and it needs fewer entries than top-16 on this teacher


def stored_draws(full: np.ndarray, draws: int, replicates: int):
    """`replicates` independent sets of `draws` draws from p = exp(full), written with
    teacher-dump's sampled encoder and read back with the trainer's decoder (one set = one
    position)."""
    from kd_shards.shared.shard_codec import decode_distributions
    from kd_shards.teacher_dump.encoding import encode_row, shard_columns

    storage = Storage("sampled", top_k=0, draws=draws)
    rng = np.random.default_rng(5)
    cdf = np.cumsum(np.exp(full))
    drawn = np.minimum(
        np.searchsorted(cdf, rng.random((replicates, draws)) * cdf[-1], side="right"),
        VOCABULARY - 1,
    ).astype(np.int32)
    entries = encode_row(drawn, np.zeros(drawn.shape, np.float32), storage, VOCABULARY)
    columns, _ = shard_columns([entries], storage, VOCABULARY)
    return decode_distributions({name: v[0] for name, v in columns.items()}, storage, None)


def trainer_gradients(student_logits: torch.Tensor, ids, logprobs, log_tail) -> np.ndarray:
    """(positions, V) gradient of the trainer's forward-KL loss (bucket tail, T = 1) of each
    position w.r.t. the student's logits."""
    from kd_shards.student_train.losses import LossOptions, loss_sums

    logits = student_logits.expand(len(ids), -1).clone().requires_grad_(True)
    sums = loss_sums(
        logits,
        torch.zeros(len(ids), dtype=torch.long),
        torch.from_numpy(ids).long(),
        torch.from_numpy(logprobs),
        torch.from_numpy(log_tail),
        options=LossOptions(loss="fkl", alpha=0.0, beta=0.0, temperature=1.0, tail="bucket"),
    )  # fmt: skip
    sums[0].backward()
    return logits.grad.double().numpy()


def test_sampled_estimator_is_unbiased_for_the_forward_kl_gradient():
    """E[gradient of the trainer's loss on stored draws] = s - p, the gradient of KL(p || s).

    Tolerance: each tested entry's mean over R replicates is within 4.5 standard errors of
    s_v - p_v (SE from the exact multinomial variance p_v (1 - p_v) / (D R); with ~100 tested
    entries an unbiased estimator exceeds |z| = 4.5 somewhere with probability ~1e-3), and the
    error norm is within 25 % of its expected size (no systematic bias hidden in the noise)."""
    full = teacher(1, seed=6)[0]
    p = np.exp(full)
    student_logits = torch.from_numpy(full + np.random.default_rng(7).normal(size=VOCABULARY))
    s = torch.softmax(student_logits, -1).numpy()
    draws, replicates = 16, 6000
    decoded = stored_draws(full, draws, replicates)

    def check(logprobs: np.ndarray) -> tuple[float, float]:
        gradients = trainer_gradients(
            student_logits.float(), decoded.ids, logprobs, decoded.log_tail
        )
        error = gradients.mean(axis=0) - (s - p)
        standard_error = np.sqrt(p * (1 - p) / (draws * replicates))
        tested = p * draws * replicates >= 100
        z = np.abs(error[tested]) / standard_error[tested]
        assert tested.sum() >= 50
        return z.max(), np.linalg.norm(error[tested]) / np.linalg.norm(standard_error[tested])

    worst, norm_ratio = check(decoded.logprobs)
    assert worst <= 4.5 and 0.75 <= norm_ratio <= 1.25, (worst, norm_ratio)
    # The check has power: weights that ignore the hit counts (1 / distinct ids) are biased.
    distinct = (decoded.ids >= 0).sum(axis=1, keepdims=True)
    uniform = np.where(decoded.ids >= 0, -np.log(distinct), -np.inf).astype(np.float32)
    assert check(uniform)[0] > 10


def test_inspect_validate_and_the_reader_refuse_corrupt_v2_shards(tmp_path):
    from kd_shards.shared.files import sha256_of_file
    from kd_shards.teacher_dump.inspect import validate
    from kd_shards.teacher_dump.shards import describe_shard

    full = teacher(60, seed=8)
    storage = Storage("adaptive", top_k=8, k_max=24, codebook=True)
    directory = write_v2_dump(
        tmp_path / "dump", synthetic_rows(full, [30, 30], k=ENGINE_K), storage,
        vocabulary=VOCABULARY, fingerprint="f",
    )  # fmt: skip
    assert validate(directory) == []
    manifest_path = directory / "manifest.json"
    pristine = directory / "pristine.bin"
    shard = sorted(directory.glob("part-*.parquet"))[0]
    pristine.write_bytes(shard.read_bytes())
    assert pq.read_table(shard)["kd_count"][0].as_py()[0] >= 3  # entries 1, 2: position 0's

    def rewrite(change_column=None, drop_codebook=False):
        """Rewrite the shard with one column changed, keeping it checksummed in the manifest
        (so that only the value checks can catch it)."""
        shard.write_bytes(pristine.read_bytes())
        parquet = pq.ParquetFile(shard)
        table = parquet.read()
        footer = {
            key: value
            for key, value in (parquet.metadata.metadata or {}).items()
            if key != b"ARROW:schema" and not (drop_codebook and key == CODEBOOK_KEY)
        }
        if change_column is not None:
            name, change = change_column
            column = table[name].combine_chunks()
            values = change(column.values.to_numpy().copy())
            changed = pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.int32()))
            table = table.set_column(table.schema.get_field_index(name), name, changed)
        from kd_shards.schemas.shard import shard_schema
        from kd_shards.teacher_dump.shards import write_table

        footer.pop(b"kd_shards.schema_version")
        footer.pop(b"kd_shards.storage")
        table = table.replace_schema_metadata(shard_schema(storage).metadata)
        write_table(shard, table, footer, storage)
        manifest = json.loads(manifest_path.read_text())
        manifest["shards"][0] = describe_shard(shard)
        assert manifest["shards"][0]["sha256"] == sha256_of_file(shard)
        manifest_path.write_text(json.dumps(manifest))

    def negative_gap(values):
        values[1] = -3
        return values

    def level_above_scale(values):
        values[0] = 25
        return values

    def id_beyond_vocabulary(values):
        values[0] = 10_000_000  # a code beyond the shard's codebook
        return values

    def repeated_id(values):
        values[2] = 0  # entries 1 and 2: position 0's others, ascending
        return values

    def top_id_again(values):
        values[1] = values[0]
        return values

    def one_more_entry(values):
        values[0] += 1
        return values

    cases = [
        (("kd_id_gaps", negative_gap), False, "kd_id_gaps are not strictly ascending"),
        (("kd_id_gaps", repeated_id), False, "kd_id_gaps are not strictly ascending"),
        (("kd_id_gaps", top_id_again), False, "kd_id_gaps repeat a position's first id"),
        (("kd_levels", level_above_scale), False, "kd_levels outside [0, 24]"),
        (("kd_id_gaps", id_beyond_vocabulary), False, "outside the shard's codebook"),
        (("kd_count", one_more_entry), False, "holds a different number of entries than kd_count"),
        (None, True, "the footer has no id codebook"),
    ]
    for change, drop_codebook, message in cases:
        rewrite(change, drop_codebook)
        problems = validate(directory)
        assert len(problems) == 1 and message in problems[0], (message, problems)
        with pytest.raises(UserError, match=re.escape(message)):
            list(iterate_rows(open_dump(directory)))
    # a shard whose storage disagrees with its manifest
    rewrite()
    manifest = json.loads(manifest_path.read_text())
    manifest["storage"]["value_scale"] = 32
    manifest_path.write_text(json.dumps(manifest))
    assert "the manifest says adaptive" in validate(directory)[0]
    with pytest.raises(UserError, match="stores adaptive.*S=24.*the manifest says"):
        open_dump(directory)


def test_the_documented_numpy_decoding_equals_the_reader(tmp_path):
    """docs/shard-format.md shows how to decode each representation with numpy in a few lines;
    run those lines on a real v2 shard and compare with what the trainer's reader hands out."""
    page = Path(__file__).resolve().parents[1] / "docs" / "shard-format.md"
    snippet = re.search(
        r"<!-- decode-example -->\n```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL
    )
    assert snippet, "docs/shard-format.md lost its numpy decoding example"
    full = teacher(90, seed=9)
    rows = synthetic_rows(full, [45, 45], k=ENGINE_K)
    for storage in (
        Storage("adaptive", top_k=8, k_max=24, codebook=True, top_first=False),
        Storage("adaptive", top_k=8, k_max=24, codebook=True, top_first=True),
        Storage("topk", top_k=12),
        Storage("sampled", top_k=0, draws=16),
    ):
        directory = tmp_path / f"{storage.representation}-{storage.top_first}"
        written = rows
        if storage.representation == "sampled":  # the "engine" hands 16 draws per position
            rng = np.random.default_rng(10)
            written = [
                {**row, "topk_ids": rng.integers(0, 30, (len(row["target_ids"]), 16), np.int32)}
                for row in rows
            ]
        write_v2_dump(directory, written, storage, vocabulary=VOCABULARY, fingerprint="f")
        path = sorted(directory.glob("part-*.parquet"))[0]
        namespace = {"path": str(path)}
        exec(snippet.group(1), namespace)  # noqa: S102 - the documentation's own lines
        ids, logprobs, log_tail = read_back(directory)
        per_position = namespace["position"]
        for position in (0, 17, 89):
            mine = ids[position][ids[position] >= 0]
            theirs = namespace["ids"][per_position == position]
            assert set(mine) == set(theirs)
            their_values = dict(
                zip(theirs, namespace["logp"][per_position == position], strict=True)
            )
            for token, value in zip(mine, logprobs[position], strict=False):
                assert their_values[token] == pytest.approx(float(value), abs=1e-6)
        np.testing.assert_allclose(namespace["log_tail"], log_tail, atol=1e-6)


@pytest.mark.engine
def test_a_v1_dump_of_real_teacher_output_validates_and_trains(
    text_shards, student_model, tmp_path
):
    from kd_shards.student_train.config import TrainConfig
    from kd_shards.student_train.reporting import read_metrics
    from kd_shards.student_train.train import run_training
    from kd_shards.teacher_dump.inspect import validate

    manifest = json.loads((text_shards / "manifest.json").read_text())
    assert manifest["storage"]["representation"] == "topk"
    rows = [
        {
            "sample_id": row.sample_id,
            "source_index": int(row.sample_id),
            "prompt_ids": row.prompt_ids,
            "target_ids": row.target_ids,
            "target_logprobs": np.zeros(len(row.target_ids), np.float32),
            "topk_ids": row.topk_ids,
            "topk_logprobs": row.topk_logprobs,
        }
        for row in iterate_rows(open_dump(text_shards))
    ]
    v1 = write_v1_dump(
        tmp_path / "v1",
        rows,
        top_k=manifest["top_k"],
        vocabulary=manifest["tokenizer"]["size"],
        fingerprint=manifest["tokenizer"]["fingerprint"],
        rows_per_shard=8,
        row_group_rows=8,
    )  # fmt: skip  (the same shards and row groups as the v2 dump: the same data order)
    assert validate(v1) == []

    def train(shards: Path, out: Path) -> list[float]:
        run_training(
            TrainConfig(
                shards=str(shards), student=str(student_model), out=str(out), max_steps=2,
                micro_batch=4, lr=1e-3, chunk_tokens=64, tail="renormalize", progress=False,
            )
        )  # fmt: skip
        return [line["loss"] for line in read_metrics(out / "metrics.jsonl") if "loss" in line]

    # the same exact top-k as v1 and as v2: identical training (renormalize: the tail, which
    # only v2 stores, does not enter)
    v1_losses = train(v1, tmp_path / "train-v1")
    assert v1_losses == train(text_shards, tmp_path / "train-v2")
    assert all(np.isfinite(v1_losses))
    assert LOGPROB_STEP == 2.0**-10  # the grid both versions share


@pytest.mark.engine
def test_sampled_store_draws_from_the_teachers_full_distribution(tiny_model, text_file, tmp_path):
    """teacher-dump --store sampled in vLLM's default multiprocess mode: the plugin is found
    through its vllm.general_plugins entry point (registered here by a dist-info directory on
    PYTHONPATH, as an installed kd-shards registers it), and the stored hits follow the
    teacher's full distribution from a transformers forward pass."""
    import os
    import subprocess

    from transformers import AutoModelForCausalLM

    from scripts.tiny_models import TOKENIZER_SIZE
    from tests.conftest import REPO, cli_command

    plugin = tmp_path / "plugin" / "kd_shards_entry_point-0.0.dist-info"
    plugin.mkdir(parents=True)
    (plugin / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kd-shards-entry-point\nVersion: 0.0\n"
    )
    (plugin / "entry_points.txt").write_text(
        "[vllm.general_plugins]\n"
        "kd_shards_sampled_logprobs = shared.engine:register_sampled_logprobs\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(plugin.parent)])}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    out = tmp_path / "out"
    draws = 32
    result = subprocess.run(
        cli_command(
            "--model", str(tiny_model), "--data", "text", "--mode", "text", "--data-path",
            str(text_file), "--chunk-tokens", "64", "--limit", "8", "--store", "sampled",
            "--draws", str(draws), "--out", str(out), "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--no-progress",
        ),
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage"] == {"representation": "sampled", "draws": draws, "zstd_level": 3}
    assert "through its entry point" in manifest["engine"]["draws"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    observed_top, expected_top, variance_top = 0.0, 0.0, 0.0
    observed_padding, expected_padding, variance_padding = 0.0, 0.0, 0.0
    repeated = 0
    for row in iterate_rows(open_dump(out)):
        with torch.no_grad():
            sequence = torch.tensor([[*row.prompt_ids, *row.target_ids]])
            logits = model(sequence).logits[0, len(row.prompt_ids) - 1 : -1].double()
        p = torch.softmax(logits, -1).numpy()  # over the embedding's rows, padding included
        weights = np.exp(row.topk_logprobs.astype(np.float64))
        hits = np.where(row.topk_ids >= 0, np.rint(weights * draws), 0)
        assert np.allclose(hits, np.where(row.topk_ids >= 0, weights * draws, 0), atol=1e-4)
        repeated += int((hits > 1).any(axis=1).sum())
        for position, ids in enumerate(row.topk_ids):
            top = int(np.argmax(p[position, :TOKENIZER_SIZE]))
            observed_top += hits[position][ids == top].sum()
            expected_top += draws * p[position, top]
            variance_top += draws * p[position, top] * (1 - p[position, top])
            padding_mass = p[position, TOKENIZER_SIZE:].sum()
            # draws of padding rows are not stored: they are the tail
            observed_padding += draws * np.exp(float(row.topk_log_tail[position]))
            expected_padding += draws * padding_mass
            variance_padding += draws * padding_mass * (1 - padding_mass)
    assert repeated > 0  # draws with replacement, not a top-k
    assert abs(observed_top - expected_top) <= 4.5 * np.sqrt(variance_top)
    assert abs(observed_padding - expected_padding) <= 4.5 * np.sqrt(variance_padding) + 1e-9
